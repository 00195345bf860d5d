"""Which listed images are new, changed, unchanged, deleted or to retry: the listing
against the table's current version, by uri range.

A single full-outer join of a 2M-row listing with the table's source columns peaked at
630 bytes a row; in 200k-row uri ranges it takes a tenth of that, in half the time.
Ranges are cut at the sorted listing's own uris (never between two rows of one uri),
and the table's side is read part by part as the ranges need it (StoredSources: parts
are sorted by uri, their spans come from their footers). Sources the store gave neither
etag nor mtime for are compared by the sha256 of their bytes (Ray tasks).

The answer (Changes) is by position into the sorted listing: one status code (1 byte)
and one part index (4 bytes) a listed row, and only the table's rows no longer listed
keep their uris. A table of the statuses with a copy of every uri took 117 bytes a row,
1.2 GiB at 10M objects, twice the listing itself (docs/benchmarks.md, 'Driver memory at
10M and 30M objects').
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.schemas import MANIFEST_SCHEMA
from pipeline.job.incremental import (
    CHANGED,
    DELETED,
    NEW,
    RETRY,
    RETRY_ERROR_KINDS,
    SOURCE_COLUMNS,
    UNCHANGED,
    UNKNOWN,
    same_values,
)
from pipeline.storage.filesystem import read_bytes
from pipeline.table.tag_table import READ_THREADS, Snapshot, TagTable

log = logging.getLogger(__name__)

CLASSIFY_RANGE_ROWS = 200_000  # listed rows joined at a time
STATUSES = (NEW, CHANGED, UNCHANGED, DELETED, UNKNOWN, RETRY)  # a status's code is its index here
CODE = {status: np.int8(code) for code, status in enumerate(STATUSES)}
DELETED_SCHEMA = pa.schema([("uri", pa.string()), ("_file", pa.int32())])
UNKNOWN_SCHEMA = pa.schema([("row", pa.int64()), ("sha256", pa.string())])


VIEW_COLUMNS = [*SOURCE_COLUMNS, "sha256", "error_kind"]
# the table's side of classify: its rows' sources, content hash, error, and part index
VIEW_SCHEMA = (
    MANIFEST_SCHEMA.append(pa.field("sha256", pa.string()))
    .append(pa.field("error_kind", pa.string()))
    .append(pa.field("_file", pa.int32()))
)


@dataclass(frozen=True)
class Changes:
    """classify's answer, by position into `manifest` (the listing, sorted by uri): for
    listed row i, codes[i] (an index into STATUSES) and files[i] (the base part holding
    its uri, or -1). The table's rows that are no longer listed are `deleted` (uri, _file,
    in uri order); `unknown` holds the stored sha256 of each row whose source the store
    gave no etag or mtime for (row, sha256), until resolve_unknown compares them."""

    manifest: pa.Table
    codes: np.ndarray  # int8, one per listed row
    files: np.ndarray  # int32, one per listed row
    deleted: pa.Table
    unknown: pa.Table

    @property
    def nbytes(self) -> int:
        """What classify adds to the listing it was given."""
        return self.codes.nbytes + self.files.nbytes + self.deleted.nbytes + self.unknown.nbytes

    def tally(self) -> collections.Counter:
        """Rows by status (each listed row, each deleted row)."""
        counts = {s: int(np.count_nonzero(self.codes == CODE[s])) for s in STATUSES}  # no intp copy
        tally = collections.Counter({s: n for s, n in counts.items() if n})
        tally[DELETED] += self.deleted.num_rows
        return tally

    def listed_in(self, *statuses: str) -> np.ndarray:
        """True for each listed row with one of these statuses (compared one status at a
        time: np.isin and fancy indexing make an 8-byte copy of every code, 240 MiB at 30M)."""
        picked = np.zeros(len(self.codes), bool)
        for status in statuses:
            picked |= self.codes == CODE[status]
        return picked

    def as_table(self) -> pa.Table:
        """One row per uri in either side, in uri order: uri, status, _file, v_sha256 (the
        stored hash of unknown sources). A copy of every uri: for tests and small listings."""
        v_sha256 = pa.nulls(len(self.codes), pa.string())
        if self.unknown.num_rows:
            hashes = np.full(len(self.codes), None, object)
            hashes[self.unknown.column("row").to_numpy()] = self.unknown.column("sha256").to_pylist()
            v_sha256 = pa.array(hashes, pa.string())
        listed = pa.table(
            {
                "uri": self.manifest.column("uri"),
                "status": pa.array(np.array(STATUSES, object)[self.codes], pa.string()),
                "_file": pa.array(self.files, pa.int32()),
                "v_sha256": v_sha256,
            }
        )
        gone = self.deleted.num_rows
        deleted = pa.table(
            {
                "uri": self.deleted.column("uri"),
                "status": pa.array([DELETED] * gone, pa.string()),
                "_file": self.deleted.column("_file"),
                "v_sha256": pa.nulls(gone, pa.string()),
            }
        )
        return pa.concat_tables([listed, deleted]).sort_by("uri")


class StoredSources:
    """The table's side of classify, read part by part as the uri ranges need it: the
    source columns of a 100M-row table are ~14 GiB, and no range needs more than the few
    parts whose uris overlap it (each part is sorted by uri; its span is in its footer).
    read(index) gives a part's VIEW_COLUMNS with `_file` = index."""

    def __init__(self, spans: list[tuple[str, str] | None], read):
        self.read = read
        self.spans = [span if span is not None else self._span_of(i) for i, span in enumerate(spans)]
        self.schema = VIEW_SCHEMA

    @classmethod
    def of_table(cls, table: TagTable, snapshot: Snapshot) -> StoredSources:
        def read(index: int) -> pa.Table:
            part = table.read_part(snapshot.files[index], VIEW_COLUMNS)
            return part.append_column("_file", pa.array(np.full(part.num_rows, index, np.int32)))

        return cls(table.uri_spans(snapshot), read)

    def _span_of(self, index: int) -> tuple[str, str] | None:
        uris = self.read(index).column("uri")
        return _min_max(uris.combine_chunks()) if len(uris) else None

    def rows_in(self, lo: str | None, hi: str | None) -> pa.Table:
        """Rows with lo <= uri < hi, from the parts whose spans overlap the range."""
        wanted = [i for i, span in enumerate(self.spans) if span is not None and _overlaps(span, lo, hi)]
        with ThreadPoolExecutor(READ_THREADS) as pool:  # object stores are latency-bound
            parts = list(pool.map(self.read, wanted))
        batches = [b for part in parts for b in part.cast(self.schema).to_batches() if b.num_rows]
        return _view_range(batches, [_min_max(b.column("uri")) for b in batches], lo, hi, self.schema)


