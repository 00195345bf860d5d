"""`tagpipe tag`: list inputs, compare with the committed table, tag what is new or
changed, drop what is gone, commit one new version.

The driver only plans, routes finished rows into their slice's part file and commits;
decode and inference run in Ray tasks and actors placed by pipeline/job/graph.py, part
rewrites in Ray tasks (pipeline/job/rethreshold.py). Nothing is visible to readers until
the commit (pipeline/table/tag_table.py), and parts written before a crash are reused.

Why this module is long: it runs a whole tag job (listing, planning against the table,
tagging through Ray, rewrites, the commit and the run summary); splitting it into plan,
execute and commit modules is issue 23's part 4, still to do.
"""

from __future__ import annotations

import collections
import logging
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import __version__
from pipeline.core.errors import TagpipeError
from pipeline.core.progress import Progress, ProgressSettings
from pipeline.core.ray_session import ensure_ray, new_run_id
from pipeline.job.graph import (
    DECODE_NODE,
    TAGGER_NODE,
    build_tag_dataset,
    plan_placement,
)
from pipeline.job.incremental import (
    CHANGED,
    DELETED,
    NEW,
    RETRY,
    SOURCE_COLUMNS,
    UNCHANGED,
    classify,
    inference_key,
    part_name,
    parts_dir_key,
    resolve_unknown,
    reusable_parts,
    rules_key,
)
from pipeline.job.rethreshold import Retag
from pipeline.job.settings import TagJobConfig
from pipeline.job.tagger import TaggerSettings
from pipeline.model.bundle import load_bundle
from pipeline.model.postprocess import Postprocessor
from pipeline.storage.manifest import (
    MANIFEST_SCHEMA,
    ListingRules,
    build_manifest,
    listing_path,
)
from pipeline.table.rewrite import RewriteJob, rewrite_name, rewrite_parts
from pipeline.table.tag_table import (
    DATA_DIR,
    READ_THREADS,
    Snapshot,
    TagTable,
    now_iso,
    table_entries,
)

log = logging.getLogger(__name__)
SHARD = "_shard"


@dataclass
class RunSummary:
    run_id: str
    output: str
    change: str = ""  # first run | incremental | model changed | rules changed | no change
    files_found: int = 0  # files the listing found: listed + skipped files
    skipped_files: dict = field(
        default_factory=dict
    )  # found but not inputs, by reason (pipeline/storage/manifest.py)
    listed: int = 0  # inputs: one row each in the committed version
    new: int = 0  # listed, not in the table
    changed: int = 0  # in the table, source changed (etag / size+mtime / sha256)
    deleted: int = 0  # in the table, no longer listed: dropped from the new version
    skipped: int = 0  # unchanged, kept as they are (not recomputed)
    retried: int = 0  # unchanged but stored with a transient error (read_error, not_found)
    retagged: int = 0  # unchanged but re-tagged because the inference settings changed
    rethresholded: int = 0  # rows re-tagged from stored logits (rules changed), no inference
    reused: int = 0  # rows an interrupted run had already tagged
    images: int = 0  # rows tagged (model run) by this run
    ok: int = 0
    errors: int = 0  # error rows among those tagged by this run
    errors_by_kind: dict = field(default_factory=dict)
    rewritten_parts: int = 0  # parts copied without deleted/changed rows, or rethresholded
    parts: list = field(default_factory=list)  # parts written by tagging
    base_version: int = 0
    version: int = 0  # the committed version (= base_version when nothing changed)
    rows: int = 0  # rows in the committed version
    seconds: float = 0.0
    images_per_second: float = 0.0
    placement: str = ""
    model_name: str = ""
    model_sha256: str = ""
    timings: dict = field(default_factory=dict)
    rows_by_node: dict = field(default_factory=dict)  # {"decode": {node_id: rows}, "tag": {...}}
    to_tag: int = 0  # images the plan sends to the model (listed work less what is reused)
    planned_version: int = 0  # dry run: the version the run would commit; 0: none (no change)
    dry_run: bool = False  # the plan only: nothing was tagged or written

    def counts(self) -> dict:
        names = (
            "files_found",
            "listed",
            "new",
            "changed",
            "deleted",
            "skipped",
            "retried",
            "retagged",
            "rethresholded",
            "reused",
            "images",
            "errors",
            "rewritten_parts",
            "rows",
        )
        return {**{name: getattr(self, name) for name in names}, "skipped_files": dict(self.skipped_files)}

    def skipped_text(self) -> str:
        if not self.skipped_files:
            return ""
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped_files.items()))
        return f" ({self.files_found} files found, {sum(self.skipped_files.values())} skipped: {reasons})"

    def plan_text(self) -> str:
        outcome = (
            f"rewrite {self.rewritten_parts} part(s) and commit version {self.planned_version}"
            if self.planned_version
            else f"commit nothing: version {self.base_version} stays current"
        )
        return (
            f"dry run ({self.change}): {self.listed} listed{self.skipped_text()}, {self.new} new, "
            f"{self.changed} changed, {self.deleted} deleted, {self.skipped} unchanged, "
            f"{self.retried} to retry, {self.retagged} to re-tag for new settings; "
            f"would tag {self.to_tag} images ({self.reused} reused from an interrupted run), "
            f"{outcome} of {self.output}; nothing was written"
        )

    def text(self) -> str:
        if self.dry_run:
            return self.plan_text()
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_kind.items())) or "none"
        extra = "".join(
            f", {n} {name}"
            for name, n in (
                ("retried", self.retried),
                ("re-tagged for new settings", self.retagged),
                ("rethresholded", self.rethresholded),
                ("reused from an interrupted run", self.reused),
            )
            if n
        )
        skipped = self.skipped_text()
        return (
            f"run {self.run_id} ({self.change}): {self.listed} listed{skipped}, {self.new} new, "
            f"{self.changed} changed, {self.deleted} deleted, {self.skipped} unchanged{extra}; "
            f"{self.images} images tagged ({self.ok} ok, {self.errors} errors: {kinds}), "
            f"{self.images_per_second:.1f} img/s; version {self.version} "
            f"({self.rows} rows), {self.seconds:.1f} s -> {self.output}"
        )


