"""Which listed images are new, changed, unchanged, deleted or to retry: the listing
against the table's current version, by uri range.

A single full-outer join of a 2M-row listing with the table's source columns peaked at
630 bytes a row; in 200k-row uri ranges it takes a tenth of that, in half the time.
Ranges are cut at the sorted listing's own uris (never between two rows of one uri),
and the table's side is read part by part as the ranges need it (StoredSources: parts
are sorted by uri, their spans come from their footers). Sources the store gave neither
etag nor mtime for are compared by the sha256 of their bytes (Ray tasks).
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor

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


VIEW_COLUMNS = [*SOURCE_COLUMNS, "sha256", "error_kind"]
# the table's side of classify: its rows' sources, content hash, error, and part index
VIEW_SCHEMA = (
    MANIFEST_SCHEMA.append(pa.field("sha256", pa.string()))
    .append(pa.field("error_kind", pa.string()))
    .append(pa.field("_file", pa.int32()))
)


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
) -> pa.Table:
    """One row per uri in either, in uri order: uri, status, _file (the view part holding
    it, or -1), v_sha256 (stored content hash, for unknown sources). `view` has SOURCE_COLUMNS + sha256,
    error_kind, _file.

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
    out = []
    for start, stop, lo, hi in zip([0, *cuts], [*cuts, manifest.num_rows], [None, *bounds], [*bounds, None]):
        out.append(_classify_range(manifest.slice(start, stop - start), rows_in(lo, hi)))
    return pa.concat_tables(out)


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


def _classify_range(manifest: pa.Table, view: pa.Table) -> pa.Table:
    m = manifest.select(SOURCE_COLUMNS).append_column("_m", pa.array(np.ones(manifest.num_rows, bool)))
    v = view.select([*SOURCE_COLUMNS, "sha256", "error_kind", "_file"])
    v = v.rename_columns(["uri", *(f"v_{c}" for c in v.column_names[1:])]).append_column(
        "_v", pa.array(np.ones(view.num_rows, bool))
    )
    j = m.join(v, keys="uri", join_type="full outer").sort_by("uri")
    in_m = j.column("_m").is_valid().to_numpy(zero_copy_only=False)
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
    status = np.full(j.num_rows, UNCHANGED, object)
    status[~in_v] = NEW
    status[~in_m] = DELETED
    both = in_m & in_v
    status[both & ~same_source] = CHANGED
    status[both & ~(etag_known | mtime_known) & ~differs] = UNKNOWN
    retry = (
        both
        & (status == UNCHANGED)
        & pc.is_in(j.column("v_error_kind"), pa.array(RETRY_ERROR_KINDS)).to_numpy(zero_copy_only=False)
    )
    status[retry] = RETRY
    return pa.table(
        {
            "uri": j.column("uri"),
            "status": pa.array(status, pa.string()),
            "_file": j.column("v__file").fill_null(-1),
            # only unknown sources are compared by content: no 64-byte hash per row kept
            "v_sha256": pc.if_else(pa.array(status == UNKNOWN), j.column("v_sha256"), None),
        }
    )


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
    status: pa.Table, storage_options: dict | None, ray_address: str | None = None, chunk: int = 256
) -> pa.Table:
    """Rows the store gave no etag or mtime for: hash their bytes and compare with the
    stored sha256. Up to `chunk` of them are hashed here, so planning starts no Ray for a
    few; more in Ray tasks (ray_address as ensure_ray takes it)."""
    unknown = pc.equal(status.column("status"), UNKNOWN).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(unknown)
    if not len(rows):
        return status
    values = status.column("status").to_numpy(zero_copy_only=False)
    uris = status.column("uri").take(pa.array(rows)).to_pylist()
    hashes = (
        sha256_of(uris, storage_options)
        if len(uris) <= chunk
        else _hash_in_ray(uris, storage_options, ray_address, chunk)
    )
    stored = status.column("v_sha256").take(pa.array(rows)).to_pylist()
    values = values.copy()
    values[rows] = [UNCHANGED if h is not None and h == s else CHANGED for h, s in zip(hashes, stored)]
    log.info(
        "compared %d images without etag/mtime by sha256: %d changed",
        len(rows),
        int((values[rows] == CHANGED).sum()),
    )
    return status.set_column(
        status.schema.get_field_index("status"), "status", pa.array(values.tolist(), pa.string())
    )