def _overlaps(span: tuple[str, str], lo: str | None, hi: str | None) -> bool:
    least, most = span
    return not ((hi is not None and least >= hi) or (lo is not None and most < lo))


def classify(
    manifest: pa.Table, view: pa.Table | StoredSources, range_rows: int = CLASSIFY_RANGE_ROWS
) -> Changes:
    """Each listed row's status against the table (`view`: SOURCE_COLUMNS + sha256,
    error_kind, _file), by position into the listing sorted by uri; and the table's rows
    no longer listed (Changes).

    Joined by uri range, range_rows listed rows at a time: one join of the whole listing
    grew with it, ranges bound it and took less time (docs/benchmarks.md, 'The driver's
    ceilings, after (issue 24)'). Ranges are cut at the listing's own uris (sorted); the
    view's rows for a range come from its record batches whose uris overlap it (parts are
    sorted by uri)."""
    if manifest.column("uri").null_count:
        raise ValueError("classify: the listing has rows with no uri")
    manifest = manifest.sort_by("uri") if not _sorted(manifest.column("uri")) else manifest
    if isinstance(view, pa.Table):
        batches = [b for b in view.to_batches() if b.num_rows]
        spans = [_min_max(b.column("uri")) for b in batches]

        def rows_in(lo: str | None, hi: str | None) -> pa.Table:
            return _view_range(batches, spans, lo, hi, view.schema)
    else:
        rows_in = view.rows_in
    cuts, bounds = _cuts(manifest.column("uri"), range_rows)
    codes, files = np.full(manifest.num_rows, -1, np.int8), np.full(manifest.num_rows, -1, np.int32)
    deleted, unknown = [DELETED_SCHEMA.empty_table()], [UNKNOWN_SCHEMA.empty_table()]
    for start, stop, lo, hi in zip([0, *cuts], [*cuts, manifest.num_rows], [None, *bounds], [*bounds, None]):
        gone, unsure = _classify_range(
            manifest.slice(start, stop - start), start, rows_in(lo, hi), codes, files
        )
        deleted.append(gone)
        unknown.append(unsure)
    return Changes(manifest, codes, files, pa.concat_tables(deleted), pa.concat_tables(unknown))


