"""`tagpipe tag`: list inputs, compare with the committed table, tag what is new or
changed, drop what is gone, commit one new version.

The driver lists and plans before Ray starts (a dry run or a run with nothing to do
never starts it), routes finished rows into their slice's part file and commits;
decode and inference run in Ray tasks and actors placed by pipeline/job/graph.py, part
rewrites in Ray tasks (pipeline/job/rethreshold.py). Nothing is visible to readers until
the commit (pipeline/table/tag_table.py), and parts written before a crash are reused.

The plan is pipeline/job/plan.py's (pure, table-driven tests), the slices' buffers
pipeline/job/slices.py's, the commit pipeline/table/tag_table.py's `commit_version`; this
module runs them in order, each step returning a frozen record (a PreparedRun, a
PlannedRun, what tagging wrote, a Committed), and builds the RunSummary once from them.
Several models: each gets its own records, tagged in one pass by pipeline/job/model_runs.py.

Why this module is long: it is every step of a run in order (list, plan, tag, rewrite,
label check, commit, record), for one model or several, each a short function; what each
step does is in its own module.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import posixpath
import re
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime

from pipeline import __version__
from pipeline.core.errors import TagpipeError
from pipeline.core.progress import ProgressSettings
from pipeline.core.ray_session import ensure_ray, joins_cluster, new_run_id
from pipeline.core.words import counted
from pipeline.corpus.source_match import check_source_match
from pipeline.job.changes import StoredSources, classify, resolve_unknown
from pipeline.job.edit_calibration import calibrate_edits
from pipeline.job.incremental import Keys, inference_key, rules_key
from pipeline.job.label_check import check_labels, configured_source_tags
from pipeline.job.model_runs import ModelRun, PlannedRun, PreparedRun, Tagged, tag_in_one_pass
from pipeline.job.plan import Change, Plan, empty_view, plan_run
from pipeline.job.preflight import (
    Preflight,
    check_tag_paths,
    check_workers,
    driver_preflight,
    empty_listing_text,
)
from pipeline.job.rethreshold import Rethreshold
from pipeline.job.run_summary import EditCalibration, PassSummary, RunCounts, RunSummary
from pipeline.job.setting_changes import changed_settings, served_keys
from pipeline.job.settings import TagJobConfig
from pipeline.job.slices import SliceWriter, WrittenPart
from pipeline.model.bundle import load_bundle
from pipeline.model.postprocess import Postprocessor
from pipeline.storage.manifest import Listing, ListingRules, build_manifest, listing_path, lists_without_ray
from pipeline.table.lease import held, warn_if_active
from pipeline.table.rewrite import RewriteJob, RewriteResult, rewrite_name, rewrite_parts
from pipeline.table.tag_table import Snapshot, TagTable, commit_version, now_iso, table_entries
from pipeline.table.version_fields import LabelCheckCounts, RulesRecord

log = logging.getLogger(__name__)
SAFE_FOLDER_NAME = re.compile(r"[A-Za-z0-9._-]+")  # a model's table folder under OUTPUT
INTERRUPT_SETTLE_SECONDS = 10.0  # on Ctrl-C, parts being written get this long to finish


class RunInterrupted(TagpipeError):
    """Ctrl-C during a run: the message says what was kept and how to resume."""


def run_tag_job(cfg: TagJobConfig, dry_run: bool = False) -> RunSummary:
    """Bring the table at cfg.output up to date with the inputs, then commit one version:
    plan (pure, pipeline/job/plan.py), execute (tag on Ray, rewrite parts), commit.
    dry_run: list and plan, and return the plan; nothing is tagged or written.
    One model; several: run_tag_pass."""
    if len(cfg.model) != 1:
        raise TagpipeError(
            f"model: {len(cfg.model)} given where one is taken (`tagpipe tag` takes several; nightly one)"
        )
    summary = run_tag_pass(cfg, dry_run)
    assert isinstance(summary, RunSummary)
    return summary


def run_tag_pass(cfg: TagJobConfig, dry_run: bool = False) -> RunSummary | PassSummary:
    """run_tag_job for one or several models. Several: one table each under cfg.output,
    each planned on its own, tagged in one pass (pipeline/job/model_runs.py), and
    committed each on its own; a PassSummary of their RunSummaries."""
    started = time.monotonic()
    run_id = cfg.run_id or new_run_id()
    check_tag_paths(cfg)  # before bundles load, the listing, or Ray: one line, nothing written
    prepared = model_runs(cfg, run_id, dry_run)  # bad bundles and rules stop here, before any image
    source = configured_source_tags(cfg)  # and so does a bad source tags file
    warned: set[str] = set()  # other runs active on a table: said at the start, and never twice
    for run in prepared:
        warned |= warn_if_active(run.table, run_id)
    timings: dict[str, float] = {}
    preflight = driver_preflight(cfg, run_id) if cfg.preflight and not dry_run else None
    if preflight and joins_cluster(cfg.ray_address):  # the cluster's nodes checked before the listing
        _start_ray(cfg, timings, preflight)
    listing = _list_before_ray(cfg, prepared, timings, preflight)
    if not listing.manifest.num_rows and not cfg.allow_empty:
        raise TagpipeError(empty_listing_text(cfg.inputs, listing.skipped))
    if source is not None:  # a source file that names almost none of the listed images stops here
        uris = [listing.manifest.column("uri").combine_chunks()]
        check_source_match(str(cfg.source_tags), source.column("uri"), uris, cfg.labels.source_match)
    planned = [_plan_model(run, listing, dry_run, timings) for run in prepared]
    if dry_run:
        seconds = _since(started)
        return _summaries([_dry_run_summary(p, listing, dict(timings), seconds) for p in planned], seconds)
    with contextlib.ExitStack() as leases:  # advisory: the commit is the arbiter (table/lease.py)
        for run in prepared:
            leases.enter_context(held(run.table, run_id))
            warned |= warn_if_active(run.table, run_id, warned)  # one that started while this one listed
        return _tag_and_commit(cfg, planned, listing, timings, started, source, preflight)


@dataclass(frozen=True)
class TaggedRun:
    """One table's work done before its commit: what tagging wrote, the base's parts
    rewritten, and the counts both make."""

    tagged: Tagged
    rewritten: tuple[RewriteResult, ...]
    counts: RunCounts
    timings: dict[str, float]  # the run's, with this table's first_rows_seconds


@dataclass(frozen=True)
class Committed:
    """One table after its commit step: the version it is at (None: nothing committed)."""

    snapshot: Snapshot | None
    version: int
    rows: int
    change: Change
    label_check: LabelCheckCounts | None  # --source-tags: the check's counts
    timings: dict[str, float]  # the table's, with the label check's and the commit's


def _tag_and_commit(
    cfg: TagJobConfig,
    planned: list[PlannedRun],
    listing: Listing,
    timings: dict,
    started: float,
    source,
    preflight: Preflight | None,
) -> RunSummary | PassSummary:
    """Tag, rewrite and commit each model's table (run_tag_pass, its leases held)."""
    if any(p.plan.commits for p in planned):  # only a run with work starts Ray
        _start_ray(cfg, timings, preflight)
    runs = [ModelRun(p, _slice_writer(p)) for p in planned]
    try:
        t = time.monotonic()
        tagged = _tag(cfg, runs, started)
        timings["tag_seconds"] = _lap(t)
        t = time.monotonic()
        rewritten = [_rewrite(p) for p in planned]
        timings["rewrite_seconds"] = _lap(t)
    except KeyboardInterrupt:
        _settle(runs)
        raise RunInterrupted(
            " ".join(_interrupted_text(r.table, r.prepared.base, r.writer.written) for r in runs)
        ) from None
    done = [
        _tagged_run(run.planned, tagged.get(index, Tagged()), rewritten[index], listing, timings)
        for index, run in enumerate(runs)
    ]
    return _summaries(_commit_each(runs, done, listing, started, source), _since(started))


