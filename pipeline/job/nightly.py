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
drift past the limits. Each stage's line is its own report's text(), and the file keeps
those reports as each stage's own file has them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from pipeline import __version__
from pipeline.core.errors import ExitStatus
from pipeline.core.ray_session import new_run_id
from pipeline.corpus.audit import AuditReport, run_audit
from pipeline.corpus.dedup import DedupSummary, run_dedup
from pipeline.corpus.drift import DriftSummary
from pipeline.corpus.embedding_threshold import EmbeddingThreshold
from pipeline.corpus.report import build_report
from pipeline.corpus.split import SplitReport, run_split
from pipeline.job.preflight import check_nightly_paths
from pipeline.job.settings import NightlyConfig
from pipeline.job.tag_job import RunSummary, run_tag_job
from pipeline.storage.filesystem import filesystem_for
from pipeline.table.tag_table import RUNS_DIR, TagTable, now_iso

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NightlySummary:
    """The stages' own reports, each in its own words (their text())."""

    run_id: str
    tag: RunSummary
    dedup: DedupSummary
    split: SplitReport
    audits: dict[str, AuditReport]  # "split", then "exclude:<uri>" for each exclude set
    drift: DriftSummary | None
    report: str  # the HTML page, with the drift section ("" when there was no table)
    timings: dict[str, float]  # seconds by stage, and the total

    @property
    def leaks(self) -> int:
        return sum(audit.leaks for audit in self.audits.values())

    def json_record(self) -> dict[str, Any]:
        """`--log-format json`'s result: the fields, and the leaks count scripts gate on."""
        return {
            "run_id": self.run_id,
            "tag": asdict(self.tag),
            **self._stage_records(),
            "report": self.report,
            "timings": dict(self.timings),
            "leaks": self.leaks,
        }

    def _stage_records(self) -> dict[str, Any]:
        """dedup, split, audits and drift, each as its own file has it."""
        return {
            "dedup": self.dedup.record(),
            "split": self.split.record(),
            "audits": {name: audit.record() for name, audit in self.audits.items()},
            "drift": self.drift.record() if self.drift else None,
        }

    def text(self) -> str:
        lines = [self.tag.text(), self.dedup.text(), self.split.text()]
        lines += [
            f"audit {name}: {audit.text().removeprefix('audit: ')}" for name, audit in self.audits.items()
        ]
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
        return [name for name, audit in self.audits.items() if audit.short_of()]

    def record(self) -> dict[str, Any]:
        """The nightly file (_runs/<run_id>.nightly.json): each stage's report as its own file has it."""
        tag = self.tag
        return {
            "run_id": self.run_id,
            "tagpipe_version": __version__,
            "finished_at": now_iso(),
            "counts": tag.counts().record(),
            "version": tag.version,
            "change": tag.change,
            **self._stage_records(),
            "split": {k: v for k, v in self.split.record().items() if k not in ("positives",)},
            "leaks": self.leaks,
            "report": self.report,
            "timings": {**{f"tag.{k}": v for k, v in tag.timings.items()}, **self.timings},
        }


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
    timings: dict[str, float] = {}
    t = time.monotonic()
    tag = run_tag_job(cfg.tag.model_copy(update={"run_id": run_id}))
    timings["tag"] = _lap(t)
    options = cfg.tag.storage_options

    t = time.monotonic()
    dedup = run_dedup(cfg.dedup_settings())
    timings["dedup"] = _lap(t)

    t = time.monotonic()
    splits = cfg.splits_output.rstrip("/") + "/splits.parquet"
    fs, path = filesystem_for(splits, options)
    split = run_split(cfg.split_settings(previous=splits if fs.exists(path) else None))
    timings["split"] = _lap(t)

    t = time.monotonic()
    audits = _audits(cfg, splits, _audit_threshold(cfg, dedup.embedding))
    timings["audit"] = _lap(t)

    t = time.monotonic()
    report, drift = _report(cfg, run_id, tag)
    timings["report"] = _lap(t)
    timings["total"] = _lap(started)
    summary = NightlySummary(run_id, tag, dedup, split, audits, drift, report, timings)
    outputs = {"tags": cfg.tag.output, "dedup": cfg.dedup_output, "splits": cfg.splits_output}
    TagTable(cfg.tag.output, options).write_run_manifest(
        f"{run_id}.nightly", summary.record() | {"outputs": outputs}
    )
    return summary


def _audits(cfg: NightlyConfig, splits: str, threshold) -> dict[str, AuditReport]:
    """The new split's val/test audited against its train, then against each exclude set."""
    audits = {}
    trains = [("split", splits)] + [(f"exclude:{uri}", uri) for uri in cfg.split.exclude]
    for i, (name, train) in enumerate(trains):
        target = cfg.splits_output.rstrip("/") + ("/audit" if i == 0 else f"/audit-exclude-{i}")
        settings = cfg.audit_settings(
            train,
            splits,
            target,
            embedding_threshold=threshold,
            dedup=cfg.dedup_output if i == 0 else None,  # the split's rows are in dedup's index
        )
        _, audits[name] = run_audit(settings)
        if audits[name].leaks:
            log.warning("audit %s: %d leaks, listed in %s/leaks.parquet", name, audits[name].leaks, target)
    return audits


def _audit_threshold(cfg: NightlyConfig, used: EmbeddingThreshold):
    """The threshold dedup used, so the audit checks what dedup kept together; when dedup
    was asked for one but had none (auto found none, no embeddings), the audit is asked
    for the embedding all the same (auto, or the given cosine): an audit that cannot use
    it says so and exits 4, instead of reading as checked."""
    if used.threshold is not None:
        return used.threshold
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