def _cuts(uris: pa.ChunkedArray, range_rows: int) -> tuple[list[int], list[str]]:
    """Row positions every range_rows rows, each moved past repeats of the uri before it
    (a uri listed twice stays in one range), and the uri each range starts at."""
    cuts: list[int] = []
    bounds: list[str] = []
    at = range_rows
    while at < len(uris):
        before, uri = uris[at - 1].as_py(), uris[at].as_py()
        if uri != before:
            cuts.append(at)
            bounds.append(uri)
            at += range_rows
        else:
            at += 1
    return cuts, bounds


def _sorted(uris: pa.ChunkedArray) -> bool:
    if len(uris) < 2:
        return True
    earlier, later = uris.slice(0, len(uris) - 1), uris.slice(1)
    return bool(pc.all(pc.less_equal(earlier, later)).as_py())


def _min_max(uris: pa.Array) -> tuple[str, str]:
    extremes = pc.min_max(uris)
    return extremes["min"].as_py(), extremes["max"].as_py()


def _view_range(batches, spans, lo: str | None, hi: str | None, schema: pa.Schema) -> pa.Table:
    """The view's rows with lo <= uri < hi (None: unbounded)."""
    picked = []
    for batch, span in zip(batches, spans, strict=True):
        if not _overlaps(span, lo, hi):
            continue
        keep = pa.array(np.ones(batch.num_rows, bool))
        if lo is not None:
            keep = pc.and_(keep, pc.greater_equal(batch.column("uri"), lo))
        if hi is not None:
            keep = pc.and_(keep, pc.less(batch.column("uri"), hi))
        picked.append(batch.filter(keep))
    return pa.Table.from_batches(picked, schema=schema)


def _classify_range(
    manifest: pa.Table, start: int, view: pa.Table, codes: np.ndarray, files: np.ndarray
) -> tuple[pa.Table, pa.Table]:
    """One range: codes and files of its listed rows (manifest, from row `start` of the
    listing) filled in place; returns its deleted rows (uri order) and unknown rows."""
    rows = pa.array(np.arange(start, start + manifest.num_rows, dtype=np.int64))
    m = manifest.select(SOURCE_COLUMNS).append_column("_row", rows)
    v = view.select([*SOURCE_COLUMNS, "sha256", "error_kind", "_file"])
    v = v.rename_columns(["uri", *(f"v_{c}" for c in v.column_names[1:])]).append_column(
        "_v", pa.array(np.ones(view.num_rows, bool))
    )
    j = m.join(v, keys="uri", join_type="full outer")
    status = _statuses(j)
    in_m = j.column("_row").is_valid().to_numpy(zero_copy_only=False)
    listed = j.column("_row").fill_null(-1).to_numpy(zero_copy_only=False)[in_m]
    codes[listed] = status[in_m]
    files[listed] = j.column("v__file").fill_null(-1).to_numpy(zero_copy_only=False)[in_m]
    gone = j.filter(pa.array(~in_m)).select(["uri", "v__file"]).rename_columns(DELETED_SCHEMA.names)
    unsure = j.filter(pa.array(status == CODE[UNKNOWN])).select(["_row", "v_sha256"])
    return gone.sort_by("uri").cast(DELETED_SCHEMA), unsure.rename_columns(UNKNOWN_SCHEMA.names)


