"""`tagpipe tag`: list inputs, compare with the committed table, tag what is new or
changed, drop what is gone, commit one new version.

The driver only plans, routes finished rows into their slice's part file and commits;
decode and inference run in Ray tasks and actors placed by pipeline/job/graph.py, part
rewrites in Ray tasks (pipeline/job/rethreshold.py). Nothing is visible to readers until
the commit (pipeline/table/tag_table.py), and parts written before a crash are reused.

The plan is pipeline/job/plan.py's (pure, table-driven tests), the slices' buffers
pipeline/job/slices.py's, the commit pipeline/table/tag_table.py's `commit_version`; this
module runs them in order and builds the RunSummary from what each returned.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime

from pipeline import __version__
from pipeline.core.errors import TagpipeError
from pipeline.core.progress import Progress, ProgressSettings
from pipeline.core.ray_session import ensure_ray, new_run_id
from pipeline.job.changes import StoredSources, classify, resolve_unknown
from pipeline.job.graph import DECODE_NODE, TAGGER_NODE, build_tag_dataset, plan_placement
from pipeline.job.incremental import inference_key, parts_dir_key, rules_key
from pipeline.job.plan import Plan, empty_view, plan_run
from pipeline.job.rethreshold import Retag
from pipeline.job.run_summary import RunSummary
from pipeline.job.settings import TagJobConfig
from pipeline.job.slices import SliceWriter, WrittenPart
from pipeline.job.tagger import TaggerSettings
from pipeline.model.bundle import load_bundle
from pipeline.model.postprocess import Postprocessor
from pipeline.storage.manifest import ListingRules, build_manifest, listing_path, lists_without_ray
from pipeline.table.rewrite import RewriteJob, rewrite_name, rewrite_parts
from pipeline.table.tag_table import TagTable, commit_version, now_iso, table_entries

log = logging.getLogger(__name__)
SHARD = "_shard"
INTERRUPT_SETTLE_SECONDS = 10.0  # on Ctrl-C, parts being written get this long to finish


class RunInterrupted(TagpipeError):
    """Ctrl-C during a run: the message says what was kept and how to resume."""


def run_tag_job(cfg: TagJobConfig, dry_run: bool = False) -> RunSummary:
    """Bring the table at cfg.output up to date with the inputs, then commit one version:
    plan (pure, pipeline/job/plan.py), execute (tag on Ray, rewrite parts), commit.
    dry_run: list and plan, and return the plan; nothing is tagged or written."""
    started = time.monotonic()
    bundle = load_bundle(cfg.model, cfg.profile)  # a bad bundle stops here, before any image
    rules = cfg.rules
    Postprocessor.for_bundle(bundle, rules)  # and so do rules the bundle cannot serve
    run_id = cfg.run_id or new_run_id()
    keys = (inference_key(cfg, bundle), rules_key(bundle, rules))
    key = parts_dir_key(*keys)
    table = TagTable(cfg.output, cfg.storage_options)
    base = table.current() if dry_run else table.sync_current()
    timings: dict[str, float] = {}
    listing = _list_while_ray_starts(cfg, table, timings)
    manifest_path = None if dry_run else table.write_input_manifest(run_id, listing.manifest)
    t = time.monotonic()
    taken = set(base.files) if base else set()  # parts a version names: never reused, never overwritten
    plan = _plan(cfg, table, base, taken, key, keys, listing.manifest)
    timings["plan_seconds"] = _lap(t)
    summary = _planned_summary(cfg, run_id, bundle, base, listing, plan, dry_run)
    _log_plan(summary)
    if dry_run:
        summary.timings = timings
        summary.seconds = round(time.monotonic() - started, 3)
        return summary

    writer = _slice_writer(cfg, table, plan, key, taken, run_id)
    try:
        t = time.monotonic()
        tagged = _tag(cfg, bundle, rules, run_id, writer, started) if plan.to_tag.num_rows else Tagged()
        timings["tag_seconds"] = _lap(t)
        t = time.monotonic()
        jobs = _rewrite_jobs(plan, table, key, bundle, rules, run_id)
        progress = _progress_settings(cfg)
        rewritten = rewrite_parts(jobs, cfg.storage_options, "rewriting", progress) if jobs else []
        timings["rewrite_seconds"] = _lap(t)
    except KeyboardInterrupt:
        writer.settle(timeout=INTERRUPT_SETTLE_SECONDS)
        raise RunInterrupted(_interrupted_text(table, base, writer.written)) from None
    _add_results(summary, tagged, rewritten, plan, timings)

    if plan.commits:
        t = time.monotonic()
        files = [*plan.keep, *(r.file for r in rewritten if r.file), *plan.reuse.files, *summary.parts]
        snapshot = commit_version(
            table,
            base,
            files,
            model_sha256=bundle.fingerprint.model_sha256,
            inference_key=keys[0],
            rules_key=keys[1],
            run_id=run_id,
            model_name=bundle.name,
            rules=rules.record(),
            counts=summary.counts() | {"rows": summary.listed},
            expected_rows=summary.listed,
        )
        summary.version, summary.rows = snapshot.version, snapshot.rows
        timings["commit_seconds"] = _lap(t)
    else:
        summary.rows = base.rows if base else 0
    summary.timings = timings
    summary.seconds = round(time.monotonic() - started, 3)
    table.write_run_manifest(run_id, _run_record(cfg, bundle, keys, listing, manifest_path, summary))
    return summary


def _list_inputs(cfg: TagJobConfig, table: TagTable):
    """Every input, with the table's own folder and the listing rules left out."""
    extensions = frozenset(e.strip(". ").lower() for e in cfg.extensions)
    own = tuple(listing_path(entry, cfg.storage_options) for entry in table_entries(cfg.output))
    rules = ListingRules(extensions, own, skip_sidecars=not cfg.list_sidecars)
    return build_manifest(list(cfg.inputs), cfg.storage_options, rules, progress=_progress_settings(cfg))