class RunInterrupted(TagpipeError):
    """Ctrl-C during a run: the message says what was kept and how to resume."""


def run_tag_job(cfg: TagJobConfig, dry_run: bool = False) -> RunSummary:
    """Bring the table at cfg.output up to date with the inputs, then commit one version.
    dry_run: list and classify, and return the plan; nothing is tagged or written."""
    started = time.monotonic()
    bundle = load_bundle(cfg.model, cfg.profile)  # a bad bundle stops here, before any image
    rules = cfg.rules
    Postprocessor.for_bundle(bundle, rules)  # and so do rules the bundle cannot serve
    run_id = cfg.run_id or new_run_id()
    fp = bundle.fingerprint
    summary = RunSummary(
        run_id=run_id,
        output=cfg.output,
        model_name=bundle.name,
        model_sha256=fp.model_sha256,
        dry_run=dry_run,
    )
    keys = (inference_key(cfg, bundle), rules_key(bundle, rules))
    key = parts_dir_key(*keys)
    table = TagTable(cfg.output, cfg.storage_options)
    base = table.current() if dry_run else table.sync_current()
    summary.base_version = summary.version = base.version if base else 0
    ensure_ray(cfg.ray_address)
    import ray

    t = time.monotonic()
    extensions = frozenset(e.strip(". ").lower() for e in cfg.extensions)
    own = tuple(listing_path(entry, cfg.storage_options) for entry in table_entries(cfg.output))
    listing_rules = ListingRules(extensions, own, skip_sidecars=not cfg.list_sidecars)
    listing = build_manifest(
        list(cfg.inputs), cfg.storage_options, listing_rules, progress=_progress_settings(cfg)
    )
    manifest = listing.manifest
    summary.listed, summary.skipped_files, summary.files_found = (
        manifest.num_rows,
        listing.skipped,
        listing.found,
    )
    manifest_path = None if dry_run else table.write_input_manifest(run_id, manifest)
    summary.timings["list_seconds"] = _lap(t)

    t = time.monotonic()
    same_inference = base is not None and base.inference_key == keys[0]
    same_rules = same_inference and base is not None and base.rules_key == keys[1]
    view = table.read(base, [*SOURCE_COLUMNS, "sha256", "error_kind"], with_file=True) if base else None
    status = (
        classify(manifest, view) if view is not None and view.num_rows else classify(manifest, _empty_view())
    )
    status = resolve_unknown(status, cfg.storage_options)
    state = status.column("status").to_numpy(zero_copy_only=False)
    counts = collections.Counter(state.tolist())
    summary.new, summary.changed, summary.deleted = counts[NEW], counts[CHANGED], counts[DELETED]
    summary.change = (
        "first run"
        if base is None
        else "incremental"
        if same_rules
        else "rules changed"
        if same_inference
        else "inference settings changed"
    )
    if same_inference:
        summary.skipped, summary.retried = counts[UNCHANGED], counts[RETRY]
        redo = np.isin(state, [NEW, CHANGED, RETRY])
        drop = np.isin(state, [CHANGED, RETRY, DELETED])
    else:  # a new model (or decode/profile settings): every listed image is tagged again
        summary.retagged = counts[UNCHANGED] + counts[RETRY]
        redo = state != DELETED
        drop = np.ones(len(state), bool)
    _check_deletions(cfg, summary, base)
    to_infer = (
        manifest.filter(pc.is_in(manifest.column("uri"), status.column("uri").filter(pa.array(redo))))
        if redo.any()
        else manifest.slice(0, 0)
    )

    # parts an interrupted run with the same settings already wrote (newer than the base)
    since = _reuse_since(table, base)
    taken = set(base.files) if base else set()
    candidates = [p["file"] for p in table.list_parts(key) if p["file"] not in taken and p["mtime"] >= since]
    reuse = reusable_parts(candidates, table.read_part, to_infer)
    summary.reused = reuse.rows
    pending = (
        to_infer.filter(
            pc.invert(pc.is_in(to_infer.column("uri"), pa.array(sorted(reuse.uris), pa.string())))
        )
        if reuse.uris
        else to_infer
    )
    summary.timings["plan_seconds"] = _lap(t)
    summary.to_tag = pending.num_rows
    log.info(
        "%s: %d listed; %d new, %d changed, %d deleted, %d unchanged; "
        "%d to tag (%d reused from an interrupted run)",
        summary.change,
        summary.listed,
        summary.new,
        summary.changed,
        summary.deleted,
        summary.skipped,
        pending.num_rows,
        reuse.rows,
    )
    kept, jobs = _rewrite_plan(
        base, status, drop, same_inference, same_rules, table, key, bundle, rules, run_id
    )
    summary.rewritten_parts = len(jobs)
    commits = base is None or not same_inference or pending.num_rows or reuse.rows or jobs
    if dry_run:
        summary.planned_version = summary.base_version + 1 if commits else 0
        if not commits:
            summary.change = "no change"
        summary.seconds = round(time.monotonic() - started, 3)
        return summary

    try:
        t = time.monotonic()
        new_parts = (
            _tag(cfg, bundle, rules, run_id, pending, table, key, taken, summary, ray)
            if pending.num_rows
            else []
        )
        summary.timings["tag_seconds"] = _lap(t)
        summary.images_per_second = (
            round(summary.images / summary.timings["tag_seconds"], 2)
            if summary.images and summary.timings["tag_seconds"]
            else 0.0
        )

        # the base's parts: kept as they are, copied without dropped rows, or rethresholded
        t = time.monotonic()
        rewritten: list[str] = []
        for result in (
            rewrite_parts(jobs, cfg.storage_options, "rewriting", _progress_settings(cfg)) if jobs else []
        ):
            if result.file:
                rewritten.append(result.file)
            if not same_rules:
                summary.rethresholded += result.rows
        summary.timings["rewrite_seconds"] = _lap(t)
    except KeyboardInterrupt:
        raise RunInterrupted(_interrupted_text(table, summary)) from None

    files = [*kept, *rewritten, *reuse.files, *new_parts]
    if base is None or not same_inference or summary.images or summary.reused or summary.rewritten_parts:
        t = time.monotonic()
        snapshot = _commit(table, base, files, bundle, keys, rules, run_id, summary)
        summary.version, summary.rows = snapshot.version, snapshot.rows
        summary.timings["commit_seconds"] = _lap(t)
    else:
        summary.change = "no change"
        summary.rows = base.rows
    summary.seconds = round(time.monotonic() - started, 3)
    table.write_run_manifest(
        run_id,
        {
            "run_id": run_id,
            "tagpipe_version": __version__,
            "finished_at": now_iso(),
            "inputs": list(cfg.inputs),
            "input_manifest": manifest_path,
            "model_dir": str(bundle.directory),
            "profile": bundle.profile.name,
            "fingerprint": asdict(fp),
            "inference_key": keys[0],
            "rules_key": keys[1],
            "settings": cfg.model_dump(mode="json", exclude={"storage_options"}),
            "counts": summary.counts(),
            "skipped_examples": listing.skipped_examples,
            "timings": summary.timings,
            "summary": asdict(summary),
        },
    )
    return summary


