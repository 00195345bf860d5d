"""What a run must do against the committed table: keys, change detection, reuse.

Two keys decide how much work a changed setting costs:
- the inference key (model weights + vocabulary, preprocessing profile, decode
  settings, what logits are stored): a change re-tags every image;
- the rules key (calibration, OOD reference, thresholds): a change rethresholds the
  stored logits, with no inference.
Within one inference key an image is redone when its source changed: etag (with
size) where the store gives one, else size + mtime, else the sha256 of its bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import RETRYABLE_ERROR_KINDS
from pipeline.core.schemas import MANIFEST_SCHEMA
from pipeline.core.settings import KeyRole, settings_fields
from pipeline.model.bundle import ModelBundle
from pipeline.model.profiles import Activation, BundleFiles, Preprocess, Profile, Thresholds
from pipeline.model.rules import RuleSettings
from pipeline.storage.filesystem import read_bytes
from pipeline.table.tag_table import READ_THREADS, Snapshot, TagTable

if TYPE_CHECKING:
    from pipeline.job.settings import TagJobConfig

log = logging.getLogger(__name__)

SOURCE_COLUMNS = ["uri", "source_size", "etag", "mtime"]
RETRY_ERROR_KINDS = RETRYABLE_ERROR_KINDS  # transient at the time: tried again next run
NEW, CHANGED, UNCHANGED, DELETED, UNKNOWN, RETRY = (
    "new",
    "changed",
    "unchanged",
    "deleted",
    "unknown",
    "retry",
)


def _digest(value) -> str:
    return hashlib.sha256(
        json.dumps(
            value, sort_keys=True, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else repr(v)
        ).encode()
    ).hexdigest()


INFERENCE_KEY_VERSION = 2  # 1: the first keyed settings; 2: max_file_bytes, max_decode_memory
# Settings keyed as a value derived from them: what the model actually got.
DERIVED_FOR_KEY = {
    "draft_ratio": lambda cfg, tags: None if cfg.exact_decode else cfg.draft_ratio,
    "dense_logits": lambda cfg, tags: cfg.dense_logits_for(tags),
}


def settings_record(cfg: TagJobConfig, role: KeyRole, tags: int) -> dict:
    """The settings that join the `role` key, by their Setting markers (one definition in
    pipeline/job/settings.py). A field of key version 1 is always recorded; a later one
    only when it is not at its default, so adding a keyed setting leaves existing tables'
    keys as they were, and changing it from its default changes them."""
    record = {}
    for name, info, setting in settings_fields(type(cfg)):
        if not setting.key & role or setting.key_via:
            continue
        derive = DERIVED_FOR_KEY.get(name)
        value = derive(cfg, tags) if derive else getattr(cfg, name)
        if setting.key_since > 1 and value == info.get_default(call_default_factory=True):
            continue
        record[name] = value
    return record


def inference_key(cfg: TagJobConfig, bundle: ModelBundle) -> str:
    """Everything that decides a row's stored values: the model, its profile and the
    inference settings (settings_record); a change re-tags every image."""
    p = bundle.profile
    return _digest(
        {
            "model_sha256": bundle.fingerprint.model_sha256,
            "profile": profile_key(p),
            **settings_record(cfg, KeyRole.INFERENCE, len(bundle.vocabulary)),
            # profile fields and outputs added later join only when they differ from what
            # earlier versions did, so the keys of existing tables stay as they were
            **({"preprocess": p.preprocess.extra_key()} if p.preprocess.extra_key() else {}),
            **(
                {"embedding_output": bundle.embedding_output}
                if bundle.embedding_output != _old_embedding(bundle)
                else {}
            ),
        }
    )


def _old_embedding(bundle: ModelBundle) -> str | None:
    """The embedding output earlier versions used: the profile's, when the model has it."""
    name = bundle.profile.embedding_name
    return name if name in bundle.output_names else None