def _tag(cfg: TagJobConfig, runs: list[ModelRun], started: float) -> dict[int, Tagged]:
    """What each model (by index) tagged, in one pass of the models with work."""
    active = [i for i, run in enumerate(runs) if run.plan.to_tag.num_rows]
    if not active:
        return {}
    tagged = tag_in_one_pass(cfg, [runs[i] for i in active], started, _progress_settings(cfg))
    return {active[k]: result for k, result in tagged.items()}


def _settle(runs: list[ModelRun]) -> None:
    """After Ctrl-C: every writer's parts in flight get one shared deadline to finish."""
    deadline = time.monotonic() + INTERRUPT_SETTLE_SECONDS
    for run in runs:
        if not run.writer.settle(timeout=max(0.0, deadline - time.monotonic())):
            return  # a second Ctrl-C: stop waiting


def _commit_each(
    runs: list[ModelRun], done: list[TaggedRun], listing: Listing, started: float, source
) -> list[RunSummary]:
    """Each table's commit, on its own: a table that fails to commit does not stop the
    others'; the failures are raised together after, naming each table. Edit calibration
    and the run manifests come after every commit, so no table's commit waits on another
    model's calibration."""
    failures, committed = [], []
    for run, work in zip(runs, done, strict=True):
        try:
            committed.append((run, work, _commit(run, work, source)))
        except Exception as exc:
            if len(runs) == 1:
                raise
            failures.append(f"{run.table.uri}: {exc}")
    summaries = []
    for run, work, commit in committed:
        try:
            summaries.append(_finish(run, work, commit, listing, started))
        except Exception as exc:
            if len(runs) == 1:
                raise
            failures.append(f"{run.table.uri}: {exc}")
    if failures:
        made = [run.table.uri for run, _, commit in committed if commit.snapshot is not None]
        raise TagpipeError(
            f"{len(failures)} of {counted(len(runs), 'tables')} did not commit ({'; '.join(failures)}); "
            f"committed: {', '.join(made) or 'none'}. Running the same command again finishes the rest"
        )
    return summaries