def _rewrite_plan(
    base,
    status,
    drop,
    same_inference: bool,
    same_rules: bool,
    table: TagTable,
    key: str,
    bundle,
    rules,
    run_id: str,
):
    """The base's parts: (kept as they are, jobs that copy them without dropped rows or
    rethreshold them). Nothing of the base is kept when the inference settings changed."""
    kept: list[str] = []
    jobs: list[RewriteJob] = []
    if not same_inference:
        return kept, jobs
    fp = bundle.fingerprint
    files = status.column("_file").to_numpy(zero_copy_only=False)
    uris = status.column("uri").to_numpy(zero_copy_only=False)
    dropped = collections.defaultdict(list)
    for i in np.flatnonzero(drop & (files >= 0)):
        dropped[int(files[i])].append(uris[i])
    for index, file in enumerate(base.files):
        if same_rules and index not in dropped:
            kept.append(file)
            continue
        drop = tuple(dropped.get(index, []))
        retag = (
            None
            if same_rules
            else Retag(str(bundle.directory), rules, run_id, (fp.model_sha256, fp.calibration_sha256))
        )
        jobs.append(RewriteJob(table.uri, file, table.uri, rewrite_name(file, key, drop), drop, retag))
    return kept, jobs


def _reuse_since(table: TagTable, base) -> float:
    """Parts written after this time may be reused: from an hour before the version
    *before* the base was committed, so a run that lost a commit race to the base (it
    started from that earlier version) finds every part it wrote."""
    if base is None:
        return 0.0
    earlier = (
        table.snapshot(base.version - 1)
        if base.version > 1 and base.version - 1 in table.versions()
        else base
    )
    return datetime.fromisoformat(earlier.committed_at).timestamp() - 3600


