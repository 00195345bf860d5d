"""What a tag run did, in numbers: the result line, the run manifest's counts, and the
dry run's plan line. Built by the tag job from what its plan and each step returned."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pipeline.core.words import counted
from pipeline.job.busy import BusyTime
from pipeline.job.plan import Change
from pipeline.table.version_fields import LabelCheckCounts, VersionCounts


@dataclass(frozen=True)
class RunCounts:
    """What a run found and did, in files and rows: what its version and its run manifest
    count (with the rows the version holds)."""

    files_found: int = 0  # files the listing found: listed + skipped files
    skipped_files: dict[str, int] = field(default_factory=dict)  # by reason (storage/manifest.py)
    listed: int = 0  # inputs: one row each in the committed version
    new: int = 0  # listed, not in the table
    changed: int = 0  # in the table, source changed (etag / size+mtime / sha256)
    deleted: int = 0  # in the table, no longer listed: dropped from the new version
    skipped: int = 0  # unchanged, kept as they are (not recomputed)
    retried: int = 0  # unchanged but stored with a transient error (read_error, not_found)
    reinferred: int = 0  # unchanged but inferred again because the inference settings changed
    rethresholded: int = 0  # rows re-tagged from stored logits (rules changed), no inference
    reused: int = 0  # rows an interrupted run had already tagged
    images: int = 0  # rows tagged (model run) by this run
    errors: int = 0  # error rows among those tagged by this run
    rewritten_parts: int = 0  # parts copied without deleted/changed rows, or rethresholded

    def version_counts(self, rows: int, label_check: LabelCheckCounts | None = None) -> VersionCounts:
        """The counts a version (and the run manifest) keeps, with the rows it holds."""
        counted = {f.name: getattr(self, f.name) for f in fields(RunCounts)}
        counted["skipped_files"] = dict(self.skipped_files)
        return VersionCounts(**counted, rows=rows, label_check=label_check)


@dataclass(frozen=True)
class EditCalibration:
    """What the edit calibration did (pipeline/job/edit_calibration.py), when it ran."""

    seconds: float
    images: int = 0
    edits: int = 0
    rows: int = 0
    failed: int = 0
    file: str = ""
    error: str = ""  # why it failed; the version was committed all the same


@dataclass(frozen=True, kw_only=True)
class RunSummary(RunCounts):
    """A tag run's outcome, built once from what its steps returned (tag_job.py)."""

    run_id: str
    output: str
    change: Change
    ok: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    parts: tuple[str, ...] = ()  # parts written by tagging
    base_version: int = 0
    version: int = 0  # the committed version (= base_version when nothing changed)
    rows: int = 0  # rows in the committed version
    seconds: float = 0.0
    images_per_second: float = 0.0
    placement: str = ""
    model_name: str = ""
    model_sha256: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    rows_by_node: dict[str, dict[str, int]] = field(default_factory=dict)  # {"decode": {node: rows}, ...}
    to_tag: int = 0  # images the plan sends to the model (listed work less what is reused)
    planned_version: int = 0  # dry run: the version the run would commit; 0: none (no change)
    dry_run: bool = False  # the plan only: nothing was tagged or written
    label_check: LabelCheckCounts | None = None  # --source-tags: the check's counts
    settings_changed: tuple[str, ...] = ()  # keyed settings changed against the base, "name old -> new"
    edit_calibration: EditCalibration | None = None  # when it ran
    busy: BusyTime | None = None  # the sessions' and decode's busy fractions, when it tagged

    def counts(self) -> VersionCounts:
        """The run manifest's counts: the version's, without the label check."""
        return self.version_counts(self.rows)

    def skipped_text(self) -> str:
        if not self.skipped_files:
            return ""
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped_files.items()))
        found = counted(self.files_found, "files")
        return f" ({found} found, {sum(self.skipped_files.values())} skipped: {reasons})"

    def change_text(self) -> str:
        """The kind of change, with each changed setting named old -> new."""
        return self.change + (": " + "; ".join(self.settings_changed) if self.settings_changed else "")

    def plan_text(self) -> str:
        how = " (re-tagged from stored logits, no model run)" if self.change is Change.RULES_CHANGED else ""
        outcome = (
            f"rewrite {self.rewritten_parts} part(s){how} and commit version {self.planned_version}"
            if self.planned_version
            else f"commit nothing: version {self.base_version} stays current"
        )
        return (
            f"dry run ({self.change_text()}): {self.listed} listed{self.skipped_text()}, {self.new} new, "
            f"{self.changed} changed, {self.deleted} deleted, {self.skipped} unchanged, "
            f"{self.retried} to retry, {self.reinferred} to re-tag for new settings; "
            f"would tag {counted(self.to_tag, 'images')} ({self.reused} reused from an interrupted run), "
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
                ("re-tagged for new settings", self.reinferred),
                ("rethresholded", self.rethresholded),
                ("reused from an interrupted run", self.reused),
            )
            if n
        )
        skipped = self.skipped_text()
        return (
            f"run {self.run_id} ({self.change_text()}): {self.listed} listed{skipped}, {self.new} new, "
            f"{self.changed} changed, {self.deleted} deleted, {self.skipped} unchanged{extra}; "
            f"{self._tagged_text(kinds)};{self._label_text()}{self._calibration_text()} "
            f"version {self.version} "
            f"({counted(self.rows, 'rows')}), {self.seconds:.1f} s -> {self.output}"
        )

    def _tagged_text(self, kinds: str) -> str:
        """What the model did: counts and speed, or just that it had nothing to tag."""
        if not self.images:
            return "no image tagged"
        return (
            f"{counted(self.images, 'images')} tagged ({self.ok} ok, {counted(self.errors, 'errors')}: "
            f"{kinds}), {self.images_per_second:.1f} img/s" + (f", {self.busy.text()}" if self.busy else "")
        )

    def _calibration_text(self) -> str:
        """Only when calibration ran (the first version of an inference key)."""
        c = self.edit_calibration
        if c is None:
            return ""
        if c.error:
            return f" edit calibration failed after {c.seconds:.1f} s (see the warning);"
        images, edits = counted(c.images, "images"), counted(c.edits, "edits")
        return f" edit calibration: {images} x {edits}, {c.seconds:.1f} s;"

    def _label_text(self) -> str:
        c = self.label_check
        if c is None:
            return ""
        return (
            f" source tags on {counted(c.with_source, 'rows')} ({c.rule} rule): "
            f"{c.likely_missing} likely missing, {c.likely_wrong} likely wrong;"
        )


@dataclass(frozen=True)
class PassSummary:
    """Several models tagged in one pass: each table's RunSummary, in --model order."""

    runs: tuple[RunSummary, ...]
    seconds: float = 0.0

    def text(self) -> str:
        lines = [f"{len(self.runs)} models in one pass, {self.seconds:.1f} s:"]
        lines += [f"  {run.model_name}: {run.text()}" for run in self.runs]
        return "\n".join(lines)