def _label_check(run: ModelRun, files: list[str], source) -> tuple[dict[str, str], LabelCheckCounts]:
    """Each of the version's parts with its labels file (the label sidecar: no part is
    rewritten; the data rule's thresholds are the whole table's, so every part is read),
    and the check's counts."""
    cfg = run.cfg
    labels, summary = check_labels(
        run.table,
        files,
        run.bundle,
        cfg.rules,
        cfg.labels,
        source,
        None,
        _progress_settings(cfg),
        cfg.ray_address,
    )
    return labels, summary.record()


def model_runs(cfg: TagJobConfig, run_id: str, dry_run: bool) -> list[PreparedRun]:
    """Every model's bundle loaded and checked against the rules, and its table opened,
    before any image is read. One model: its table is cfg.output; several: one table
    each, cfg.output/<model name>/ (two bundles of one name are refused)."""
    bundles = [
        load_bundle(model, cfg.profile[i] if cfg.profile else None) for i, model in enumerate(cfg.model)
    ]
    names = [b.name for b in bundles]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TagpipeError(
            f"model: two bundles are named {twice[0]!r}; with several models each writes its table "
            "to OUTPUT/<model name>/, so their names (model_metadata.json's name, else the folder) "
            "must differ"
        )
    unsafe = [n for n in names if len(bundles) > 1 and not SAFE_FOLDER_NAME.fullmatch(n) or n in (".", "..")]
    if unsafe:
        raise TagpipeError(
            f"model: the bundle name {unsafe[0]!r} cannot name its table's folder under OUTPUT; give "
            "model_metadata.json a name of letters, digits, '.', '_' and '-'"
        )
    runs = []
    for index, bundle in enumerate(bundles):
        output = cfg.output if len(bundles) == 1 else posixpath.join(cfg.output.rstrip("/"), bundle.name)
        one = cfg.for_model(index, output)
        Postprocessor.for_bundle(bundle, one.rules)  # rules the bundle cannot serve stop here
        table = TagTable(one.output, one.storage_options)
        base = table.current() if dry_run else table.sync_current()
        keys = served_keys(
            one, bundle, table, base, Keys(inference_key(one, bundle), rules_key(bundle, one.rules))
        )
        runs.append(PreparedRun(one, bundle, keys, table, base, run_id))
    return runs


