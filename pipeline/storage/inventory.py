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
a prefix; the caller passes them in as callables (manifest.py imports this module, so this one
cannot import it back).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.core.errors import ConfigError
from pipeline.core.schemas import MANIFEST_SCHEMA
from pipeline.storage.filesystem import filesystem_for, is_local, retry

SkipReason = Callable[[str, str], str | None]  # ListingRules.skip_reason(root, path)
AddSkipped = Callable[[str, str], None]  # Skipped.add(reason, path)

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


def read_inventory(
    uri: str, storage_options: dict | None, skip_reason: SkipReason, add_skipped: AddSkipped
) -> pa.Table:
    """The current objects an inventory report names, as MANIFEST_SCHEMA rows; the files the
    listing rules leave out go to add_skipped(reason, uri) instead."""
    report = _load_report(uri, storage_options)
    tables = []
    for data_uri in _data_files(uri, report, storage_options):
        # a whole file again on a transient error, so its skipped files are counted once
        table, skipped = retry(
            lambda data_uri=data_uri: _read_data_file(data_uri, report, storage_options, skip_reason),
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
    uri: str, report: dict, storage_options: dict | None, skip_reason: SkipReason
) -> tuple[pa.Table, list[tuple[str, str]]]:
    """One data file's rows, batch by batch, and what the listing rules left out of it."""
    fs, path = filesystem_for(uri, storage_options)
    tables: list[pa.Table] = []
    skipped: list[tuple[str, str]] = []
    with fs.open(path, "rb") as handle:
        try:
            for batch in _batches(handle, report, uri):
                tables.append(_rows(batch, report["fileFormat"] == "csv", skip_reason, skipped))
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


def _rows(
    batch: pa.Table, url_encoded: bool, skip_reason: SkipReason, skipped: list[tuple[str, str]]
) -> pa.Table:
    """A batch as manifest rows: current objects only, no folder markers, the rules applied."""
    batch = batch.filter(_current(batch))
    keep, uris = [], []
    for i, (bucket, key) in enumerate(zip(batch["Bucket"].to_pylist(), batch["Key"].to_pylist())):
        # AWS: "When using the CSV file format, the key name is URL-encoded and must be decoded
        # before you can use it" (docs.aws.amazon.com/AmazonS3/latest/userguide/storage-inventory.html,
        # "Amazon S3 inventory list"). It is form encoding: a space is written '+' and a '+' as
        # %2B (github.com/cloud-custodian/cloud-custodian/issues/1997, fixed with unquote_plus in
        # its PR #1998), so unquote_plus, not unquote. Parquet keys are not encoded.
        key = unquote_plus(key) if url_encoded else key
        if key.endswith("/"):
            continue
        reason = skip_reason(f"{bucket}/", f"{bucket}/{key}")
        if reason:
            skipped.append((reason, f"s3://{bucket}/{key}"))
        else:
            keep.append(i)
            uris.append(f"s3://{bucket}/{key}")
    batch = batch.take(pa.array(keep, pa.int64()))
    return pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "source_size": _column(batch, "Size", pa.int64()),
            "etag": pc.utf8_trim(_column(batch, "ETag", pa.string()), '"'),
            "mtime": _mtime(batch),
        },
        schema=MANIFEST_SCHEMA,
    )


def _current(batch: pa.Table) -> pa.ChunkedArray | pa.Array:
    """True for the rows of current objects: latest (when versions are listed) and not deleted."""
    latest = _flag(batch, "IsLatest", default=True)
    deleted = _flag(batch, "IsDeleteMarker", default=False)
    return pc.and_(latest, pc.invert(deleted))


def _flag(batch: pa.Table, name: str, default: bool) -> pa.ChunkedArray | pa.Array:
    """A true/false column (strings in CSV, booleans in Parquet); `default` where absent or empty."""
    if name not in batch.column_names:
        return pa.array([default] * batch.num_rows, pa.bool_())
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