def _interrupted_text(table: TagTable, summary: RunSummary) -> str:
    where = (
        f"{table.uri} is still at version {summary.base_version}"
        if summary.base_version
        else f"{table.uri} has no table yet"
    )
    if not summary.parts:
        return (
            f"nothing was committed: {where}. No part was finished; "
            "running the same command again starts the tagging over."
        )
    return (
        f"nothing was committed: {where}. This run wrote {len(summary.parts)} part(s) "
        f"of {summary.images} tagged images; they are kept, "
        "and running the same command again reuses them and tags the rest."
    )


def _progress_settings(cfg: TagJobConfig) -> ProgressSettings:
    return ProgressSettings(enabled=cfg.progress, interval=cfg.progress_interval)


def _lap(t: float) -> float:
    return round(time.monotonic() - t, 3)


def _empty_view() -> pa.Table:
    schema = (
        MANIFEST_SCHEMA.append(pa.field("sha256", pa.string()))
        .append(pa.field("error_kind", pa.string()))
        .append(pa.field("_file", pa.int32()))
    )
    return schema.empty_table()


def _check_deletions(cfg: TagJobConfig, summary: RunSummary, base) -> None:
    """A listing that lost most of the corpus is more likely a wrong or failing input
    than a mass deletion: stop before committing it."""
    if base is None or not base.rows or not summary.deleted:
        return
    fraction = summary.deleted / base.rows
    if fraction > cfg.max_delete_fraction:
        raise TagpipeError(
            f"this run would delete {summary.deleted} of the table's {base.rows} rows ({fraction:.0%}), "
            f"more than max_delete_fraction={cfg.max_delete_fraction}: is an input missing or misspelled? "
            f"Nothing was changed; to accept, rerun with --max-delete-fraction 1"
        )