def _plan_model(run: PreparedRun, listing: Listing, dry_run: bool, timings: dict) -> PlannedRun:
    """One model's plan from the shared listing, the settings it changed, and (unless
    dry) the listing's copy in its table."""
    manifest_path = None if dry_run else run.table.write_input_manifest(run.run_id, listing.manifest)
    t = time.monotonic()
    plan = _plan(run, listing.manifest)
    timings["plan_seconds"] = round(timings.get("plan_seconds", 0.0) + _lap(t), 3)
    changed = []
    if plan.change in (Change.RULES_CHANGED, Change.INFERENCE_CHANGED):
        changed = changed_settings(run.cfg, run.bundle, run.table, run.base)
    planned = PlannedRun(run, plan, manifest_path, tuple(changed))
    _log_plan(planned, listing.manifest.num_rows)
    return planned


def _rewrite(planned: PlannedRun) -> tuple[RewriteResult, ...]:
    run = planned.prepared
    # with source tags every part of the version is checked anew: no labels to take along
    labels = run.base.labels if run.base is not None and not run.cfg.source_tags else {}
    jobs = _rewrite_jobs(planned.plan, run, labels)
    if not jobs:
        return ()
    return tuple(rewrite_parts(jobs, run.cfg.storage_options, "rewriting", _progress_settings(run.cfg)))


def _tagged_run(
    planned: PlannedRun, tagged: Tagged, rewritten: tuple[RewriteResult, ...], listing: Listing, timings: dict
) -> TaggedRun:
    """What tagging and the rewrites did for one table, counted (each table's own first
    rows in its timings)."""
    plan = planned.plan
    images = sum(p.rows for p in tagged.parts)
    rethresholded = sum(r.rows for r in rewritten) if plan.rethreshold else 0
    counts = _run_counts(plan, listing, images, sum(_errors_by_kind(tagged).values()), rethresholded)
    first_rows = (
        {} if tagged.first_rows_seconds is None else {"first_rows_seconds": tagged.first_rows_seconds}
    )
    return TaggedRun(tagged, rewritten, counts, dict(timings) | first_rows)


def _run_counts(plan: Plan, listing: Listing, images: int, errors: int, rethresholded: int) -> RunCounts:
    c = plan.counts
    return RunCounts(
        files_found=listing.found,
        skipped_files=dict(listing.skipped),
        listed=listing.manifest.num_rows,
        new=c.new,
        changed=c.changed,
        deleted=c.deleted,
        skipped=c.skipped,
        retried=c.retried,
        reinferred=c.reinferred,
        rethresholded=rethresholded,
        reused=plan.reuse.rows,
        images=images,
        errors=errors,
        rewritten_parts=len(plan.rewrites),
    )


def _errors_by_kind(tagged: Tagged) -> dict[str, int]:
    errors: collections.Counter = collections.Counter()
    for part in tagged.parts:
        errors.update(part.errors_by_kind)
    return dict(errors)


def _commit(run: ModelRun, work: TaggedRun, source) -> Committed:
    """Commit the model's new version when its plan, or the label check, changes
    anything. Without source tags the labels files of kept and rewritten parts go along
    (new rows have none); with them every part is checked."""
    plan, base = run.plan, run.prepared.base
    timings = dict(work.timings)
    rewritten = [r.file for r in work.rewritten if r.file]
    files = [*plan.keep, *rewritten, *plan.reuse.files, *(p.file for p in work.tagged.parts)]
    labels = {f: base.labels[f] for f in plan.keep if base is not None and f in base.labels}
    labels |= {r.file: r.labels for r in work.rewritten if r.file and r.labels}
    label_check = None
    if source is not None and files:
        t = time.monotonic()
        labels, label_check = _label_check(run, files, source)
        timings["label_check_seconds"] = _lap(t)
    relabelled = base is not None and labels != base.labels
    if not (plan.commits or relabelled or (base is not None and sorted(files) != sorted(base.files))):
        version, rows = (base.version, base.rows) if base else (0, 0)
        return Committed(None, version, rows, plan.change, label_check, timings)
    t = time.monotonic()
    snapshot = commit_version(
        run.table,
        base,
        files,
        model_sha256=run.bundle.fingerprint.model_sha256,
        inference_key=run.prepared.keys.inference,
        rules_key=run.prepared.keys.rules,
        run_id=run.run_id,
        model_name=run.bundle.name,
        rules=RulesRecord.from_record(run.cfg.rules.record()),
        counts=work.counts.version_counts(work.counts.listed, label_check),
        expected_rows=work.counts.listed,
        labels=labels,
    )
    timings["commit_seconds"] = _lap(t)
    # nothing to tag or drop: the source tags' check alone changed the version
    change = plan.change if plan.commits else Change.SOURCE_TAGS_CHANGED
    return Committed(snapshot, snapshot.version, snapshot.rows, change, label_check, timings)


