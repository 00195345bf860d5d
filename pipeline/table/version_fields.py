"""What a version records besides its parts: the rules it was decided with and what made it.

Both are stored in the version's JSON (`rules`, `counts`) as plain objects, only the
fields a writer gave. These records read them back typed, with the defaults a field
that was not recorded takes in one place (a version written before a field existed
reads as the default), and write them back as the same objects, so a table written by
an older tagpipe loads here and one written here loads there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

# TagRules' defaults (pipeline/model/rules.py takes them from here): a version that did
# not record these was decided with them.
DEFAULT_LOGIT_FLOOR = 0.01  # keep sparse logits of tags with probability >= this
DEFAULT_CALIBRATE = True  # apply the bundle's calibration table when it has one


@dataclass(frozen=True)
class RulesRecord:
    """The rule settings a version was decided with (RuleSettings.record()): None where the
    run left the profile's; the names are TagRules'."""

    default_threshold: float | None = None
    category_thresholds: dict[str, float] | None = None
    per_tag_thresholds: bool | None = None
    mcut_categories: tuple[str, ...] | None = None
    max_tags: int | None = None
    exclude: tuple[str, ...] | None = None
    calibrate: bool | None = None
    ood_cut: float | None = None
    logit_floor: float | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> RulesRecord:
        """From a version's `rules` (names this tagpipe does not know are left out)."""
        record = record or {}
        known = {f.name for f in fields(cls)}
        given: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in known
        }
        return cls(**given)

    def record(self) -> dict[str, Any]:
        """The version's `rules`: only the fields given, lists as lists (as RuleSettings.record())."""
        given = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()}

    @property
    def floor(self) -> float:
        """The logit floor the version's logits were stored with."""
        return DEFAULT_LOGIT_FLOOR if self.logit_floor is None else self.logit_floor

    @property
    def calibrates(self) -> bool:
        """Whether the version's probabilities went through the bundle's calibration."""
        return DEFAULT_CALIBRATE if self.calibrate is None else self.calibrate


@dataclass(frozen=True)
class LabelCheckCounts:
    """What a version keeps of the source-tag check (pipeline/job/label_check.py)."""

    rule: str = ""  # calibrated | data
    rows: int = 0
    with_source: int = 0  # rows whose uri the source file has
    judged: int = 0  # of those, rows with stored logits (no error)
    likely_missing: int = 0  # (row, tag) pairs
    likely_wrong: int = 0
    flagged_rows: int = 0  # rows with at least one of either
    unknown_source_tags: int = 0
    label_files_written: int = 0


OLD_NAMES = {"retagged": "reinferred"}  # names earlier versions recorded -> the field's name


@dataclass(frozen=True)
class VersionCounts:
    """What the writer of a version counted: a tag run (every count but rows_changed and
    source_version), a rethreshold (rethresholded, rows_changed, source_version), a
    compare-tags (label_check, source_version). None: not counted by that writer."""

    files_found: int | None = None  # files the listing found: listed + skipped files
    skipped_files: dict[str, int] | None = None  # found but not inputs, by reason
    listed: int | None = None
    new: int | None = None
    changed: int | None = None
    deleted: int | None = None
    skipped: int | None = None
    retried: int | None = None
    reinferred: int | None = None  # unchanged, inferred again for new inference settings
    rethresholded: int | None = None
    reused: int | None = None
    images: int | None = None
    errors: int | None = None
    rewritten_parts: int | None = None
    rows: int | None = None
    rows_changed: int | None = None  # rethreshold: rows whose tags changed
    source_version: int | None = None  # rethreshold, compare-tags: the version they started from
    label_check: LabelCheckCounts | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> VersionCounts:
        """From a version's `counts`, earlier names read as today's, unknown ones left out."""
        known = {f.name for f in fields(cls)}
        renamed = {OLD_NAMES.get(k, k): v for k, v in (record or {}).items()}
        given: dict[str, Any] = {k: v for k, v in renamed.items() if k in known}
        if given.get("label_check") is not None:
            check_fields = {f.name for f in fields(LabelCheckCounts)}
            given["label_check"] = LabelCheckCounts(
                **{k: v for k, v in given["label_check"].items() if k in check_fields}
            )
        return cls(**given)

    def record(self) -> dict[str, Any]:
        """The version's `counts`: only what was counted."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
