"""Drift between two versions of a tag table: which rates moved beyond sampling noise.

Three kinds of rate are compared, each as a share of the rows it is defined on:
- each tag's rate: decoded rows (no `error_kind`) whose `tags` hold it;
- the OOD rate: rows whose `ood` is true, of the rows where it is not null;
- the error rate, overall and per `error_kind` (pipeline/core/errors.py), of all rows.

A rate moved when a two-proportion z-test (pooled, two-sided) puts the change beyond
sampling noise after Benjamini-Hochberg control over its family (every tag seen in either
version; the error rates), AND it is at least `min_rate_change` in absolute terms, so a
10M-row table does not flag 0.01-point moves (docs/decisions.md: why these). The limits
past which nightly calls it drift (its own exit status) are `DriftSettings` too.

It streams: a version is read part by part, three columns at a time, into running counts
(`RateCounts`); a part both versions name counts once for both (parts are immutable,
pipeline/table/tag_table.py). `DriftScan.take_counts` takes the counts the report made
(of the parts it read, or the summaries it kept of them); `finish` reads the rest.

Why this module is long: the settings, the running counts, the tests and the streaming
scan are one statistic's parts; apart, each would need the others' definitions to read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.core.errors import ErrorKind, TagpipeError
from pipeline.core.settings import KeyRole, Setting, SettingsModel
from pipeline.core.words import counted
from pipeline.table.tag_table import Snapshot, TagTable

COLUMNS = ("tags", "ood", "error_kind")  # all drift reads of a part
ALL_ERRORS = "all errors"  # the overall error rate's name among the per-kind ones


class DriftSettings(SettingsModel):
    """When a change between two versions is a move, and when nightly calls it drift
    ([nightly.drift] of a config file; `tagpipe report --drift-...` options)."""

    significance: Annotated[
        float,
        Field(
            gt=0,
            lt=1,
            description="a rate moved only when its adjusted p-value is at most this (two-proportion "
            "z-test, Benjamini-Hochberg over each family: the tags, the error rates)",
        ),
        Setting(KeyRole.NONE, flags=("--drift-significance",)),
    ] = 0.001
    min_rate_change: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="and only when it changed by at least this share in absolute terms (0.01: one "
            "percentage point), however many rows make the change significant",
        ),
        Setting(KeyRole.NONE, flags=("--drift-min-change",)),
    ] = 0.01
    max_tag_movers: Annotated[
        int,
        Field(ge=0, description="drift when more tags than this moved"),
        Setting(KeyRole.NONE, flags=("--drift-max-tag-movers",)),
    ] = 0
    max_ood_rate_change: Annotated[
        float,
        Field(ge=0, le=1, description="drift when the OOD rate moved by more than this, either way"),
        Setting(KeyRole.NONE, flags=("--drift-max-ood-change",)),
    ] = 0.02
    max_error_rate_change: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="drift when the error rate, overall or of one kind, moved up by more than this",
        ),
        Setting(KeyRole.NONE, flags=("--drift-max-error-change",)),
    ] = 0.01
    top_movers: Annotated[
        int,
        Field(ge=1, description="movers listed, largest change first"),
        Setting(KeyRole.NONE, flags=("--drift-top-movers",)),
    ] = 20


@dataclass
class RateCounts:
    """Running counts over parts: the numerators and denominators of every rate."""

    rows: int = 0
    decoded: int = 0  # rows without an error: the tags' denominator
    tags: Counter = field(default_factory=Counter)  # tag -> decoded rows carrying it
    ood_known: int = 0  # rows whose `ood` is not null: the OOD rate's denominator
    ood: int = 0
    errors: Counter = field(default_factory=Counter)  # error_kind -> rows

    def add(self, part: pa.Table) -> RateCounts:
        """Count one part (any of COLUMNS it has; other columns are ignored). Each tag is
        counted once per row that holds it: the tag job writes a tag at most once."""
        self.rows += part.num_rows
        failed = None
        if "error_kind" in part.column_names:
            failed = pc.is_valid(part.column("error_kind"))
            self.errors.update(_value_counts(part.column("error_kind").filter(failed)))
        errors = int(pc.sum(pc.cast(failed, pa.int64())).as_py() or 0) if failed is not None else 0
        self.decoded += part.num_rows - errors
        if "tags" in part.column_names:
            tags = part.column("tags") if failed is None else part.column("tags").filter(pc.invert(failed))
            self.tags.update(_value_counts(pc.list_flatten(tags)))
        if "ood" in part.column_names:
            ood = part.column("ood")
            self.ood_known += len(ood) - ood.null_count
            self.ood += int(pc.sum(pc.cast(ood, pa.int64())).as_py() or 0)
        return self

    def __iadd__(self, other: RateCounts) -> RateCounts:
        self.rows += other.rows
        self.decoded += other.decoded
        self.tags.update(other.tags)
        self.ood_known += other.ood_known
        self.ood += other.ood
        self.errors.update(other.errors)
        return self


def _value_counts(values) -> Counter:
    if len(values) == 0:
        return Counter()
    counts = pc.value_counts(values)
    return Counter(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))


# ---- the tests -------------------------------------------------------------------
def two_proportion_p_values(k1, n1: int, k2, n2: int) -> np.ndarray:
    """Two-sided p-values of the pooled two-proportion z-test, k1/n1 against k2/n2,
    for arrays of counts over the same denominators. A rate with no room to differ
    (both 0 or both 1, or an empty side) has p = 1."""
    from scipy.special import ndtr

    k1, k2 = np.asarray(k1, np.float64), np.asarray(k2, np.float64)
    if n1 == 0 or n2 == 0:
        return np.ones(k1.shape)
    pooled = (k1 + k2) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = np.divide(k2 / n2 - k1 / n1, se, out=np.zeros_like(se), where=se > 0)
    return np.minimum(1.0, 2 * ndtr(-np.abs(z)))


@dataclass(frozen=True)
class RateChange:
    """One rate in both versions: counts, shares, the change and whether it moved."""

    name: str
    count_before: int
    of_before: int
    count_after: int
    of_after: int
    before: float
    after: float
    change: float  # after - before, as a share (0.01 = one percentage point)
    adjusted_p: float  # Benjamini-Hochberg adjusted over the family (a lone test: its p)
    moved: bool

    def text(self) -> str:
        return (
            f"{self.name} {self.before:.2%} -> {self.after:.2%} ({self.change * 100:+.2f} points, "
            f"p={self.adjusted_p:.2g}{'' if self.moved else ', within noise'})"
        )


def compare_family(
    names: list[str], before: list[int], n1: int, after: list[int], n2: int, settings: DriftSettings
) -> list[RateChange]:
    """Each named rate tested, adjusted by Benjamini-Hochberg over the whole family."""
    from scipy.stats import false_discovery_control

    if not names:
        return []
    k1, k2 = np.asarray(before, np.int64), np.asarray(after, np.int64)
    p_values = two_proportion_p_values(k1, n1, k2, n2)
    adjusted = false_discovery_control(p_values, method="bh") if len(names) > 1 else p_values
    rate1 = k1 / n1 if n1 else np.zeros(len(k1))
    rate2 = k2 / n2 if n2 else np.zeros(len(k2))
    change = rate2 - rate1
    # a hair below the limit: 0.12 - 0.11 is 0.009999... in binary
    moved = (adjusted <= settings.significance) & (np.abs(change) >= settings.min_rate_change - 1e-12)
    rows = zip(names, k1.tolist(), k2.tolist(), rate1, rate2, change, adjusted, moved)
    return [
        RateChange(name, a, n1, b, n2, float(r1), float(r2), float(c), float(p), bool(m))
        for name, a, b, r1, r2, c, p, m in rows
    ]


# ---- the comparison ----------------------------------------------------------------
@dataclass(frozen=True)
class DriftSummary:
    """What changed from one version to another (`compared` False: why nothing was); built
    once by compare_counts, the parts read added by DriftScan.finish."""

    table: str
    before_version: int | None = None
    after_version: int | None = None
    compared: bool = False
    note: str = ""  # why there is nothing to compare
    rows_before: int = 0
    rows_after: int = 0
    decoded_before: int = 0
    decoded_after: int = 0
    tags_compared: int = 0
    tag_movers: int = 0
    movers: tuple[RateChange, ...] = ()  # the top movers, largest change first
    largest_change: RateChange | None = None  # the largest tag change, moved or not
    ood: RateChange | None = None  # None: neither version has OOD flags
    errors: tuple[RateChange, ...] = ()  # all errors, then each kind
    drift: bool = False
    reasons: tuple[str, ...] = ()  # which limits were passed
    parts_read: int = 0
    parts_shared: int = 0  # parts both versions name: read once, counted for both
    settings: DriftSettings = field(default_factory=DriftSettings)  # the limits it was judged by

    def record(self) -> dict[str, Any]:
        """As the nightly file keeps it: the rates as objects, the settings as their fields."""
        return {**asdict(self), "settings": self.settings.model_dump(mode="json")}

    def text(self) -> str:
        if not self.compared:
            return f"drift: nothing to compare with ({self.note})"
        head = (
            f"drift: version {self.before_version} ({counted(self.rows_before, 'rows', ',')}) -> version "
            f"{self.after_version} ({counted(self.rows_after, 'rows', ',')}): {self.tag_movers} of "
            f"{self.tags_compared} "
            "tags moved"
        )
        if self.movers:
            shown = "; ".join(m.text() for m in self.movers[:5])
            more = f"; and {self.tag_movers - 5} more" if self.tag_movers > 5 else ""
            head += f" ({shown}{more})"
        elif self.largest_change is not None:
            head += f" (largest change: {self.largest_change.text()})"
        lines = [head, "drift: " + (self.ood.text() if self.ood else "OOD not recorded in both versions")]
        moved_errors = [e for e in self.errors if e.moved or e.name == ALL_ERRORS]
        if moved_errors:
            lines.append("drift: " + "; ".join(e.text() for e in moved_errors))
        verdict = "DRIFT: " + "; ".join(self.reasons) if self.drift else "no drift past the limits"
        lines.append(f"drift: {verdict}")
        return "\n".join(lines)


def nothing_to_compare(table: str, note: str, after_version: int | None = None) -> DriftSummary:
    return DriftSummary(table=table, after_version=after_version, note=note)


def compare_counts(
    before: RateCounts,
    after: RateCounts,
    settings: DriftSettings,
    table: str = "",
    before_version: int | None = None,
    after_version: int | None = None,
) -> DriftSummary:
    """The rates of two versions' counts compared, and the verdict against the limits."""
    tags = sorted(set(before.tags) | set(after.tags))
    changes = compare_family(
        tags,
        [before.tags[t] for t in tags],
        before.decoded,
        [after.tags[t] for t in tags],
        after.decoded,
        settings,
    )
    by_size = sorted(changes, key=lambda c: (-abs(c.change), c.adjusted_p, c.name))
    movers = [c for c in by_size if c.moved]
    ood = None
    if before.ood_known and after.ood_known:
        ood = compare_family(["OOD"], [before.ood], before.ood_known, [after.ood], after.ood_known, settings)[
            0
        ]
    order = {kind.value: i for i, kind in enumerate(ErrorKind)}
    kinds = sorted(set(before.errors) | set(after.errors), key=lambda k: (order.get(k, len(order)), k))
    errors = compare_family(
        [ALL_ERRORS, *kinds],
        [sum(before.errors.values()), *(before.errors[k] for k in kinds)],
        before.rows,
        [sum(after.errors.values()), *(after.errors[k] for k in kinds)],
        after.rows,
        settings,
    )
    summary = DriftSummary(
        table=table,
        before_version=before_version,
        after_version=after_version,
        compared=True,
        rows_before=before.rows,
        rows_after=after.rows,
        decoded_before=before.decoded,
        decoded_after=after.decoded,
        tags_compared=len(tags),
        tag_movers=len(movers),
        movers=tuple(movers[: settings.top_movers]),
        largest_change=by_size[0] if by_size else None,
        ood=ood,
        errors=tuple(errors),
        settings=settings,
    )
    reasons = _limits_passed(summary, settings)
    return replace(summary, reasons=reasons, drift=bool(reasons))