def _finish(
    run: ModelRun, work: TaggedRun, committed: Committed, listing: Listing, started: float
) -> RunSummary:
    """After the commit: a new inference key's edit calibration (never raises), then the
    summary and the run manifest."""
    calibration = calibrate_edits(run, committed.snapshot) if committed.snapshot is not None else None
    timings = dict(committed.timings)
    if calibration is not None:
        timings["edit_calibration_seconds"] = calibration.seconds
    summary = _run_summary(
        run.planned, work.counts, work.tagged, committed, calibration, timings, _since(started)
    )
    run.table.write_run_manifest(run.run_id, _run_record(run.planned, listing, summary))
    return summary


def _dry_run_summary(planned: PlannedRun, listing: Listing, timings: dict, seconds: float) -> RunSummary:
    """The plan as a summary: what the run would do."""
    counts = _run_counts(planned.plan, listing, 0, 0, 0)
    return _run_summary(planned, counts, Tagged(), None, None, timings, seconds)


def _run_summary(
    planned: PlannedRun,
    counts: RunCounts,
    tagged: Tagged,
    committed: Committed | None,
    calibration: EditCalibration | None,
    timings: dict[str, float],
    seconds: float,
) -> RunSummary:
    """The run's summary, from what its steps returned (committed None: a dry run)."""
    run, plan = planned.prepared, planned.plan
    base_version = run.base.version if run.base else 0
    tag_seconds = timings.get("tag_seconds", 0.0)
    return RunSummary(
        **{f.name: getattr(counts, f.name) for f in fields(RunCounts)},
        run_id=run.run_id,
        output=run.cfg.output,
        change=committed.change if committed else plan.change,
        ok=counts.images - counts.errors,
        errors_by_kind=_errors_by_kind(tagged),
        parts=tuple(p.file for p in tagged.parts),
        base_version=base_version,
        version=committed.version if committed else base_version,
        rows=committed.rows if committed else 0,
        seconds=seconds,
        images_per_second=round(counts.images / tag_seconds, 2) if counts.images and tag_seconds else 0.0,
        placement=tagged.placement,
        model_name=run.bundle.name,
        model_sha256=run.bundle.fingerprint.model_sha256,
        timings=timings,
        rows_by_node=tagged.rows_by_node,
        to_tag=plan.to_tag.num_rows,
        planned_version=base_version + 1 if committed is None and plan.commits else 0,
        dry_run=committed is None,
        label_check=committed.label_check if committed else None,
        settings_changed=planned.settings_changed,
        edit_calibration=calibration,
        busy=tagged.busy,
    )


def _summaries(summaries: list[RunSummary], seconds: float) -> RunSummary | PassSummary:
    """One model: its RunSummary; several: a PassSummary of them."""
    if len(summaries) == 1:
        return summaries[0]
    return PassSummary(tuple(summaries), seconds)


def _list_inputs(cfg: TagJobConfig, runs: list[PreparedRun]) -> Listing:
    """Every input, with the table's own folder and the listing rules left out (several
    models: all of OUTPUT, which holds their tables, past and present)."""
    extensions = frozenset(e.strip(". ").lower() for e in cfg.extensions)
    entries = table_entries(runs[0].table.uri) if len(runs) == 1 else (cfg.output.rstrip("/"),)
    own = tuple(listing_path(entry, cfg.storage_options) for entry in entries)
    rules = ListingRules(extensions, own, skip_sidecars=not cfg.list_sidecars)
    return build_manifest(list(cfg.inputs), cfg.storage_options, rules, progress=_progress_settings(cfg))


