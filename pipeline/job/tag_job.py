"""`tagpipe tag`: list inputs, compare with the committed table, tag what is new or
changed, drop what is gone, commit one new version.

The driver lists and plans before Ray starts (a dry run or a run with nothing to do
never starts it), routes finished rows into their slice's part file and commits;
decode and inference run in Ray tasks and actors placed by pipeline/job/graph.py, part
rewrites in Ray tasks (pipeline/job/rethreshold.py). Nothing is visible to readers until
the commit (pipeline/table/tag_table.py), and parts written before a crash are reused.

The plan is pipeline/job/plan.py's (pure, table-driven tests), the slices' buffers
pipeline/job/slices.py's, the commit pipeline/table/tag_table.py's `commit_version`; this
module runs them in order and builds the RunSummary from what each returned. Several
models: each gets a ModelRun (its table, plan and writer), tagged in one pass by
pipeline/job/model_runs.py.

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
from dataclasses import asdict
from datetime import datetime

from pipeline import __version__
from pipeline.core.errors import TagpipeError
from pipeline.core.progress import ProgressSettings
from pipeline.core.ray_session import ensure_ray, new_run_id
from pipeline.core.words import counted
from pipeline.corpus.source_match import check_source_match
from pipeline.job.changes import StoredSources, classify, resolve_unknown
from pipeline.job.edit_calibration import calibrate_edits
from pipeline.job.incremental import inference_key, rules_key
from pipeline.job.label_check import check_labels, configured_source_tags
from pipeline.job.model_runs import ModelRun, Tagged, tag_in_one_pass
from pipeline.job.plan import Change, Plan, empty_view, plan_run
from pipeline.job.preflight import check_tag_paths, empty_listing_text
from pipeline.job.rethreshold import Retag
from pipeline.job.run_summary import PassSummary, RunSummary
from pipeline.job.setting_changes import changed_settings, served_keys
from pipeline.job.settings import TagJobConfig
from pipeline.job.slices import SliceWriter, WrittenPart
from pipeline.model.bundle import load_bundle
from pipeline.model.postprocess import Postprocessor
from pipeline.storage.manifest import ListingRules, build_manifest, listing_path, lists_without_ray
from pipeline.table.lease import held, warn_if_active
from pipeline.table.rewrite import RewriteJob, rewrite_name, rewrite_parts
from pipeline.table.tag_table import Snapshot, TagTable, commit_version, now_iso, table_entries

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
    runs = model_runs(cfg, run_id, dry_run)  # bad bundles and rules stop here, before any image
    source = configured_source_tags(cfg)  # and so does a bad source tags file
    warned: set[str] = set()  # other runs active on a table: said at the start, and never twice
    for run in runs:
        warned |= warn_if_active(run.table, run_id)
    timings: dict[str, float] = {}
    listing = _list_before_ray(cfg, runs, timings)
    if not listing.manifest.num_rows and not cfg.allow_empty:
        raise TagpipeError(empty_listing_text(cfg.inputs, listing.skipped))
    if source is not None:  # a source file that names almost none of the listed images stops here
        uris = [listing.manifest.column("uri").combine_chunks()]
        check_source_match(str(cfg.source_tags), source.column("uri"), uris, cfg.labels.source_match)
    for run in runs:
        _plan_model(run, listing, dry_run, timings)
    if dry_run:
        return _summaries(runs, started, timings)
    with contextlib.ExitStack() as leases:  # advisory: the commit is the arbiter (table/lease.py)
        for run in runs:
            leases.enter_context(held(run.table, run_id))
            warned |= warn_if_active(run.table, run_id, warned)  # one that started while this one listed
        return _tag_and_commit(cfg, runs, listing, timings, started, source)


def _tag_and_commit(cfg, runs: list[ModelRun], listing, timings: dict, started: float, source):
    """Tag, rewrite and commit each model's table (run_tag_pass, its leases held)."""
    if any(run.plan.commits for run in runs):  # only a run with work starts Ray
        _start_ray(cfg, timings)
    for run in runs:
        run.writer = _slice_writer(run)
    try:
        t = time.monotonic()
        tagged = _tag(cfg, runs, started)
        timings["tag_seconds"] = _lap(t)
        t = time.monotonic()
        for run in runs:
            run.rewritten = _rewrite(run)
        timings["rewrite_seconds"] = _lap(t)
    except KeyboardInterrupt:
        _settle(runs)
        raise RunInterrupted(
            " ".join(_interrupted_text(r.table, r.base, r.writer.written) for r in runs)
        ) from None
    _commit_each(runs, tagged, listing, timings, started, source)
    return _summaries(runs, started, None)


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