def _slice_writer(cfg: TagJobConfig, table: TagTable, plan: Plan, key: str, taken: set[str], run_id: str):
    """Parts encoded and written by Ray tasks, one in flight per 8 CPUs (at least 2)."""
    import ray

    in_flight = max(2, int(ray.cluster_resources().get("CPU", 0)) // 8)
    return SliceWriter(table, plan.to_tag, cfg.rows_per_part, key, taken, run_id, True, in_flight)


def _list_while_ray_starts(cfg: TagJobConfig, table: TagTable, timings: dict[str, float]):
    """The listing, on a thread while Ray starts (a cold local Ray takes ~4 s; a big
    listing much longer: neither waits for the other), when it needs no Ray itself (a
    folder walk on other stores runs Ray tasks: then Ray first). Planning needs Ray
    (unknown sources are hashed in tasks), so it comes after both. The thread is a daemon:
    Ctrl-C or a failed Ray start ends the process without waiting for the listing."""
    import threading

    def timed_listing():
        t = time.monotonic()
        try:
            result["listing"] = _list_inputs(cfg, table)
        except BaseException as exc:  # re-raised on the main thread
            result["error"] = exc
        timings["list_seconds"] = _lap(t)

    result: dict = {}
    thread = threading.Thread(target=timed_listing, name="listing", daemon=True)
    meanwhile = lists_without_ray(list(cfg.inputs), cfg.storage_options)
    if meanwhile:
        thread.start()
    t = time.monotonic()
    ensure_ray(cfg.ray_address)
    timings["ray_start_seconds"] = _lap(t)
    if not meanwhile:
        thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["listing"]


def _plan(
    cfg: TagJobConfig, table: TagTable, base, taken: set[str], key: str, keys: tuple[str, str], manifest
):
    """The table's side of the plan read (the base's source columns, parts an interrupted
    run left), unknown sources hashed, then plan_run decides."""
    status = classify(manifest, StoredSources.of_table(table, base) if base else empty_view())
    status = resolve_unknown(status, cfg.storage_options)
    since = _reuse_since(table, base)
    candidates = [p["file"] for p in table.list_parts(key) if p["file"] not in taken and p["mtime"] >= since]
    return plan_run(manifest, status, base, keys, candidates, table.read_part, cfg.max_delete_fraction)


def _planned_summary(cfg, run_id, bundle, base, listing, plan: Plan, dry_run: bool) -> RunSummary:
    base_version = base.version if base else 0
    return RunSummary(
        run_id=run_id,
        output=cfg.output,
        change=plan.change.value,
        files_found=listing.found,
        skipped_files=listing.skipped,
        listed=listing.manifest.num_rows,
        new=plan.counts.new,
        changed=plan.counts.changed,
        deleted=plan.counts.deleted,
        skipped=plan.counts.skipped,
        retried=plan.counts.retried,
        retagged=plan.counts.retagged,
        reused=plan.reuse.rows,
        rewritten_parts=len(plan.rewrites),
        base_version=base_version,
        version=base_version,
        model_name=bundle.name,
        model_sha256=bundle.fingerprint.model_sha256,
        to_tag=plan.to_tag.num_rows,
        planned_version=base_version + 1 if dry_run and plan.commits else 0,
        dry_run=dry_run,
    )


def _log_plan(summary: RunSummary) -> None:
    log.info(
        "%s: %d listed; %d new, %d changed, %d deleted, %d unchanged; "
        "%d to tag (%d reused from an interrupted run)",
        summary.change,
        summary.listed,
        summary.new,
        summary.changed,
        summary.deleted,
        summary.skipped,
        summary.to_tag,
        summary.reused,
    )


def _add_results(summary: RunSummary, tagged: Tagged, rewritten: list, plan: Plan, timings: dict) -> None:
    """The summary's outcome, from what tagging and the rewrites returned."""
    summary.parts = [p.file for p in tagged.parts]
    summary.images = sum(p.rows for p in tagged.parts)
    errors: collections.Counter = collections.Counter()
    for part in tagged.parts:
        errors.update(part.errors_by_kind)
    summary.errors_by_kind, summary.errors = dict(errors), sum(errors.values())
    summary.ok = summary.images - summary.errors
    summary.placement, summary.rows_by_node = tagged.placement, tagged.rows_by_node
    if tagged.first_rows_seconds is not None:
        timings["first_rows_seconds"] = tagged.first_rows_seconds
    summary.rethresholded = sum(r.rows for r in rewritten) if plan.rethreshold else 0
    seconds = timings.get("tag_seconds", 0.0)
    summary.images_per_second = round(summary.images / seconds, 2) if summary.images and seconds else 0.0


def _run_record(cfg, bundle, keys, listing, manifest_path, summary: RunSummary) -> dict:
    """The run manifest (_runs/<run_id>.json)."""
    return {
        "run_id": summary.run_id,
        "tagpipe_version": __version__,
        "finished_at": now_iso(),
        "inputs": list(cfg.inputs),
        "input_manifest": manifest_path,
        "model_dir": str(bundle.directory),
        "profile": bundle.profile.name,
        "fingerprint": asdict(bundle.fingerprint),
        "inference_key": keys[0],
        "rules_key": keys[1],
        "settings": cfg.model_dump(mode="json", exclude={"storage_options"}),
        "counts": summary.counts(),
        "skipped_examples": listing.skipped_examples,
        "timings": summary.timings,
        "summary": asdict(summary),
    }


def _rewrite_jobs(plan: Plan, table: TagTable, key: str, bundle, rules, run_id: str) -> list[RewriteJob]:
    """The plan's rewrites as RewriteJobs: each part copied without its dropped rows,
    and re-tagged from its stored logits when the rules changed."""
    fp = bundle.fingerprint
    retag = Retag(str(bundle.directory), rules, run_id, (fp.model_sha256, fp.calibration_sha256))
    return [
        RewriteJob(
            table.uri,
            r.file,
            table.uri,
            rewrite_name(r.file, key, r.drop),
            r.drop,
            retag if plan.rethreshold else None,
        )
        for r in plan.rewrites
    ]


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


def _interrupted_text(table: TagTable, base, written: list[WrittenPart]) -> str:
    where = f"{table.uri} is still at version {base.version}" if base else f"{table.uri} has no table yet"
    if not written:
        return (
            f"nothing was committed: {where}. No part was finished; "
            "running the same command again starts the tagging over."
        )
    return (
        f"nothing was committed: {where}. This run wrote {len(written)} part(s) "
        f"of {sum(p.rows for p in written)} tagged images; they are kept, "
        "and running the same command again reuses them and tags the rest."
    )


def _progress_settings(cfg: TagJobConfig) -> ProgressSettings:
    return ProgressSettings(enabled=cfg.progress, interval=cfg.progress_interval)


def _lap(t: float) -> float:
    return round(time.monotonic() - t, 3)


@dataclass
class Tagged:
    """What tagging returned: the parts written, where the work ran."""

    parts: list[WrittenPart] = field(default_factory=list)
    placement: str = ""
    rows_by_node: dict = field(default_factory=dict)  # {"decode": {node_id: rows}, "tag": {...}}
    first_rows_seconds: float | None = None  # from the run's start to the first tagged rows


def _tag(cfg: TagJobConfig, bundle, rules, run_id: str, writer: SliceWriter, run_started: float) -> Tagged:
    """Tag the writer's pending rows on Ray; every complete slice becomes one part (not
    yet committed). first_rows_seconds: from the run's start to the first tagged rows."""
    import ray

    placement = plan_placement(cfg, ray.cluster_resources().get("GPU", 0))
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
    work = writer.work()  # the rest of the manifest is joined back when a slice is written
    blocks = [work.slice(i, block_rows) for i in range(0, work.num_rows, block_rows)]
    dataset = build_tag_dataset(blocks, cfg, bundle.profile.preprocess, settings, placement)
    nodes: dict[str, collections.Counter] = {"decode": collections.Counter(), "tag": collections.Counter()}
    first_rows = None
    with Progress("tagging", work.num_rows, "images", _progress_settings(cfg)) as progress:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            first_rows = first_rows or _lap(run_started)
            for stage, column in (("decode", DECODE_NODE), ("tag", TAGGER_NODE)):
                nodes[stage].update(batch.column(column).to_pylist())
            batch = batch.drop_columns([DECODE_NODE, TAGGER_NODE])
            progress.update(batch.num_rows, batch.num_rows - batch.column("error_kind").null_count)
            writer.add(batch)
    parts = writer.finish()  # Ray returned fewer rows than sent: nothing partial; a rerun redoes them
    rows_by_node = {stage: dict(counter) for stage, counter in nodes.items()}
    return Tagged(parts, placement.describe(), rows_by_node, first_rows)