def _slice_writer(planned: PlannedRun) -> SliceWriter:
    """Parts encoded and written by Ray tasks, one in flight per 8 CPUs (at least 2; a
    run with nothing to tag started no Ray and writes none)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    in_flight = max(2, int(cpus) // 8)
    run, to_tag = planned.prepared, planned.plan.to_tag
    return SliceWriter(
        run.table, to_tag, run.cfg.rows_per_part, run.key, set(run.taken), run.run_id, True, in_flight
    )


def _list_before_ray(
    cfg: TagJobConfig, runs: list[PreparedRun], timings: dict[str, float], preflight: Preflight | None
) -> Listing:
    """The listing, before Ray: a dry run, a run with nothing to do and a missing input
    answer without starting Ray (what a cold local Ray costs: docs/benchmarks.md, 'Runs
    with nothing to tag: plan before Ray'). Only a
    folder walk on a store without key ranges lists in Ray tasks, so Ray starts first there."""
    if not lists_without_ray(list(cfg.inputs), cfg.storage_options):
        _start_ray(cfg, timings, preflight)
    t = time.monotonic()
    listing = _list_inputs(cfg, runs)
    timings["list_seconds"] = _lap(t)
    return listing


def _start_ray(cfg: TagJobConfig, timings: dict[str, float], preflight: Preflight | None) -> None:
    """Join or start Ray once there is work for it (a second call costs nothing), and
    check a joined cluster's nodes' storage access before any work (preflight.py) the first
    time. A local Ray's workers are this process's children, with its environment, which
    the driver's own check already covered."""
    t = time.monotonic()
    ensure_ray(cfg.ray_address)
    timings["ray_start_seconds"] = round(timings.get("ray_start_seconds", 0.0) + _lap(t), 3)
    if preflight is not None and joins_cluster(cfg.ray_address) and "preflight_seconds" not in timings:
        timings["preflight_seconds"] = round(check_workers(preflight), 3)


def _plan(run: PreparedRun, manifest) -> Plan:
    """The table's side of the plan read (the base's source columns, parts an interrupted
    run left), unknown sources hashed, then plan_run decides."""
    cfg, table, base = run.cfg, run.table, run.base
    changes = classify(manifest, StoredSources.of_table(table, base) if base else empty_view())
    changes = resolve_unknown(changes, cfg.storage_options, cfg.ray_address)
    since = _reuse_since(table, base)
    candidates = [
        p["file"] for p in table.list_parts(run.key) if p["file"] not in run.taken and p["mtime"] >= since
    ]
    return plan_run(changes, base, run.keys, candidates, table.read_part, cfg.max_delete_fraction)


def _log_plan(planned: PlannedRun, listed: int) -> None:
    plan = planned.plan
    log.info(
        "%s: %d listed; %d new, %d changed, %d deleted, %d unchanged; "
        "%d to tag (%d reused from an interrupted run)",
        plan.change,
        listed,
        plan.counts.new,
        plan.counts.changed,
        plan.counts.deleted,
        plan.counts.skipped,
        plan.to_tag.num_rows,
        plan.reuse.rows,
    )


def _run_record(planned: PlannedRun, listing: Listing, summary: RunSummary) -> dict:
    """The run manifest (_runs/<run_id>.json)."""
    run = planned.prepared
    return {
        "run_id": summary.run_id,
        "tagpipe_version": __version__,
        "finished_at": now_iso(),
        "inputs": list(run.cfg.inputs),
        "input_manifest": planned.manifest_path,
        "model_dir": str(run.bundle.directory),
        "profile": run.bundle.profile.name,
        "fingerprint": asdict(run.bundle.fingerprint),
        "inference_key": run.keys.inference,
        "rules_key": run.keys.rules,
        "settings": run.cfg.model_dump(mode="json", exclude={"storage_options"}),
        "counts": summary.counts().record(),
        "skipped_examples": listing.skipped_examples,
        "timings": summary.timings,
        "summary": asdict(summary),
    }


def _rewrite_jobs(plan: Plan, run: PreparedRun, labels: dict[str, str]) -> list[RewriteJob]:
    """The plan's rewrites as RewriteJobs: each part copied without its dropped rows (and
    its labels file, `labels`, without their labels), re-tagged from its stored logits
    when the rules changed."""
    fp, table = run.bundle.fingerprint, run.table
    rethreshold = Rethreshold(
        str(run.bundle.directory), run.cfg.rules, run.run_id, (fp.model_sha256, fp.calibration_sha256)
    )
    return [
        RewriteJob(
            table.uri,
            r.file,
            table.uri,
            rewrite_name(r.file, run.key, r.drop),
            r.drop,
            rethreshold if plan.rethreshold else None,
            labels.get(r.file),
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


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