def _commit_each(runs: list[ModelRun], tagged: dict, listing, timings: dict, started: float, source) -> None:
    """Each table's commit, on its own: a table that fails to commit does not stop the
    others'; the failures are raised together after, naming each table. Edit calibration
    and the run manifests come after every commit, so no table's commit waits on another
    model's calibration."""
    failures, committed = [], []
    for index, run in enumerate(runs):
        try:
            run_timings = dict(timings)  # each table's own first_rows_seconds
            _add_results(run.summary, tagged.get(index, Tagged()), run.rewritten, run.plan, run_timings)
            committed.append((run, _commit(run, run_timings, source)))
        except Exception as exc:
            if len(runs) == 1:
                raise
            failures.append(f"{run.table.uri}: {exc}")
    for run, snapshot in committed:
        try:
            _finish(run, snapshot, listing, started)
        except Exception as exc:
            if len(runs) == 1:
                raise
            failures.append(f"{run.table.uri}: {exc}")
    if failures:
        done = [r.table.uri for r in runs if r.summary.version != r.summary.base_version]
        raise TagpipeError(
            f"{len(failures)} of {counted(len(runs), 'tables')} did not commit ({'; '.join(failures)}); "
            f"committed: {', '.join(done) or 'none'}. Running the same command again finishes the rest"
        )


def _label_check(run: ModelRun, files: list[str], source) -> dict[str, str]:
    """Each of the version's parts with its labels file (the label sidecar: no part is
    rewritten; the data rule's thresholds are the whole table's, so every part is read);
    the summary gets the check's counts."""
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
    run.summary.label_check = summary.record()
    return labels


def model_runs(cfg: TagJobConfig, run_id: str, dry_run: bool) -> list[ModelRun]:
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
            one, bundle, table, base, (inference_key(one, bundle), rules_key(bundle, one.rules))
        )
        runs.append(
            ModelRun(one, bundle, keys, table, base, run_id, taken=set(base.files) if base else set())
        )
    return runs


def _plan_model(run: ModelRun, listing, dry_run: bool, timings: dict) -> None:
    """One model's plan from the shared listing, its summary, and (unless dry) the
    listing's copy in its table."""
    run.manifest_path = None if dry_run else run.table.write_input_manifest(run.run_id, listing.manifest)
    t = time.monotonic()
    run.plan = _plan(run.cfg, run.table, run.base, run.taken, run.key, run.keys, listing.manifest)
    timings["plan_seconds"] = round(timings.get("plan_seconds", 0.0) + _lap(t), 3)
    run.summary = _planned_summary(run.cfg, run.run_id, run.bundle, run.base, listing, run.plan, dry_run)
    if run.plan.change in (Change.RULES_CHANGED, Change.INFERENCE_CHANGED):
        run.summary.settings_changed = changed_settings(run.cfg, run.bundle, run.table, run.base)
    _log_plan(run.summary)


def _rewrite(run: ModelRun) -> list:
    # with source tags every part of the version is checked anew: no labels to take along
    labels = run.base.labels if run.base is not None and not run.cfg.source_tags else {}
    jobs = _rewrite_jobs(run.plan, run.table, run.key, run.bundle, run.cfg.rules, run.run_id, labels)
    return (
        rewrite_parts(jobs, run.cfg.storage_options, "rewriting", _progress_settings(run.cfg)) if jobs else []
    )


def _commit(run: ModelRun, timings: dict, source) -> Snapshot | None:
    """Commit the model's new version when its plan, or the label check, changes
    anything; the snapshot committed, or None. Without source tags the labels files of
    kept and rewritten parts go along (new rows have none); with them every part is checked."""
    summary, plan, base = run.summary, run.plan, run.base
    snapshot: Snapshot | None = None
    run_timings = dict(timings)
    rewritten = [r.file for r in run.rewritten if r.file]
    files = [*plan.keep, *rewritten, *plan.reuse.files, *summary.parts]
    labels = {f: base.labels[f] for f in plan.keep if base is not None and f in base.labels}
    labels |= {r.file: r.labels for r in run.rewritten if r.file and r.labels}
    if source is not None and files:
        t = time.monotonic()
        labels = _label_check(run, files, source)
        run_timings["label_check_seconds"] = _lap(t)
    relabelled = base is not None and labels != base.labels
    if plan.commits or relabelled or (base is not None and sorted(files) != sorted(base.files)):
        t = time.monotonic()
        snapshot = commit_version(
            run.table,
            base,
            files,
            model_sha256=run.bundle.fingerprint.model_sha256,
            inference_key=run.keys[0],
            rules_key=run.keys[1],
            run_id=run.run_id,
            model_name=run.bundle.name,
            rules=run.cfg.rules.record(),
            counts=summary.counts()
            | {"rows": summary.listed}
            | ({"label_check": summary.label_check} if summary.label_check else {}),
            expected_rows=summary.listed,
            labels=labels,
        )
        summary.version, summary.rows = snapshot.version, snapshot.rows
        if not plan.commits:  # nothing to tag or drop: the source tags' check changed the version
            summary.change = "source tags changed"
        run_timings["commit_seconds"] = _lap(t)
    else:
        summary.rows = base.rows if base else 0
    summary.timings = run_timings
    return snapshot