def _limits_passed(summary: DriftSummary, settings: DriftSettings) -> tuple[str, ...]:
    reasons = []
    if summary.tag_movers > settings.max_tag_movers:
        reasons.append(f"{counted(summary.tag_movers, 'tags')} moved (limit {settings.max_tag_movers})")
    ood = summary.ood
    if ood is not None and ood.moved and abs(ood.change) > settings.max_ood_rate_change:
        reasons.append(
            f"OOD rate {ood.change * 100:+.2f} points (limit {settings.max_ood_rate_change * 100:g})"
        )
    for error in summary.errors:
        if error.moved and error.change > settings.max_error_rate_change:
            reasons.append(
                f"{error.name} rate {error.change * 100:+.2f} points "
                f"(limit {settings.max_error_rate_change * 100:g})"
            )
    return tuple(reasons)


class DriftScan:
    """The counts of two versions of one table, each part counted once (for both versions
    when both name it); `finish` reads the parts nobody handed over and compares."""

    def __init__(self, table: TagTable, before: Snapshot, after: Snapshot):
        self.table, self.before, self.after = table, before, after
        before_files, after_files = set(before.files), set(after.files)
        self.side = {f: "shared" for f in before_files & after_files}
        self.side.update({f: "before" for f in before_files - after_files})
        self.side.update({f: "after" for f in after_files - before_files})
        self.counts = {side: RateCounts() for side in ("shared", "before", "after")}
        self.columns: dict[int, list[str]] = {}  # version -> COLUMNS it has, when a part is read
        self.seen: set[str] = set()

    def _columns(self, snapshot: Snapshot) -> list[str]:
        if snapshot.version not in self.columns:
            names = self.table.read_part_metadata(snapshot.files[0]).schema.to_arrow_schema().names
            self.columns[snapshot.version] = [c for c in COLUMNS if c in names]
        return self.columns[snapshot.version]

    def take_counts(self, files: list[str], counts: RateCounts) -> None:
        """Counts of these parts (of one side) made by another: the report's pass."""
        sides = {self.side[f] for f in files}
        assert len(sides) <= 1 and not self.seen & set(files), "parts of one side, each counted once"
        self.seen.update(files)
        self.counts[sides.pop() if sides else "shared"] += counts

    def pending(self) -> list[str]:  # the parts nobody has handed over: `finish` reads them
        return sorted(f for f in self.side if f not in self.seen)

    def finish(self, settings: DriftSettings) -> DriftSummary:
        for file in self.pending():
            version = self.before if self.side[file] == "before" else self.after
            self.take_counts([file], RateCounts().add(self.table.read_part(file, self._columns(version))))
        before, after = RateCounts(), RateCounts()
        for total, own in ((before, "before"), (after, "after")):
            total += self.counts["shared"]
            total += self.counts[own]
        summary = compare_counts(
            before, after, settings, self.table.uri, self.before.version, self.after.version
        )
        shared = sum(1 for side in self.side.values() if side == "shared")
        return replace(summary, parts_read=len(self.seen), parts_shared=shared)


def previous_version(table: TagTable, version: int) -> int | None:
    """The newest version before `version` whose record is kept (vacuum removes old ones)."""
    older = [v for v in table.versions() if v < version]
    return max(older) if older else None


def why_nothing_to_compare(version: int) -> str:
    first = version == 1
    return "version 1 is the table's first version" if first else f"no version before {version} is kept"


def version_drift(
    uri: str,
    storage_options: dict | None = None,
    settings: DriftSettings | None = None,
    before: int | None = None,
    after: int | None = None,
) -> DriftSummary:
    """Version `after` (default: the current one) against version `before` (default: the
    one before it). A table with no earlier version has nothing to compare with."""
    settings = settings or DriftSettings()
    table = TagTable(uri, storage_options)
    newer = table.snapshot(after)
    if before is None:
        before = previous_version(table, newer.version)
        if before is None:
            return nothing_to_compare(uri, why_nothing_to_compare(newer.version), newer.version)
    if before == newer.version:
        raise TagpipeError(f"{uri}: version {before} compared with itself: give another version")
    return DriftScan(table, table.snapshot(before), newer).finish(settings)
