"""An S3 Inventory report as an input: its manifest.json -> manifest rows, with no LIST calls.

Listing a bucket of hundreds of millions of keys takes hours of LIST requests; the daily or
weekly inventory AWS already wrote names every object with its size, ETag and date. The format
(docs.aws.amazon.com/AmazonS3/latest/userguide/storage-inventory-location.html, "Inventory
manifest"): manifest.json gives `sourceBucket`, `destinationBucket` (an ARN), `fileFormat`
(CSV, ORC or Parquet), `fileSchema` and `files` (data files, by key in the destination bucket).
CSV data files are gzip'd, with no header, columns in fileSchema order and URL-encoded keys;
Parquet files name their columns themselves (bucket, key, size, last_modified_date, e_tag, ...).

An inventory of all versions lists old versions and delete markers: only current objects are
inputs, as a listing would give. Folder markers (keys ending in "/") are no files, as in a
listing. The listing rules (os_debris, sidecar, extension, tagpipe_output) apply as they do to
a prefix; the caller passes them in (manifest.py's ListingRules: manifest.py imports this module,
so this one cannot import it back).

Every step is Arrow compute over a batch (or numpy over its bytes, for the URL decoding), as
a listing's key ranges are: a row at a time in Python took 4x as long (~70 s for 10M); only
the few rows the rules may skip are asked about one by one (docs/benchmarks.md, 'Driver memory at
10M and 30M objects, inventory at 10M').
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator
from typing import Protocol
from urllib.parse import unquote_plus

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.core.errors import ConfigError
from pipeline.core.schemas import MANIFEST_SCHEMA
from pipeline.storage.filesystem import filesystem_for, is_local, retry

AddSkipped = Callable[[str, str], None]  # Skipped.add(reason, path)


class Rules(Protocol):
    """What the listing leaves out (manifest.ListingRules)."""

    def skip_reason(self, root: str, path: str) -> str | None: ...

    def may_skip(self, paths: pa.Array) -> np.ndarray: ...


REQUIRED_FIELDS = ("sourceBucket", "destinationBucket", "fileFormat", "fileSchema", "files")
# the columns used, by their CSV fileSchema names; Parquet names them in snake case
COLUMNS = {
    "Bucket": "bucket",
    "Key": "key",
    "Size": "size",
    "LastModifiedDate": "last_modified_date",
    "ETag": "e_tag",
    "IsLatest": "is_latest",
    "IsDeleteMarker": "is_delete_marker",
}
BATCH_BYTES = 16 << 20  # CSV bytes parsed at a time: a data file is never held whole


def read_inventory(uri: str, storage_options: dict | None, rules: Rules, add_skipped: AddSkipped) -> pa.Table:
    """The current objects an inventory report names, as MANIFEST_SCHEMA rows; the files the
    listing rules leave out go to add_skipped(reason, uri) instead."""
    report = _load_report(uri, storage_options)
    tables = []
    for data_uri in _data_files(uri, report, storage_options):
        # a whole file again on a transient error, so its skipped files are counted once
        table, skipped = retry(
            lambda data_uri=data_uri: _read_data_file(data_uri, report, storage_options, rules),
            what=data_uri,
        )
        tables.append(table)
        for reason, path in skipped:
            add_skipped(reason, path)
    return pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()


def _load_report(uri: str, storage_options: dict | None) -> dict:
    """manifest.json, checked: a report tagpipe cannot read is refused before any work."""
    fs, path = filesystem_for(uri, storage_options)
    text = retry(lambda: fs.cat_file(path), what=uri)
    try:
        report = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"S3 inventory {uri}: not JSON ({_first_line(exc)})") from None
    if not isinstance(report, dict):
        raise ConfigError(f"S3 inventory {uri}: not a JSON object")
    for name in REQUIRED_FIELDS:
        if name not in report:
            raise ConfigError(f"S3 inventory {uri}: no '{name}' field")
    if not isinstance(report["files"], list) or not all(
        isinstance(f, dict) and isinstance(f.get("key"), str) for f in report["files"]
    ):
        raise ConfigError(f"S3 inventory {uri}: 'files' is not a list of {{\"key\": ...}} entries")
    file_format = str(report["fileFormat"])
    if file_format.lower() not in ("csv", "parquet"):
        raise ConfigError(
            f"S3 inventory {uri}: {file_format} inventories are not supported; CSV or Parquet ones are"
        )
    return {**report, "fileFormat": file_format.lower(), "columns": _columns(uri, report, file_format)}


def _columns(uri: str, report: dict, file_format: str) -> list[str]:
    """A CSV file's column names, from fileSchema ("Bucket, Key, Size, ..."); Parquet files
    carry their own, so none are needed for those."""
    if file_format.lower() != "csv":
        return []
    columns = [name.strip() for name in str(report["fileSchema"]).split(",")]
    for name in ("Bucket", "Key"):
        if name not in columns:
            raise ConfigError(f"S3 inventory {uri}: no '{name}' column in fileSchema")
    return columns


def _data_files(uri: str, report: dict, storage_options: dict | None) -> list[str]:
    """Where the data files are: in the destination bucket when the report is read from S3;
    beside a downloaded copy (`../data/` or `data/`, as AWS lays it out) when it is local."""
    fs, path = filesystem_for(uri, storage_options)
    keys = [entry["key"] for entry in report["files"]]
    if not is_local(fs):
        bucket = str(report["destinationBucket"]).split(":::")[-1]
        return [f"s3://{bucket}/{key}" for key in keys]
    found = []
    folder = posixpath.dirname(path)
    for key in keys:
        name = posixpath.basename(key)
        candidates = [
            posixpath.normpath(posixpath.join(folder, where, name)) for where in ("../data", "data")
        ]
        matches = [c for c in candidates if fs.exists(c)]
        if not matches:
            raise ConfigError(
                f"S3 inventory {uri}: data file {key} not found (looked for {' and '.join(candidates)})"
            )
        found.append(matches[0])
    return found


def _read_data_file(
    uri: str, report: dict, storage_options: dict | None, rules: Rules
) -> tuple[pa.Table, list[tuple[str, str]]]:
    """One data file's rows, batch by batch, and what the listing rules left out of it."""
    fs, path = filesystem_for(uri, storage_options)
    tables: list[pa.Table] = []
    skipped: list[tuple[str, str]] = []
    with fs.open(path, "rb") as handle:
        try:
            for batch in _batches(handle, report, uri):
                tables.append(_rows(batch, report["fileFormat"] == "csv", rules, skipped))
        except pa.ArrowInvalid as exc:  # a row that does not parse, a size that is not a number
            raise ConfigError(f"S3 inventory data file {uri}: {_first_line(exc)}") from None
    return (pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()), skipped


