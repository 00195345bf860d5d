"""The report's figures: what one part of a table contributes, and their sum.

`PartFigures.of_part` counts one part (or one batch of a plain Parquet dataset): rows,
errors by kind and the first errors, tag counts overall and per category, the score
histogram and the tags emitted just above the threshold, the OOD distances as a sketch,
the part's most out-of-distribution rows, its OOD flags, and the drift's rate counts
(pipeline/corpus/drift.py). `Accumulator.add` sums them in the table's part order, so
the sum is the same whether a part was read now or its figures were kept from an
earlier report (pipeline/corpus/report_scan.py keeps them, one small file a part).

OOD distances are kept as a sketch, not as values: counts per bucket of the float32's
order-preserving bits, the top OOD_SKETCH_BITS of its mantissa kept (buckets 2^-10 of a
value wide), so a part's sketch is small, sketches add exactly, and the page's median,
99.9th percentile and histogram come from it within 0.05% of a value.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.corpus.drift import RateCounts

TOP_OOD = 12  # thumbnails of the most out-of-distribution images
MAX_ERRORS = 200  # error rows listed
ERROR_CHARS = 160  # of an error's message, shown in the list
SCORE_BINS = np.linspace(0.0, 1.0, 51)
BORDERLINE = 0.1  # a score within this of the threshold is "unsure"
OOD_SKETCH_BITS = 10  # mantissa bits of a float32 kept in an OOD bucket's id
_SHIFT = 23 - OOD_SKETCH_BITS
_SIGN = np.uint32(0x80000000)


def cut(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def count_values(values) -> Counter:
    if len(values) == 0:
        return Counter()
    counts = pc.value_counts(values)
    return Counter(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))


# ---- the OOD sketch ----------------------------------------------------------------
def ood_sketch(values: np.ndarray) -> Counter:
    """Bucket id -> count of the finite values: ids follow the values' order."""
    finite = np.ascontiguousarray(values[np.isfinite(values)], np.float32)
    bits = finite.view(np.uint32)
    key = np.where(bits & _SIGN, ~bits, bits | _SIGN)  # larger float, larger key
    ids, counts = np.unique(key >> np.uint32(_SHIFT), return_counts=True)
    return Counter(dict(zip(ids.tolist(), counts.tolist())))


