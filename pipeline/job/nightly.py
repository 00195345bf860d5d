"""`tagpipe nightly`: bring the tag table up to date, then refresh what depends on it.

1. tag: only new, changed and transiently failed images (a new model: all; new
   thresholds: rethreshold), deleted ones dropped; one new version (pipeline/job/tag_job.py)
2. dedup over the new version (pipeline/corpus/dedup.py)
3. split with the previous splits as --previous, so assigned images never move
   (pipeline/corpus/split.py); existing training sets in `exclude` stay out of val/test
4. audit: the new split's val/test against its train, and against each `exclude` set
5. report: the HTML page of the run's version, with its drift from the version before
   the run's commit (pipeline/corpus/drift.py), as `_runs/<run_id>.report.html`; a run
   that committed no version has no drift

Steps 2-4 take their settings from [nightly.dedup], [nightly.split] and [nightly.audit]
(NightlyConfig.dedup_settings(), split_settings(), audit_settings()).

Each step reads the previous step's committed output, so a crash anywhere leaves every
output as the last good run left it, and a rerun finishes the job. The nightly record
(`_runs/<run_id>.nightly.json` in the tag output) has the counts and timings of each step
and the drift summary; the command exits 1 on leaks, else 4 when an audit could not check
every val/test image by every signal it was asked to use (nightly_exit_status), else 3 on
drift past the limits. The audit's line is made from the same record the file keeps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

from pipeline import __version__
from pipeline.core.errors import ExitStatus
from pipeline.core.ray_session import new_run_id
from pipeline.core.words import counted
from pipeline.corpus.audit import missing_text, run_audit, short_of
from pipeline.corpus.dedup import run_dedup
from pipeline.corpus.drift import DriftSummary
from pipeline.corpus.report import build_report
from pipeline.corpus.split import run_split
from pipeline.job.preflight import check_nightly_paths
from pipeline.job.settings import NightlyConfig
from pipeline.job.tag_job import RunSummary, run_tag_job
from pipeline.storage.filesystem import filesystem_for
from pipeline.table.tag_table import RUNS_DIR, TagTable, now_iso

log = logging.getLogger(__name__)


@dataclass
class NightlySummary:
    run_id: str
    tag: RunSummary
    dedup: dict = field(default_factory=dict)
    split: dict = field(default_factory=dict)
    audits: dict = field(default_factory=dict)  # name -> {"leaks": n, ...}
    leaks: int = 0
    drift: DriftSummary | None = None
    report: str = ""  # the HTML page, with the drift section
    timings: dict = field(default_factory=dict)

    def text(self) -> str:
        lines = [self.tag.text()]
        if self.dedup:
            lines.append(
                f"dedup: {counted(self.dedup['images'], 'images')} in "
                f"{counted(self.dedup['clusters'], 'clusters')} "
                f"({counted(self.dedup['duplicates'], 'duplicates')})"
            )
        if self.split:
            sizes = ", ".join(f"{k} {v}" for k, v in sorted(self.split["sizes"].items()))
            lines.append(
                f"split: {sizes}; {self.split['kept_from_previous']} kept from the previous split, "
                f"{len(self.split['bridges'])} bridging clusters held out"
            )
        lines += [_audit_line(name, audit) for name, audit in self.audits.items()]
        if self.drift is not None:
            lines.append(self.drift.text())
        if self.report:
            lines.append(f"report: {self.report}")
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
        drifted = "DRIFT" if self.drift is not None and self.drift.drift else "no drift"
        incomplete = self.incomplete_audits()
        checked = f"{len(incomplete)} audit(s) NOT FULLY CHECKED" if incomplete else "fully checked"
        lines.append(f"{'LEAKS FOUND' if self.leaks else 'no leaks'}; {checked}; {drifted}; {steps}")
        return "\n".join(lines)

    def incomplete_audits(self) -> list[str]:
        """The audits that left a val/test image unchecked by a signal they were asked to use."""
        return [name for name, audit in self.audits.items() if short_of(audit["asked"], audit["not_checked"])]


def _audit_line(name: str, audit: dict) -> str:
    """One audit's line, from its record (the nightly file's `audits`): the same figures."""
    emb = audit.get("embedding", {})
    if emb.get("threshold") is not None:
        used = f"embedding cosine >= {emb['threshold']:.4f}"
    elif "embedding" in audit["asked"]:
        used = f"embedding asked for but not used ({emb.get('reason') or 'no threshold'})"
    else:
        used = "embedding off"
    missing = short_of(audit["asked"], audit["not_checked"])
    checked = missing_text(missing, audit["eval_images"]) if missing else "every image checked"
    return (
        f"audit {name}: {counted(audit['leaks'], 'leaks')} ({audit['exact_leaks']} byte-identical) "
        f"among {audit['eval_images']} val/test images; {checked}; {used}"
    )


def nightly_exit_status(summary: NightlySummary, cfg: NightlyConfig) -> int:
    """1 on leaks, else 4 when an audit is not complete, else 3 on drift, else 0 (each as
    fail_on_leaks, fail_on_unchecked and fail_on_drift allow)."""
    if summary.leaks and cfg.fail_on_leaks:
        return int(ExitStatus.LEAKS)
    if summary.incomplete_audits() and cfg.fail_on_unchecked:
        return int(ExitStatus.UNCHECKED)
    if summary.drift is not None and summary.drift.drift and cfg.fail_on_drift:
        return int(ExitStatus.DRIFT)
    return int(ExitStatus.OK)


def run_nightly(cfg: NightlyConfig) -> NightlySummary:
    check_nightly_paths(cfg)  # and the tag step checks its own: all before any work
    run_id = cfg.tag.run_id or new_run_id()
    started = time.monotonic()
    t = time.monotonic()
    tag = run_tag_job(cfg.tag.model_copy(update={"run_id": run_id}))
    summary = NightlySummary(run_id=run_id, tag=tag)
    summary.timings["tag"] = _lap(t)
    options = cfg.tag.storage_options

    t = time.monotonic()
    dedup = run_dedup(cfg.dedup_settings())
    summary.dedup = asdict(dedup)
    audit_threshold = _audit_threshold(cfg, dedup.embedding)
    summary.timings["dedup"] = _lap(t)

    t = time.monotonic()
    splits = cfg.splits_output.rstrip("/") + "/splits.parquet"
    fs, path = filesystem_for(splits, options)
    report = run_split(cfg.split_settings(previous=splits if fs.exists(path) else None))
    summary.split = {k: v for k, v in asdict(report).items() if k not in ("positives",)}
    summary.timings["split"] = _lap(t)

    t = time.monotonic()
    audits = [("split", splits)] + [(f"exclude:{uri}", uri) for uri in cfg.split.exclude]
    for i, (name, train) in enumerate(audits):
        target = cfg.splits_output.rstrip("/") + ("/audit" if i == 0 else f"/audit-exclude-{i}")
        settings = cfg.audit_settings(
            train,
            splits,
            target,
            embedding_threshold=audit_threshold,
            dedup=cfg.dedup_output if i == 0 else None,  # the split's rows are in dedup's index
        )
        _, audit = run_audit(settings)
        summary.audits[name] = asdict(audit)
        summary.leaks += audit.leaks
        if audit.leaks:
            log.warning("audit %s: %d leaks, listed in %s/leaks.parquet", name, audit.leaks, target)
    summary.timings["audit"] = _lap(t)

    t = time.monotonic()
    summary.report, summary.drift = _report(cfg, run_id, tag)
    summary.timings["report"] = _lap(t)
    summary.timings["total"] = _lap(started)
    TagTable(cfg.tag.output, options).write_run_manifest(
        f"{run_id}.nightly",
        {
            "run_id": run_id,
            "tagpipe_version": __version__,
            "finished_at": now_iso(),
            "counts": tag.counts(),
            "version": tag.version,
            "change": tag.change,
            "dedup": summary.dedup,
            "split": summary.split,
            "audits": summary.audits,
            "leaks": summary.leaks,
            "drift": asdict(summary.drift) if summary.drift else None,
            "report": summary.report,
            "timings": {**{f"tag.{k}": v for k, v in tag.timings.items()}, **summary.timings},
            "outputs": {"tags": cfg.tag.output, "dedup": cfg.dedup_output, "splits": cfg.splits_output},
        },
    )
    return summary


def _audit_threshold(cfg: NightlyConfig, used: dict):
    """The threshold dedup used, so the audit checks what dedup kept together; when dedup
    was asked for one but had none (auto found none, no embeddings), the audit is asked
    for the embedding all the same (auto, or the given cosine): an audit that cannot use
    it says so and exits 4, instead of reading as checked."""
    if used.get("threshold") is not None:
        return used["threshold"]
    return cfg.dedup.embedding_threshold  # None: [nightly.dedup] turned the embedding off


def _report(cfg: NightlyConfig, run_id: str, tag: RunSummary) -> tuple[str, DriftSummary | None]:
    """The run's version's page, beside the run's record, with its drift from the version
    the run started from (explicit: another writer may have committed since)."""
    table = TagTable(cfg.tag.output, cfg.tag.storage_options)
    committed = tag.version > tag.base_version
    if not tag.version:
        return "", None  # no table to report on
    output = table.full_uri(f"{RUNS_DIR}/{run_id}.report.html")
    page = build_report(
        cfg.tag.output,
        output,
        cfg.dedup_output,
        cfg.splits_output,
        cfg.tag.storage_options,
        title=f"tagpipe nightly {run_id}: version {tag.version}",
        compare_version=tag.base_version if committed and tag.base_version else None,
        drift_settings=cfg.drift,
        version=tag.version,
        drift_note=None
        if committed
        else f"this run committed no new version: the table is still at {tag.version}",
    )
    if page.drift is not None and page.drift.drift:
        log.warning("drift past the limits: %s", "; ".join(page.drift.reasons))
    return output, page.drift


def _lap(t: float) -> float:
    return round(time.monotonic() - t, 3)
