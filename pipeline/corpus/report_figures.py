"""The report's figures: what one part of a table contributes, and their sum.

`PartFigures.of_part` counts one part (or one batch of a plain Parquet dataset): rows,
errors by kind and the first errors, tag counts overall and per category, the score
histogram and the tags emitted just above the threshold, the OOD distances as a sketch,
the part's most out-of-distribution rows, its OOD flags, and the drift's rate counts
(pipeline/corpus/drift.py). `Accumulator.add` sums them in the table's part order, so
the sum is the same whether a part was read now or its figures were kept from an
earlier report (pipeline/corpus/report_scan.py keeps them, one small file a part).

A part's tag counts are arrays over the part's own list of tag names (`vocab`), so
adding one is a dictionary pass over its names and numpy sums, not a Counter update
per count: a report of many kept parts costs little more than reading their files.

OOD distances are kept as a sketch, not as values: counts per bucket of the float32's
order-preserving bits, the top OOD_SKETCH_BITS of its mantissa kept (buckets 2^-10 of a
value wide), so a part's sketch is small, sketches add exactly, and the page's median,
99.9th percentile and histogram come from it within 0.1% of a value.
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
_EMPTY = np.zeros(0, np.int64)


def cut(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


# ---- the OOD sketch ----------------------------------------------------------------
def ood_sketch(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bucket ids, counts) of the finite values: ids follow the values' order."""
    finite = np.ascontiguousarray(values[np.isfinite(values)], np.float32)
    bits = finite.view(np.uint32)
    key = np.where(bits & _SIGN, ~bits, bits | _SIGN)  # larger float, larger key
    ids, counts = np.unique(key >> np.uint32(_SHIFT), return_counts=True)
    return ids.astype(np.int64), counts.astype(np.int64)


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
Tally = tuple[np.ndarray, np.ndarray]  # (indices into a part's vocab, counts)


class _Names:
    """A part's tag names, each given an index the first time it is seen."""

    def __init__(self) -> None:
        self.index: dict = {}

    def tally(self, values) -> Tally:
        """The counts of an array of names (flattened tags)."""
        if len(values) == 0:
            return _EMPTY, _EMPTY
        counts = pc.value_counts(values)
        return self.of(counts.field("values").to_pylist(), counts.field("counts").to_numpy())

    def of(self, names: list, counts) -> Tally:
        ids = [self.index.setdefault(n, len(self.index)) for n in names]
        return np.asarray(ids, np.int64), np.asarray(counts, np.int64)


@dataclass
class DriftFigures:
    """RateCounts (pipeline/corpus/drift.py) of one part, its tags as a Tally."""

    rows: int = 0
    decoded: int = 0
    ood_known: int = 0
    ood: int = 0
    errors: Counter = field(default_factory=Counter)
    tags: Tally | None = None  # None: the part's tag counts (its error rows carry no tags)