def _batches(handle, report: dict, uri: str) -> Iterator[pa.Table]:
    """The file's record batches, with the columns named as in a CSV fileSchema."""
    if report["fileFormat"] == "parquet":
        parquet = pq.ParquetFile(handle)
        names = {snake: name for name, snake in COLUMNS.items() if snake in parquet.schema_arrow.names}
        if "key" not in names or "bucket" not in names:
            raise ConfigError(f"S3 inventory data file {uri}: no 'bucket' and 'key' columns")
        for batch in parquet.iter_batches(columns=list(names)):
            yield pa.Table.from_batches([batch]).rename_columns([names[n] for n in batch.schema.names])
        return
    columns = report["columns"]
    used = [name for name in columns if name in COLUMNS]
    reader = pacsv.open_csv(
        pa.CompressedInputStream(handle, "gzip"),
        read_options=pacsv.ReadOptions(column_names=columns, block_size=BATCH_BYTES),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in used}, include_columns=used, strings_can_be_null=True
        ),
    )
    for batch in reader:
        yield pa.Table.from_batches([batch])


def _rows(batch: pa.Table, url_encoded: bool, rules: Rules, skipped: list[tuple[str, str]]) -> pa.Table:
    """A batch as manifest rows: current objects only, no folder markers, the rules applied."""
    batch = batch.filter(_current(batch))
    # AWS: "When using the CSV file format, the key name is URL-encoded and must be decoded
    # before you can use it" (docs.aws.amazon.com/AmazonS3/latest/userguide/storage-inventory.html,
    # "Amazon S3 inventory list"). It is form encoding: a space is written '+' and a '+' as
    # %2B (github.com/cloud-custodian/cloud-custodian/issues/1997, fixed with unquote_plus in
    # its PR #1998), so unquote_plus, not unquote. Parquet keys are not encoded.
    key = batch["Key"].combine_chunks().cast(pa.string())
    key = unquote_plus_keys(key) if url_encoded else key
    paths = pc.binary_join_element_wise(batch["Bucket"].combine_chunks().cast(pa.string()), key, "/")
    if paths.null_count:
        raise pa.ArrowInvalid(f"{paths.null_count} row(s) with no bucket or key")
    keep = pc.invert(pc.ends_with(key, "/")).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(keep & rules.may_skip(paths)).tolist():  # the few the rules may skip
        path = paths[i].as_py()
        reason = rules.skip_reason(f"{path.split('/', 1)[0]}/", path)
        if reason:
            skipped.append((reason, f"s3://{path}"))
            keep[i] = False
    kept = pa.array(keep)
    batch = batch.filter(kept)
    return pa.table(
        {
            "uri": pc.binary_join_element_wise("s3:/", paths.filter(kept), "/"),
            "source_size": _column(batch, "Size", pa.int64()),
            "etag": pc.utf8_trim(_column(batch, "ETag", pa.string()), '"'),
            "mtime": _mtime(batch),
        },
        schema=MANIFEST_SCHEMA,
    )