def _finish(run: ModelRun, snapshot: Snapshot | None, listing, started: float) -> None:
    """After the commit: a new inference key's edit calibration (never raises), then the
    run manifest."""
    summary = run.summary
    if snapshot is not None:
        summary.edit_calibration = calibrate_edits(run, snapshot)
        if summary.edit_calibration:
            summary.timings["edit_calibration_seconds"] = summary.edit_calibration["seconds"]
    summary.seconds = round(time.monotonic() - started, 3)
    record = _run_record(run.cfg, run.bundle, run.keys, listing, run.manifest_path, summary)
    run.table.write_run_manifest(run.run_id, record)


def _summaries(runs: list[ModelRun], started: float, timings: dict | None) -> RunSummary | PassSummary:
    """One model: its RunSummary; several: a PassSummary of them (timings: a dry run's)."""
    for run in runs:
        if timings is not None:
            run.summary.timings = dict(timings)
            run.summary.seconds = round(time.monotonic() - started, 3)
    if len(runs) == 1:
        return runs[0].summary
    return PassSummary([r.summary for r in runs], round(time.monotonic() - started, 3))


def _list_inputs(cfg: TagJobConfig, runs: list[ModelRun]):
    """Every input, with the table's own folder and the listing rules left out (several
    models: all of OUTPUT, which holds their tables, past and present)."""
    extensions = frozenset(e.strip(". ").lower() for e in cfg.extensions)
    entries = table_entries(runs[0].table.uri) if len(runs) == 1 else (cfg.output.rstrip("/"),)
    own = tuple(listing_path(entry, cfg.storage_options) for entry in entries)
    rules = ListingRules(extensions, own, skip_sidecars=not cfg.list_sidecars)
    return build_manifest(list(cfg.inputs), cfg.storage_options, rules, progress=_progress_settings(cfg))


def _slice_writer(run: ModelRun) -> SliceWriter:
    """Parts encoded and written by Ray tasks, one in flight per 8 CPUs (at least 2; a
    run with nothing to tag started no Ray and writes none)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    in_flight = max(2, int(cpus) // 8)
    plan, cfg = run.plan, run.cfg
    return SliceWriter(
        run.table, plan.to_tag, cfg.rows_per_part, run.key, run.taken, run.run_id, True, in_flight
    )


def _list_before_ray(cfg: TagJobConfig, runs: list[ModelRun], timings: dict[str, float]):
    """The listing, before Ray: a dry run, a run with nothing to do and a missing input
    answer without starting Ray (a cold local Ray takes ~4 s, ~9 s on 2 cores). Only a
    folder walk on a store without key ranges lists in Ray tasks, so Ray starts first there."""
    if not lists_without_ray(list(cfg.inputs), cfg.storage_options):
        _start_ray(cfg, timings)
    t = time.monotonic()
    listing = _list_inputs(cfg, runs)
    timings["list_seconds"] = _lap(t)
    return listing


def _start_ray(cfg: TagJobConfig, timings: dict[str, float]) -> None:
    """Join or start Ray once there is work for it (a second call costs nothing)."""
    t = time.monotonic()
    ensure_ray(cfg.ray_address)
    timings["ray_start_seconds"] = round(timings.get("ray_start_seconds", 0.0) + _lap(t), 3)


def _plan(
    cfg: TagJobConfig, table: TagTable, base, taken: set[str], key: str, keys: tuple[str, str], manifest
):
    """The table's side of the plan read (the base's source columns, parts an interrupted
    run left), unknown sources hashed, then plan_run decides."""
    status = classify(manifest, StoredSources.of_table(table, base) if base else empty_view())
    status = resolve_unknown(status, cfg.storage_options, cfg.ray_address)
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


def _rewrite_jobs(
    plan: Plan, table: TagTable, key: str, bundle, rules, run_id: str, labels: dict[str, str]
) -> list[RewriteJob]:
    """The plan's rewrites as RewriteJobs: each part copied without its dropped rows (and
    its labels file, `labels`, without their labels), re-tagged from its stored logits
    when the rules changed."""
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