@dataclass
class PartFigures:
    """What one part adds to the page (and to the drift, for a tag table's part)."""

    rows: int = 0
    errors: Counter = field(default_factory=Counter)
    first_errors: list = field(default_factory=list)  # [uri, error_kind, error cut to ERROR_CHARS]
    vocab: list = field(default_factory=list)  # the tag names the tallies index
    tags: Tally = (_EMPTY, _EMPTY)
    borderline: Tally = (_EMPTY, _EMPTY)
    by_category: dict = field(default_factory=dict)  # category -> Tally
    score_hist: list = field(default_factory=lambda: [0] * (len(SCORE_BINS) - 1))
    ood_count: int = 0  # rows with a distance
    ood_sketch: Tally = (_EMPTY, _EMPTY)  # (bucket ids, counts)
    top_ood: list = field(default_factory=list)  # [distance, uri], the part's TOP_OOD, in push order
    ood_flagged: int = 0
    drift: DriftFigures | None = None

    @classmethod
    def of_part(cls, part: pa.Table, threshold: float, drift: bool = True) -> PartFigures:
        figures, names, columns = cls(rows=part.num_rows), _Names(), part.column_names
        if "error_kind" in columns:
            failed = pc.is_valid(part.column("error_kind"))
            if pc.any(failed).as_py():
                bad = part.filter(failed).select(["uri", "error_kind", "error"])
                figures.errors.update(bad.column("error_kind").to_pylist())
                figures.first_errors = [
                    [r["uri"], r["error_kind"], cut(r["error"] or "", ERROR_CHARS)]
                    for r in bad.slice(0, MAX_ERRORS).to_pylist()
                ]
        if "tags" in columns:
            tags = pc.list_flatten(part.column("tags"))
            figures.tags = names.tally(tags)
            if "scores" in columns:
                scores = pc.list_flatten(part.column("scores")).to_numpy(zero_copy_only=False)
                figures.score_hist = np.histogram(np.clip(scores, 0, 1), SCORE_BINS)[0].tolist()
                unsure = (scores >= threshold) & (scores < threshold + BORDERLINE)
                figures.borderline = names.tally(tags.filter(pa.array(unsure)))
        for name in sorted(n for n in columns if n.startswith("tags_")):
            figures.by_category[name.removeprefix("tags_")] = names.tally(pc.list_flatten(part.column(name)))
        if "ood_distance" in columns:
            figures._ood(part)
        if drift:
            figures.drift = _drift(part, figures, names)
        figures.vocab = list(names.index)
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
        drift = self.drift
        return {
            "rows": self.rows,
            "errors": _pairs(self.errors),
            "first_errors": self.first_errors,
            "vocab": self.vocab,
            "tags": _lists(self.tags),
            "borderline": _lists(self.borderline),
            "by_category": {c: _lists(t) for c, t in self.by_category.items()},
            "score_hist": self.score_hist,
            "ood_count": self.ood_count,
            "ood_sketch": _lists(self.ood_sketch),
            "top_ood": self.top_ood,
            "ood_flagged": self.ood_flagged,
            "drift": None
            if drift is None
            else {
                "rows": drift.rows,
                "decoded": drift.decoded,
                "ood_known": drift.ood_known,
                "ood": drift.ood,
                "errors": _pairs(drift.errors),
                "tags": None if drift.tags is None else _lists(drift.tags),
            },
        }

    @classmethod
    def from_record(cls, record: dict) -> PartFigures:
        drift = record["drift"]
        return cls(
            rows=record["rows"],
            errors=Counter(dict(zip(*record["errors"]))),
            first_errors=record["first_errors"],
            vocab=record["vocab"],
            tags=_tally(record["tags"]),
            borderline=_tally(record["borderline"]),
            by_category={c: _tally(t) for c, t in record["by_category"].items()},
            score_hist=record["score_hist"],
            ood_count=record["ood_count"],
            ood_sketch=_tally(record["ood_sketch"]),
            top_ood=record["top_ood"],
            ood_flagged=record["ood_flagged"],
            drift=None
            if drift is None
            else DriftFigures(
                rows=drift["rows"],
                decoded=drift["decoded"],
                ood_known=drift["ood_known"],
                ood=drift["ood"],
                errors=Counter(dict(zip(*drift["errors"]))),
                tags=None if drift["tags"] is None else _tally(drift["tags"]),
            ),
        )


def _drift(part: pa.Table, figures: PartFigures, names: _Names) -> DriftFigures:
    """The drift's counts of the part (RateCounts.add's own, so they are the drift's)."""
    counts = RateCounts().add(part)
    vocab = list(names.index)
    ids, n = figures.tags
    same = counts.tags == Counter(dict(zip((vocab[i] for i in ids.tolist()), n.tolist())))
    tags = None if same else names.of(list(counts.tags), list(counts.tags.values()))
    return DriftFigures(counts.rows, counts.decoded, counts.ood_known, counts.ood, counts.errors, tags)


def _pairs(counts: Counter) -> list:
    """[keys, counts]: JSON keeps a None key as it is in a list, not as an object key."""
    return [list(counts), list(counts.values())]


def _lists(tally: Tally) -> list:
    return [tally[0].tolist(), tally[1].tolist()]


def _tally(lists: list) -> Tally:
    return np.asarray(lists[0], np.int64), np.asarray(lists[1], np.int64)


# ---- the sum -----------------------------------------------------------------------
@dataclass
class Figures:
    """The page's figures over the table's parts."""

    rows: int = 0
    errors: Counter = field(default_factory=Counter)
    first_errors: list = field(default_factory=list)  # {uri, error_kind, error}
    by_category: dict = field(default_factory=dict)  # category -> Counter, categories sorted
    tag_counts: Counter = field(default_factory=Counter)
    borderline: Counter = field(default_factory=Counter)
    score_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_BINS) - 1, np.int64))
    ood_count: int = 0
    top_ood: list = field(default_factory=list)  # (distance, uri), a heap
    ood_flagged: int = 0
    ood_cdf: tuple = (_EMPTY, _EMPTY)  # (values, how many distances are below each)

    def ood_quantile(self, q: float) -> float:
        """The q-quantile of the OOD distances: where the (q * n)th distance lies,
        within its bucket's range (0.1% of the value)."""
        values, below = self.ood_cdf
        return float(np.interp(q * below[-1], below, values)) if len(below) else float("nan")

    def ood_histogram(self, edges: np.ndarray) -> np.ndarray:
        """Counts of the OOD distances in these bins, those outside in the end bins."""
        values, below = self.ood_cdf
        if not len(below):
            return np.zeros(len(edges) - 1, np.int64)
        at_edges = np.interp(edges, values, below)
        at_edges[0], at_edges[-1] = 0, below[-1]
        return np.diff(np.round(at_edges)).astype(np.int64)