def _statuses(j: pa.Table) -> np.ndarray:
    """The status code of each row of the listing joined with the view (full outer)."""
    in_m = j.column("_row").is_valid().to_numpy(zero_copy_only=False)
    in_v = j.column("_v").is_valid().to_numpy(zero_copy_only=False)

    def valid(name):
        return j.column(name).is_valid().to_numpy(zero_copy_only=False)

    size_known = valid("source_size") & valid("v_source_size")
    size_same = same_values(j.column("source_size"), j.column("v_source_size"))
    etag_known = valid("etag") & valid("v_etag")
    mtime_known = valid("mtime") & valid("v_mtime")
    same_source = (
        np.where(
            etag_known,
            same_values(j.column("etag"), j.column("v_etag")),
            same_values(j.column("mtime"), j.column("v_mtime")),
        )
        & size_same
    )
    differs = size_known & ~size_same
    status = np.full(j.num_rows, CODE[UNCHANGED], np.int8)
    status[~in_v] = CODE[NEW]
    status[~in_m] = CODE[DELETED]
    both = in_m & in_v
    status[both & ~same_source] = CODE[CHANGED]
    status[both & ~(etag_known | mtime_known) & ~differs] = CODE[UNKNOWN]
    retry = (
        both
        & (status == CODE[UNCHANGED])
        & pc.is_in(j.column("v_error_kind"), pa.array(RETRY_ERROR_KINDS)).to_numpy(zero_copy_only=False)
    )
    status[retry] = CODE[RETRY]
    return status


def sha256_of(uris: list[str], storage_options: dict | None) -> list[str | None]:
    out: list[str | None] = []
    for uri in uris:
        try:
            out.append(hashlib.sha256(read_bytes(uri, storage_options)).hexdigest())
        except FileNotFoundError:
            out.append(None)
    return out


def _hash_in_ray(uris: list[str], storage_options: dict | None, ray_address: str | None, chunk: int) -> list:
    import ray

    from pipeline.core.ray_session import ensure_ray

    ensure_ray(ray_address)
    task = ray.remote(num_cpus=0.5, max_retries=3)(sha256_of)
    refs = [task.remote(uris[i : i + chunk], storage_options) for i in range(0, len(uris), chunk)]
    return [h for part in ray.get(refs) for h in part]


def resolve_unknown(
    changes: Changes, storage_options: dict | None, ray_address: str | None = None, chunk: int = 256
) -> Changes:
    """Rows the store gave no etag or mtime for: hash their bytes and compare with the
    stored sha256. Up to `chunk` of them are hashed here, so planning starts no Ray for a
    few; more in Ray tasks (ray_address as ensure_ray takes it)."""
    if not changes.unknown.num_rows:
        return changes
    unknown = changes.unknown.sort_by("row")
    rows = unknown.column("row").to_numpy()
    uris = changes.manifest.column("uri").take(pa.array(rows)).to_pylist()
    hashes = (
        sha256_of(uris, storage_options)
        if len(uris) <= chunk
        else _hash_in_ray(uris, storage_options, ray_address, chunk)
    )
    stored = unknown.column("sha256").to_pylist()
    same = np.array([h is not None and h == s for h, s in zip(hashes, stored, strict=True)], bool)
    codes = changes.codes.copy()
    codes[rows] = np.where(same, CODE[UNCHANGED], CODE[CHANGED])
    log.info("compared %d images without etag/mtime by sha256: %d changed", len(rows), int((~same).sum()))
    return dataclasses.replace(changes, codes=codes, unknown=UNKNOWN_SCHEMA.empty_table())