def _tag(
    cfg,
    bundle,
    rules,
    run_id,
    pending: pa.Table,
    table: TagTable,
    key: str,
    taken: set,
    summary: RunSummary,
    ray,
) -> list[str]:
    """Tag `pending` on Ray; every complete slice becomes one part (not yet committed)."""
    shard_ids = np.arange(pending.num_rows, dtype=np.int64) // cfg.rows_per_part
    pending = pending.append_column(SHARD, pa.array(shard_ids))
    expected = collections.Counter(shard_ids.tolist())
    placement = plan_placement(cfg, ray.cluster_resources().get("GPU", 0))
    summary.placement = placement.describe()
    settings = TaggerSettings(
        model_dir=str(bundle.directory),
        profile=bundle.profile,
        provider=cfg.provider,
        intra_op_threads=placement.intra_op_threads,
        run_id=run_id,
        dense_logits=cfg.dense_logits_for(len(bundle.vocabulary)),
        normalise_in_graph=cfg.normalise_in_graph,
        rules=rules,
        batch_timeout=cfg.batch_timeout,
    )
    block_rows = max(cfg.decode_batch_size, 64)
    work = pending.select(["uri", SHARD])  # the rest of the manifest is joined back when a slice is written
    blocks = [work.slice(i, block_rows) for i in range(0, work.num_rows, block_rows)]
    dataset = build_tag_dataset(blocks, cfg, bundle.profile.preprocess, settings, placement)
    buffers: dict[int, list[pa.Table]] = collections.defaultdict(list)
    counts: collections.Counter = collections.Counter()
    nodes: dict[str, collections.Counter] = {"decode": collections.Counter(), "tag": collections.Counter()}
    written = []
    with Progress("tagging", pending.num_rows, "images", _progress_settings(cfg)) as progress:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for stage, column in (("decode", DECODE_NODE), ("tag", TAGGER_NODE)):
                nodes[stage].update(batch.column(column).to_pylist())
            batch = batch.drop_columns([DECODE_NODE, TAGGER_NODE])
            progress.update(batch.num_rows, batch.num_rows - batch.column("error_kind").null_count)
            shards = batch.column(SHARD).to_numpy()
            for shard in np.unique(shards).tolist():
                mask = shards == shard
                buffers[shard].append(batch.filter(pa.array(mask)))
                counts[shard] += int(mask.sum())
                if counts[shard] == expected[shard]:
                    written.append(
                        _write_slice(
                            table, buffers.pop(shard), pending, cfg.rows_per_part, key, taken, run_id, summary
                        )
                    )
    summary.rows_by_node = {stage: dict(counter) for stage, counter in nodes.items()}
    if buffers:  # Ray returned fewer rows than sent: write nothing partial; a rerun redoes them
        missing = {shard: f"{counts[shard]}/{expected[shard]}" for shard in sorted(buffers)}
        raise RuntimeError(
            f"slices came back incomplete (rows received/sent): {missing}; rerun to finish them"
        )
    return written


def _write_slice(
    table: TagTable,
    tables: list[pa.Table],
    pending: pa.Table,
    rows_per_part: int,
    key: str,
    taken: set,
    run_id: str,
    summary: RunSummary,
) -> str:
    rows = pa.concat_tables(tables, promote_options="default").sort_by("uri")
    shard = rows.column(SHARD)[0].as_py()
    start = int(shard) * rows_per_part  # pending is sorted and cut in order: slice k is rows [k*S, (k+1)*S)
    source = pending.slice(start, rows_per_part)
    if source.column("uri").to_pylist() != rows.column("uri").to_pylist():
        raise RuntimeError(f"slice {shard}: the rows that came back do not match the rows sent")
    rows = rows.drop_columns([SHARD])
    for name in ("source_size", "etag", "mtime"):
        rows = rows.append_column(name, source.column(name))
    file = posixpath.join(DATA_DIR, key, part_name(key, rows))
    if file in taken:  # the same sources retried with the same settings: never overwrite a committed part
        file = file.replace(".parquet", f"-{run_id}.parquet")
    table.write_part(file, rows)
    errors = rows.column("error_kind").drop_null().to_pylist()
    summary.parts.append(file)
    summary.images += rows.num_rows
    summary.errors += len(errors)
    summary.ok = summary.images - summary.errors
    for kind in errors:
        summary.errors_by_kind[kind] = summary.errors_by_kind.get(kind, 0) + 1
    return file


def _commit(table: TagTable, base, files: list[str], bundle, keys, rules, run_id: str, summary: RunSummary):
    """Check that the new version has exactly one row per listed image, then commit it."""
    with ThreadPoolExecutor(READ_THREADS) as pool:  # footers only; object stores are latency-bound
        total = sum(pool.map(lambda file: table.read_part_metadata(file).num_rows, files))
    if total != summary.listed:
        raise RuntimeError(
            f"the new version would hold {total} rows for {summary.listed} listed images; nothing committed"
        )
    summary.rows = total
    snapshot = Snapshot(
        version=(base.version if base else 0) + 1,
        files=tuple(sorted(files)),
        rows=total,
        model_sha256=bundle.fingerprint.model_sha256,
        inference_key=keys[0],
        rules_key=keys[1],
        run_id=run_id,
        committed_at=now_iso(),
        model_name=bundle.name,
        rules=rules.record(),
        counts=summary.counts(),
    )
    return table.commit(base, snapshot)