class Accumulator:
    """PartFigures added up, in part order: tag counts as arrays over one list of names;
    with `side` (DriftScan's: shared, before, after), the part's drift counts too."""

    def __init__(self) -> None:
        self.figures = Figures()
        self.index: dict = {}  # tag name -> its position in the arrays
        self.tallies: dict[str, np.ndarray] = {}  # "tags", "borderline", "tags_<category>", "drift <side>"
        self.categories: set[str] = set()
        self.ood_buckets = np.zeros(1 << (32 - _SHIFT), np.int64)
        self.drift: dict[str, RateCounts] = {}

    def add(self, part: PartFigures, side: str | None = None, page: bool = True) -> None:
        """page False: the drift's counts only (a part of the version compared with)."""
        ids = np.fromiter((self.index.setdefault(n, len(self.index)) for n in part.vocab), np.int64)
        if page:
            self._page(part, ids)
        if side is not None and part.drift is not None:
            drift = self.drift.setdefault(side, RateCounts())
            drift.rows, drift.decoded = drift.rows + part.drift.rows, drift.decoded + part.drift.decoded
            drift.ood_known, drift.ood = drift.ood_known + part.drift.ood_known, drift.ood + part.drift.ood
            drift.errors.update(part.drift.errors)
            self._tally(f"drift {side}", ids, part.tags if part.drift.tags is None else part.drift.tags)

    def _page(self, part: PartFigures, ids: np.ndarray) -> None:
        acc = self.figures
        acc.rows += part.rows
        acc.errors.update(part.errors)
        room = MAX_ERRORS - len(acc.first_errors)
        if room > 0:
            acc.first_errors.extend(
                {"uri": u, "error_kind": k, "error": e} for u, k, e in part.first_errors[:room]
            )
        self._tally("tags", ids, part.tags)
        self._tally("borderline", ids, part.borderline)
        for category, tally in part.by_category.items():
            self.categories.add(category)
            self._tally(f"tags_{category}", ids, tally)
        acc.score_hist += np.asarray(part.score_hist, np.int64)
        acc.ood_count += part.ood_count
        self.ood_buckets[part.ood_sketch[0]] += part.ood_sketch[1]
        for distance, uri in part.top_ood:
            item = (distance, uri)
            (heapq.heappush if len(acc.top_ood) < TOP_OOD else heapq.heappushpop)(acc.top_ood, item)
        acc.ood_flagged += part.ood_flagged

    def _tally(self, name: str, ids: np.ndarray, tally: Tally) -> None:
        counts = self.tallies.get(name, _EMPTY)
        if len(counts) < len(self.index):  # room for the new names, doubling
            counts = np.concatenate(
                [counts, np.zeros(max(len(self.index), 2 * len(counts)) - len(counts), np.int64)]
            )
            self.tallies[name] = counts
        counts[ids[tally[0]]] += tally[1]  # a part's tally names each tag once

    def _counter(self, name: str) -> Counter:
        counts = self.tallies.get(name, _EMPTY)
        names = list(self.index)
        return Counter({names[i]: int(counts[i]) for i in np.flatnonzero(counts).tolist()})

    def result(self) -> Figures:
        """The page's figures (Counters, in the order the names were first seen)."""
        acc = self.figures
        acc.tag_counts, acc.borderline = self._counter("tags"), self._counter("borderline")
        acc.by_category = {c: self._counter(f"tags_{c}") for c in sorted(self.categories)}
        ids = np.flatnonzero(self.ood_buckets)
        if len(ids):
            low, high = bucket_bounds(ids)
            counts = self.ood_buckets[ids].astype(np.float64)
            ends = np.cumsum(counts)
            acc.ood_cdf = (np.stack([low, high], 1).ravel(), np.stack([ends - counts, ends], 1).ravel())
        return acc

    def drift_counts(self, side: str) -> RateCounts:
        counts = self.drift.get(side, RateCounts())
        counts.tags = self._counter(f"drift {side}")
        return counts