def bucket_bounds(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each bucket's range of values: [low, high), high the next bucket's low."""

    def value(key: np.ndarray) -> np.ndarray:
        bits = np.where(key & _SIGN, key ^ _SIGN, ~key).astype(np.uint32)
        return bits.view(np.float32).astype(np.float64)

    keys = np.asarray(ids, np.uint64) << np.uint64(_SHIFT)
    return value(keys.astype(np.uint32)), value(
        np.minimum(keys + (1 << _SHIFT), 0xFFFFFFFF).astype(np.uint32)
    )


# ---- one part's figures ------------------------------------------------------------
@dataclass
class PartFigures:
    """What one part adds to the page (and to the drift, for a tag table's part)."""

    rows: int = 0
    errors: Counter = field(default_factory=Counter)
    first_errors: list = field(default_factory=list)  # [uri, error_kind, error cut to ERROR_CHARS]
    by_category: dict = field(default_factory=dict)  # category -> Counter
    tag_counts: Counter = field(default_factory=Counter)
    borderline: Counter = field(default_factory=Counter)
    score_hist: list = field(default_factory=lambda: [0] * (len(SCORE_BINS) - 1))
    ood_count: int = 0  # rows with a distance
    ood_sketch: Counter = field(default_factory=Counter)
    top_ood: list = field(default_factory=list)  # [distance, uri], the part's TOP_OOD, in push order
    ood_flagged: int = 0
    counts: RateCounts | None = None  # the drift's

    @classmethod
    def of_part(cls, part: pa.Table, threshold: float, drift: bool = True) -> PartFigures:
        figures = cls(rows=part.num_rows)
        names = part.column_names
        if "error_kind" in names:
            failed = pc.is_valid(part.column("error_kind"))
            if pc.any(failed).as_py():
                bad = part.filter(failed).select(["uri", "error_kind", "error"])
                figures.errors.update(bad.column("error_kind").to_pylist())
                figures.first_errors = [
                    [r["uri"], r["error_kind"], cut(r["error"] or "", ERROR_CHARS)]
                    for r in bad.slice(0, MAX_ERRORS).to_pylist()
                ]
        for name in sorted(n for n in names if n.startswith("tags_")):
            figures.by_category[name.removeprefix("tags_")] = count_values(pc.list_flatten(part.column(name)))
        if "tags" in names:
            tags = pc.list_flatten(part.column("tags"))
            figures.tag_counts = count_values(tags)
            if "scores" in names:
                scores = pc.list_flatten(part.column("scores")).to_numpy(zero_copy_only=False)
                figures.score_hist = np.histogram(np.clip(scores, 0, 1), SCORE_BINS)[0].tolist()
                unsure = (scores >= threshold) & (scores < threshold + BORDERLINE)
                figures.borderline = count_values(tags.filter(pa.array(unsure)))
        if "ood_distance" in names:
            figures._ood(part)
        figures.counts = RateCounts().add(part) if drift else None
        return figures

    def _ood(self, part: pa.Table) -> None:
        distance = part.column("ood_distance")
        valid = pc.is_valid(distance)
        values = distance.filter(valid).to_numpy(zero_copy_only=False).astype(np.float32)
        if len(values):
            self.ood_count = len(values)
            self.ood_sketch = ood_sketch(values)
            uris = part.column("uri").filter(valid)
            self.top_ood = [[float(values[k]), uris[int(k)].as_py()] for k in np.argsort(values)[-TOP_OOD:]]
        if "ood" in part.column_names:
            self.ood_flagged = int(
                pc.sum(pc.cast(part.column("ood").fill_null(False), pa.int64())).as_py() or 0
            )

    # ---- as a record (JSON) -----------------------------------------------------------
    def record(self) -> dict:
        counts = self.counts
        return {
            "rows": self.rows,
            "errors": _pairs(self.errors),
            "first_errors": self.first_errors,
            "by_category": {c: _pairs(n) for c, n in self.by_category.items()},
            "tag_counts": _pairs(self.tag_counts),
            "borderline": _pairs(self.borderline),
            "score_hist": self.score_hist,
            "ood_count": self.ood_count,
            "ood_sketch": _pairs(self.ood_sketch),
            "top_ood": self.top_ood,
            "ood_flagged": self.ood_flagged,
            "counts": None
            if counts is None
            else {
                "rows": counts.rows,
                "decoded": counts.decoded,
                # most tables' error rows carry no tags: then the decoded rows' counts are all of them
                "tags": None if counts.tags == self.tag_counts else _pairs(counts.tags),
                "ood_known": counts.ood_known,
                "ood": counts.ood,
                "errors": _pairs(counts.errors),
            },
        }

    @classmethod
    def from_record(cls, record: dict) -> PartFigures:
        figures = cls(
            rows=record["rows"],
            errors=_counter(record["errors"]),
            first_errors=record["first_errors"],
            by_category={c: _counter(n) for c, n in record["by_category"].items()},
            tag_counts=_counter(record["tag_counts"]),
            borderline=_counter(record["borderline"]),
            score_hist=record["score_hist"],
            ood_count=record["ood_count"],
            ood_sketch=_counter(record["ood_sketch"]),
            top_ood=record["top_ood"],
            ood_flagged=record["ood_flagged"],
        )
        counts = record["counts"]
        if counts is not None:
            tags = figures.tag_counts.copy() if counts["tags"] is None else _counter(counts["tags"])
            figures.counts = RateCounts(
                rows=counts["rows"],
                decoded=counts["decoded"],
                tags=tags,
                ood_known=counts["ood_known"],
                ood=counts["ood"],
                errors=_counter(counts["errors"]),
            )
        return figures


def _pairs(counts: Counter) -> list:
    """[keys, counts]: JSON keeps a None or an integer key as it is in a list, not as an object key."""
    return [list(counts), list(counts.values())]


def _counter(pairs: list) -> Counter:
    return Counter(dict(zip(*pairs)))


# ---- the sum -----------------------------------------------------------------------
@dataclass
class Accumulator:
    """Running figures over the table's parts (PartFigures added in part order)."""

    rows: int = 0
    errors: Counter = field(default_factory=Counter)
    first_errors: list = field(default_factory=list)  # {uri, error_kind, error}
    by_category: dict = field(default_factory=dict)  # category -> Counter, categories sorted
    tag_counts: Counter = field(default_factory=Counter)
    borderline: Counter = field(default_factory=Counter)
    score_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_BINS) - 1, np.int64))
    ood_count: int = 0
    ood_sketch: Counter = field(default_factory=Counter)
    top_ood: list = field(default_factory=list)  # heap of (distance, uri)
    ood_flagged: int = 0

    def add(self, part: PartFigures) -> None:
        self.rows += part.rows
        self.errors.update(part.errors)
        room = MAX_ERRORS - len(self.first_errors)
        if room > 0:
            self.first_errors.extend(
                {"uri": u, "error_kind": k, "error": e} for u, k, e in part.first_errors[:room]
            )
        if set(part.by_category) - set(self.by_category):
            merged = {c: Counter() for c in part.by_category} | self.by_category
            self.by_category = dict(sorted(merged.items()))
        for category, counts in part.by_category.items():
            self.by_category[category].update(counts)
        self.tag_counts.update(part.tag_counts)
        self.borderline.update(part.borderline)
        self.score_hist += np.asarray(part.score_hist, np.int64)
        self.ood_count += part.ood_count
        self.ood_sketch.update(part.ood_sketch)
        for distance, uri in part.top_ood:
            item = (distance, uri)
            (heapq.heappush if len(self.top_ood) < TOP_OOD else heapq.heappushpop)(self.top_ood, item)
        self.ood_flagged += part.ood_flagged

    def _ood_cdf(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, how many distances are below each): each bucket's count spread evenly
        over its range, so a bin edge inside a bucket takes its share, not all or nothing."""
        ids = np.array(sorted(self.ood_sketch), np.int64)
        counts = np.array([self.ood_sketch[i] for i in ids.tolist()], np.float64)
        low, high = bucket_bounds(ids)
        ends = np.cumsum(counts)
        values = np.stack([low, high], axis=1).ravel()
        below = np.stack([ends - counts, ends], axis=1).ravel()
        return values, below

    def ood_quantile(self, q: float) -> float:
        """The q-quantile of the OOD distances: where the (q * n)th distance lies,
        within its bucket's range (0.1% of the value)."""
        if not self.ood_sketch:
            return float("nan")
        values, below = self._ood_cdf()
        return float(np.interp(q * below[-1], below, values))

    def ood_histogram(self, edges: np.ndarray) -> np.ndarray:
        """Counts of the OOD distances in these bins, those outside in the end bins."""
        if not self.ood_sketch:
            return np.zeros(len(edges) - 1, np.int64)
        values, below = self._ood_cdf()
        at_edges = np.interp(edges, values, below)
        at_edges[0], at_edges[-1] = 0, below[-1]
        return np.diff(np.round(at_edges)).astype(np.int64)