class _Spelt:
    """A repr given as text: how a value was written into keys of existing tables."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


_KEYED_AS = {Activation.SIGMOID_PROBABILITIES: _Spelt("<Activation.NONE: 'none'>")}  # its earlier name

# The profile fields in the keys, by class, in the order tagpipe 0.2 spelt them. Fields
# added since join through Preprocess.extra_key (PROFILE_EXTRA_KEY_FIELDS) only when not
# at their default; tests/test_settings.py fails on a profile field in neither list.
PROFILE_KEY_FIELDS: dict[type, tuple[str, ...]] = {
    BundleFiles: ("model", "vocabulary", "vocabulary_format", "tag_metrics", "ood_reference", "metadata"),
    Preprocess: (
        "width",
        "height",
        "resize_mode",
        "interpolation",
        "pad_color",
        "alpha_background",
        "value_range",
        "mean",
        "std",
        "channel_order",
        "layout",
        "alpha_order",
    ),
    Thresholds: ("default", "by_category"),  # the rules key's
}
PROFILE_EXTRA_KEY_FIELDS = ("resize_width", "resize_height", "rounding", "mean_std_order")


def _spell(value) -> _Spelt:
    """A profile record as the key spells it: Class(field=repr, ...) over its keyed fields."""
    fields = PROFILE_KEY_FIELDS[type(value)]
    return _Spelt(f"{type(value).__name__}({', '.join(f'{n}={getattr(value, n)!r}' for n in fields)})")


def profile_key(p: Profile) -> str:
    """The profile's part of the inference key, spelt field by field as tables written by
    earlier versions have it (tests/test_profile_import.py), so an upgrade re-tags nothing."""
    activation = _KEYED_AS.get(p.activation, p.activation)
    keyed = (p.name, _spell(p.files), _spell(p.preprocess), p.input_name, p.output_name, p.embedding_name)
    return repr((*keyed, activation))


def rules_key(bundle: ModelBundle, rules: RuleSettings) -> str:
    """What decides tags from stored logits: calibration, the profile's thresholds and
    the rule settings (RuleSettings.record); a change rethresholds, no inference."""
    return _digest(
        {
            "calibration_sha256": bundle.fingerprint.calibration_sha256,
            "profile_thresholds": repr(_spell(bundle.profile.thresholds)),
            "rules": rules.record(),
        }
    )


def parts_dir_key(inference: str, rules: str) -> str:
    return f"{inference[:16]}-{rules[:8]}"


def part_name(key: str, rows: pa.Table) -> str:
    """From the settings key and each row's uri and source identity: a rerun of the same
    work rewrites the same name, and new content never takes an old part's name."""
    digest = hashlib.sha256(key.encode())
    for uri, size, etag, mtime in zip(*(rows.column(c).to_pylist() for c in SOURCE_COLUMNS)):
        digest.update(f"\0{uri}\0{size}\0{etag}\0{mtime!r}".encode())
    return f"part-{digest.hexdigest()[:24]}.parquet"


def _same(a: pa.ChunkedArray, b: pa.ChunkedArray) -> np.ndarray:
    """Elementwise equality where two nulls are equal."""
    equal = pc.fill_null(pc.equal(a, b), False)
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    return pc.or_(equal, both_null).to_numpy(zero_copy_only=False)


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

    Joined by uri range, range_rows listed rows at a time: one join of 2M rows peaked at
    630 bytes a row (+1,257 MiB), in 200k-row ranges at +156 MiB, and took half the
    time. Ranges are cut at the listing's own uris (sorted); the view's rows for a range
    come from its record batches whose uris overlap it (parts are sorted by uri)."""
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
    size_same = _same(j.column("source_size"), j.column("v_source_size"))
    etag_known = valid("etag") & valid("v_etag")
    mtime_known = valid("mtime") & valid("v_mtime")
    same_source = (
        np.where(
            etag_known,
            _same(j.column("etag"), j.column("v_etag")),
            _same(j.column("mtime"), j.column("v_mtime")),
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


def resolve_unknown(status: pa.Table, storage_options: dict | None, chunk: int = 256) -> pa.Table:
    """Rows the store gave no etag or mtime for: hash their bytes (Ray tasks) and compare
    with the stored sha256."""
    unknown = pc.equal(status.column("status"), UNKNOWN).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(unknown)
    if not len(rows):
        return status
    import ray

    values = status.column("status").to_numpy(zero_copy_only=False)
    uris = status.column("uri").take(pa.array(rows)).to_pylist()
    task = ray.remote(num_cpus=0.5, max_retries=3)(sha256_of)
    hashes = [
        h
        for part in ray.get(
            [task.remote(uris[i : i + chunk], storage_options) for i in range(0, len(uris), chunk)]
        )
        for h in part
    ]
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


@dataclass
class Reuse:
    files: list[str] = field(default_factory=list)
    uris: set = field(default_factory=set)
    rows: int = 0
    errors: int = 0


def reusable_parts(candidates: list[str], read_part, to_infer: pa.Table) -> Reuse:
    """Parts an interrupted run wrote with the same settings whose every row is still
    wanted with the same source identity: taken as they are, not tagged again."""
    reuse = Reuse()
    if not candidates or not to_infer.num_rows:
        return reuse
    wanted = to_infer.select(SOURCE_COLUMNS).rename_columns(["uri", *(f"w_{c}" for c in SOURCE_COLUMNS[1:])])
    wanted = wanted.append_column("_w", pa.array(np.ones(wanted.num_rows, bool)))
    for file in candidates:
        part = read_part(file, [*SOURCE_COLUMNS, "error_kind"])
        j = part.join(wanted, keys="uri", join_type="left outer")
        ok = j.column("_w").is_valid().to_numpy(zero_copy_only=False)
        for c in SOURCE_COLUMNS[1:]:
            ok &= _same(j.column(c), j.column(f"w_{c}"))
        uris = set(part.column("uri").to_pylist())
        if part.num_rows and ok.all() and not (uris & reuse.uris):
            reuse.files.append(file)
            reuse.uris |= uris
            reuse.rows += part.num_rows
            reuse.errors += part.num_rows - part.column("error_kind").null_count
    return reuse