HEX_VALUES = np.full(256, -1, np.int16)  # a byte's value as a hex digit, or -1
for _digits, _first in (("0123456789", 0), ("abcdef", 10), ("ABCDEF", 10)):
    HEX_VALUES[np.frombuffer(_digits.encode(), np.uint8)] = np.arange(_first, _first + len(_digits))


def unquote_plus_keys(keys: pa.Array) -> pa.Array:
    """urllib.parse.unquote_plus of every key, over the array's bytes: '+' is a space, and
    each %XX (two hex digits, within one key) the byte it names. Keys whose bytes then are
    not UTF-8 (a malformed report) are decoded by unquote_plus itself, which replaces them."""
    keys = pc.replace_substring(keys, "+", " ")
    encoded = pc.match_substring(keys, "%").fill_null(False)
    if not pc.any(encoded).as_py():
        return keys
    some = keys.filter(encoded)
    try:
        decoded = _percent_decoded(some)
        decoded.validate(full=True)  # UTF-8
    except pa.ArrowInvalid:
        decoded = pa.array([unquote_plus(k) for k in some.to_pylist()], pa.string())
    return pc.replace_with_mask(keys, encoded, decoded)


def _percent_decoded(keys: pa.Array) -> pa.Array:
    """%XX sequences of keys without nulls replaced by their bytes, in one pass over the
    array's data: an escape is never taken from a byte another one produced."""
    offsets = np.frombuffer(keys.buffers()[1], np.int32)[keys.offset : keys.offset + len(keys) + 1]
    data = np.frombuffer(keys.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    offsets = offsets - offsets[0]
    at = np.flatnonzero(data[:-2] == ord("%")) if len(data) > 2 else np.zeros(0, np.int64)
    high, low = HEX_VALUES[data[at + 1]], HEX_VALUES[data[at + 2]]
    ends = offsets[np.searchsorted(offsets, at, side="right")]  # where each '%'s key ends
    escape = (high >= 0) & (low >= 0) & (at + 2 < ends)  # hex digits are never '%': none overlap
    at = at[escape]
    out = data.copy()
    out[at] = (high[escape] * 16 + low[escape]).astype(np.uint8)
    gone = np.zeros(len(data) + 1, np.int64)
    gone[at + 1] = 1
    gone[at + 2] = 1
    removed = np.concatenate([[0], np.cumsum(gone[:-1])])  # bytes removed before each position
    new_offsets = (offsets - removed[offsets]).astype(np.int32)
    return pa.Array.from_buffers(
        pa.string(), len(keys), [None, pa.py_buffer(new_offsets), pa.py_buffer(out[~gone[:-1].astype(bool)])]
    )


def _current(batch: pa.Table) -> pa.ChunkedArray | pa.Array:
    """True for the rows of current objects: latest (when versions are listed) and not deleted."""
    latest = _flag(batch, "IsLatest", default=True)
    deleted = _flag(batch, "IsDeleteMarker", default=False)
    return pc.and_(latest, pc.invert(deleted))


def _flag(batch: pa.Table, name: str, default: bool) -> pa.ChunkedArray | pa.Array:
    """A true/false column (strings in CSV, booleans in Parquet); `default` where absent or empty."""
    if name not in batch.column_names:
        return pa.array(np.full(batch.num_rows, default))
    column = batch[name]
    if not pa.types.is_boolean(column.type):
        column = pc.equal(pc.utf8_lower(column.cast(pa.string())), "true")
    return column.fill_null(default)


def _column(batch: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
    if name not in batch.column_names:  # not among the inventory's configured fields
        return pa.nulls(batch.num_rows, type_)
    return batch[name].cast(type_)


def _mtime(batch: pa.Table) -> pa.ChunkedArray | pa.Array:
    """LastModifiedDate (ISO 8601 text in CSV, a timestamp in Parquet) as epoch seconds."""
    if "LastModifiedDate" not in batch.column_names:
        return pa.nulls(batch.num_rows, pa.float64())
    stamps = batch["LastModifiedDate"].cast(pa.timestamp("us", "UTC"))
    return pc.divide(stamps.cast(pa.int64()).cast(pa.float64()), 1e6)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
