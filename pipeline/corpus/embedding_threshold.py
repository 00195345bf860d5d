"""The embedding cosine at which two images count as copies: given, or chosen (auto) per corpus.

A threshold is judged by two numbers, each measured for what it is named:

- **expected false edges**: over the (query, vector) pairs the search actually scores,
  how many unrelated pairs would reach the cosine. The budget is for the whole corpus,
  `budget_per_row` x rows (default 1 per 10,000 rows), not a per-pair rate: a per-pair
  rate of 1e-6 over a million rows' comparisons is thousands of false edges. Below 1,000
  rows the budget is 0.1 edge: a small corpus has too few pairs to show a stricter bar.
- **recall** of known copies at the threshold: planted edits of the corpus's own images
  (crops, flips, borders... tagged at tag time: `TagTable.edit_calibration`), per edit
  kind, or else pairs that sha256 or phash already joined. This is the share of copies
  a threshold *accepts*; what the search *found* is measured separately
  (`search_recall`, an exact check of sampled queries).

Negatives are the compared pairs themselves: sampled queries' top candidates, re-ranked
exactly, give the upper tail of the cosines the search scores. Copies sit in that tail
too (a duplicate-heavy corpus has many), so the pairs sha256 or phash joined are left
out, and so is everything from where the known copies start (their 5% quantile), or
lower, from the jump in the tail that leads up to it (copies of copies: see `tail_fit`).
The rest is fitted with a generalised Pareto distribution over a high level, told where
the data stop (the peaks-over-threshold method of extreme-value statistics), extrapolated
to the budget (`budget_threshold`). With no known copies nothing is cut: copies nobody found
then thicken the fitted tail, which raises the threshold (fewer edges, never more).

auto then takes the highest recall within the budget, and, among thresholds that keep
it to within one point, sits half-way between the budget's edge and the copies: the
margin on both sides. When even that recall is poor, the embedding does not separate
copies from unrelated images on this corpus: said plainly, with the numbers, and the
budget's threshold is used all the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

DEFAULT_BUDGET_PER_ROW = 1e-4  # expected false edges per row: 1 per 10,000 rows
# and 0.1 in a corpus under 1,000 rows: a stricter bar than that is more than a small
# corpus's pairs can show
MIN_BUDGET_EDGES = 0.1
MAX_THRESHOLD = 0.999  # float16 unit rows give identical vectors ~0.9998: nothing above is meaningful
SAMPLE_QUERIES = 2_000
SAMPLE_NEIGHBOURS = 256  # candidates per sampled query: the tail of its compared pairs
RECALL_SLACK = 0.01  # recall given up to move away from the budget's edge
POOR_RECALL = 0.5  # below this at the budget's edge, the embedding does not separate copies
MIN_TAIL_PAIRS = 30  # the deepest level read: fewer pairs are noise
COPIES_QUANTILE = 0.05  # known copies from this quantile up (or a jump below it) are left out
JUMP = 3.0
JUMP_REACH = 0.2  # a jump landing this far below the known copies still starts the copies
MIN_EXCEEDANCES = 50  # sampled pairs above u, at least, to fit the tail
MIN_SHAPE = 30  # planted edits, at least, to take copies out by their shape
FIT_DECADES = 1.0  # the tail fitted: this much survival above its deepest clean level


@dataclass(frozen=True)
class IndexSearch:
    """What an audit's search in dedup's index covered (its `embedding.index`): the
    vectors on each side, and how many it searched (an incremental audit: what changed)."""

    mode: str = "full"  # full | incremental
    eval_vectors: int = 0
    train_vectors: int = 0
    eval_searched: int = 0
    train_searched: int = 0

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> IndexSearch | None:
        """From a stored `index` ({} or absent: the audit searched an index of its own)."""
        if not record:
            return None
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})

    def text(self) -> str:
        return (
            f"searched in dedup's index ({self.mode}: {self.eval_searched} eval "
            f"and {self.train_searched} train vectors)"
        )


@dataclass
class EmbeddingThreshold:
    """How the embedding threshold was set, and what it was measured to do: dedup's
    summary, the audit's report and the duplicate index keep it (as record()); the
    nightly hands dedup's threshold to the audit."""

    threshold: float | None = None  # None: the embedding was not used
    chosen_by: str = "off"  # given | auto | kept (an earlier run's, from the index) | off
    floor: float | None = None  # the cosine the index's edges were searched at (<= threshold)
    budget_per_row: float = DEFAULT_BUDGET_PER_ROW
    budget_threshold: float | None = None  # the lowest cosine within the budget (auto)
    pairs_compared: int = 0  # (query, vector) pairs the full search scores
    expected_false_edges: float | None = None  # at the threshold, over pairs_compared
    negatives_sampled: int = 0  # compared pairs whose exact cosine fitted the tail
    tail: dict[str, float] = field(default_factory=dict)  # the fit: u, shape, scale, ...
    positives: str = "none"  # planted edits | hash-confirmed pairs | none
    positive_pairs: int = 0
    threshold_recall: float | None = None  # share of positives at or above the threshold
    recall_by_edit: dict[str, float] = field(default_factory=dict)  # edit -> share at or above it
    search_recall: dict[str, int] = field(default_factory=dict)  # measured after the search (dedup)
    reason: str = ""  # why it is off, or a plain warning about it
    index: IndexSearch | None = None  # the audit: what its search in dedup's index covered

    def record(self) -> dict[str, Any]:
        """As stored: `index` {} when the audit searched an index of its own (or for dedup)."""
        return {**asdict(self), "index": asdict(self.index) if self.index else {}}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> EmbeddingThreshold:
        """From a stored record (dedup's _summary.json, an index version, an audit's):
        fields it lacks take their defaults ({}: not used); one with a threshold but no
        chosen_by was given."""
        known = {k: v for k, v in (record or {}).items() if k in cls.__dataclass_fields__}
        if known.get("threshold") is not None:
            known.setdefault("chosen_by", "given")
        known["index"] = IndexSearch.from_record(known.get("index"))
        return cls(**known)

    @property
    def used(self) -> bool:
        return self.threshold is not None

    def text(self) -> str:
        if self.threshold is None:
            return f"embedding not used ({self.reason or 'not asked'})"
        parts = [f"embedding cosine >= {self.threshold:.4f} ({self.chosen_by})"]
        if self.expected_false_edges is not None:
            parts.append(
                f"expected false edges {self.expected_false_edges:.2g} over {self.pairs_compared:,} "
                f"pairs compared (budget {self.budget_per_row:g} a row)"
            )
        if self.threshold_recall is not None:
            parts.append(
                f"{self.positives} at or above it {self.threshold_recall:.3f} of {self.positive_pairs}"
            )
        if self.recall_by_edit:
            parts.append(
                "by edit " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.recall_by_edit.items()))
            )
        s = self.search_recall
        if s.get("hash_confirmed_reaching"):
            parts.append(
                f"search found {s['hash_confirmed_found']} of {s['hash_confirmed_reaching']} hash-confirmed "
                "pairs at or above it"
            )
        if s.get("sampled_true"):
            parts.append(
                f"search recall {s['sampled_found'] / s['sampled_true']:.3f} "
                f"({s['sampled_found']} of {s['sampled_true']} true neighbours "
                f"of {s['queries']} sampled queries)"
            )
        if s.get("index_version"):
            parts.append(f"searches checked at index version {s['index_version']}")
        if self.reason:
            parts.append(f"warning: {self.reason}")
        return "; ".join(parts)


def tail_fit(
    cosines: np.ndarray,
    denominator: float,
    copies_from: float | None = None,
    copies_shape: np.ndarray | None = None,
) -> dict:
    """The unrelated pairs' upper tail, as a generalised Pareto distribution over the sampled
    cosines above a high level u (peaks over threshold: scipy's genpareto, fitted by maximum
    likelihood), leaving out the copies' part of the tail.

    cosines: sampled queries' top candidates, exact; denominator: the compared pairs they
    are the top of. copies_from: where known copies start (None: nothing is left out).
    Copies of copies sit a little lower (two 0.95 edits are 0.90 apart), so the cut moves
    down to the first jump in the tail that lands within JUMP_REACH of copies_from: read
    every quarter decade of survival, a jump is a step over JUMP x the median of the four
    before it (and over 0.05). A jump landing lower is unrelated images crowding (a
    cluster of one subject), kept in. u is FIT_DECADES of survival above the deepest
    clean level, and at most a quarter of the sample's coverage, so that every sampled
    query's kept candidates reach it. A fitted shape below 0 (a bounded tail, lighter than
    exponential) is not taken: a few hundred exceedances cannot show a bound, and a light
    tail assumed wrongly lets false edges through (a Gaussian's tail fits at about -0.2 and
    then underestimates the pairs past 4 sigma forty-fold). The fit knows the data stop at
    the cut (`_truncated_fit`).

    copies_shape: the planted edits' cosines (how copies of this corpus's images look to
    this model). Then the copies are taken out by their expected count instead: as many
    sampled pairs as copies of that shape would put in each cosine bin below its median,
    scaled by the pairs above the median (nearly all copies), are left out, and the cut is
    at the median (`_without_copies`). A corpus that is a tenth copies, whose heavy edits
    reach down among unrelated pairs, keeps its unrelated tail."""

    ranked = np.sort(np.asarray(cosines, np.float64))[::-1]
    top = len(ranked) / denominator
    if len(ranked) < MIN_EXCEEDANCES or top <= MIN_TAIL_PAIRS / denominator * 10:
        return {}
    removed = 0
    if copies_shape is not None and len(copies_shape) >= MIN_SHAPE:
        cut = float(np.median(copies_shape))
        ranked, removed = _without_copies(ranked, np.asarray(copies_shape, np.float64), cut)
    else:
        cut = np.inf if copies_from is None else _copies_cut(ranked, denominator, float(copies_from))
    clean = ranked[ranked < cut]
    deepest = (len(ranked) - len(clean) + MIN_TAIL_PAIRS) / denominator
    if len(clean) < MIN_EXCEEDANCES or deepest * 10**FIT_DECADES > top:
        return {}
    level_u = min(deepest * 10**FIT_DECADES, top / 4)
    u = float(ranked[min(int(level_u * denominator), len(ranked) - 1)])
    excess = clean[clean > u] - u
    if len(excess) < MIN_EXCEEDANCES:
        return {}
    shape, scale = _truncated_fit(excess, cut - u)
    return {
        "model": "generalised Pareto over u",
        "u": u,
        "survival_u": float(level_u),
        "shape": float(shape),
        "scale": float(scale),
        "exceedances": int(len(excess)),
        "copies_from": None if not np.isfinite(cut) else float(cut),
        "copies_removed": int(removed),
    }


def _without_copies(ranked: np.ndarray, shape: np.ndarray, cut: float) -> tuple[np.ndarray, int]:
    """The sampled cosines (descending) less the copies expected below `cut`: copies of the
    planted edits' shape number (pairs at or above cut) / (share of the shape at or above
    it); each of 50 bins below the cut loses its expected share of them, at random (seeded)."""
    above = int((ranked >= cut).sum())
    share = float((shape >= cut).mean())
    if not above or share <= 0:
        return ranked, 0
    copies = above / share
    low = float(min(ranked.min(initial=cut), shape.min()))
    edges = np.linspace(low, cut, 51)
    expected = copies * np.histogram(shape[shape < cut], edges)[0] / len(shape)
    rng = np.random.default_rng(0)
    keep = np.ones(len(ranked), bool)
    bins = np.clip(np.searchsorted(edges, ranked, "right") - 1, 0, 49)
    for b in np.flatnonzero(expected >= 0.5):
        members = np.flatnonzero((bins == b) & (ranked < cut))
        drop = min(len(members), int(round(expected[b])))
        keep[rng.choice(members, size=drop, replace=False)] = False
    return ranked[keep], int((~keep).sum())


def _truncated_fit(excess: np.ndarray, limit: float) -> tuple[float, float]:
    """Maximum likelihood (shape, scale) of a generalised Pareto distribution for exceedances
    observed only below `limit` (the copies' cut): each density divided by the chance of
    falling below it, so a cut into the tail narrows the evidence without bending the fit.
    The shape is kept at 0 or above: a bounded tail is never assumed."""
    from scipy.optimize import minimize
    from scipy.stats import genpareto

    shape, _, scale = genpareto.fit(excess, floc=0)
    start = np.array([max(shape, 0.0), max(scale, 1e-6)])
    if not np.isfinite(limit):
        if shape >= 0:
            return float(shape), float(scale)
        return 0.0, float(excess.mean())

    def cost(p):
        logpdf = genpareto.logpdf(excess, p[0], 0, p[1])
        below = genpareto.cdf(limit, p[0], 0, p[1])
        return -(logpdf.sum() - len(excess) * np.log(max(below, 1e-300)))

    best = minimize(cost, start, bounds=[(0.0, 1.0), (1e-6, 1.0)], method="L-BFGS-B")
    return float(best.x[0]), float(best.x[1])


def _copies_cut(ranked: np.ndarray, denominator: float, copies_from: float) -> float:
    top, bottom = len(ranked) / denominator, MIN_TAIL_PAIRS / denominator
    levels = 10 ** np.arange(math.log10(top), math.log10(bottom), -0.25)
    at = ranked[np.minimum((levels * denominator).astype(np.int64), len(ranked) - 1)]
    steps = np.diff(at)
    for j in range(2, len(steps)):
        usual = float(np.median(steps[max(0, j - 4) : j]))
        if steps[j] > max(JUMP * usual, 0.05) and at[j + 1] >= copies_from - JUMP_REACH:
            return min(copies_from, float(at[j] + at[j + 1]) / 2)
    return copies_from


def expected_false_edges(fit: dict, threshold: float, pairs: float) -> float:
    """Pairs x the fitted survival at the threshold."""
    from scipy.stats import genpareto

    if threshold <= fit["u"]:
        return float("inf")
    tail = genpareto.sf(threshold - fit["u"], fit["shape"], 0, fit["scale"])
    return float(pairs * fit["survival_u"] * tail)


def budget_threshold(fit: dict, budget_edges: float, pairs: float) -> float:
    """The cosine where the fitted tail expects budget_edges false edges over pairs."""
    from scipy.stats import genpareto

    share = budget_edges / (pairs * fit["survival_u"])
    if share >= 1:
        return fit["u"]
    return float(fit["u"] + genpareto.isf(share, fit["shape"], 0, fit["scale"]))


def choose(
    negatives: np.ndarray,
    negatives_denominator: float,
    pairs_compared: int,
    rows: int,
    positives: np.ndarray,
    positive_kind: str,
    edits: dict[str, np.ndarray] | None = None,
    budget_per_row: float = DEFAULT_BUDGET_PER_ROW,
) -> EmbeddingThreshold:
    """auto: the threshold from the compared pairs' tail, the budget and the known copies."""
    decision = EmbeddingThreshold(None, "auto", budget_per_row=budget_per_row, pairs_compared=pairs_compared)
    decision.negatives_sampled = int(len(negatives))
    decision.positives, decision.positive_pairs = (
        (positive_kind if len(positives) else "none"),
        int(len(positives)),
    )
    copies_from = _copies_from(positives)
    # known copies among the unrelated pairs' own cosines (an embedding that does not separate
    # them) would cut the tail away: then it is fitted whole, and the recall below says why
    shape = np.concatenate(list(edits.values())) if edits else None
    decision.tail = tail_fit(negatives, negatives_denominator, copies_from, shape) or tail_fit(
        negatives, negatives_denominator
    )
    if not decision.tail:
        decision.reason = (
            f"{len(negatives)} sampled pairs cannot show the unrelated pairs' tail; "
            "give --embedding-threshold"
        )
        return decision
    budget = max(budget_per_row * rows, MIN_BUDGET_EDGES)
    unbounded = budget_threshold(decision.tail, budget, max(pairs_compared, 1))
    edge = min(unbounded, MAX_THRESHOLD)
    decision.budget_threshold = float(edge)
    where = (
        f"at cosine {edge:.3f}, the lowest within the false-edge budget"
        if unbounded <= MAX_THRESHOLD
        else f"no cosine up to {MAX_THRESHOLD} keeps the expected false edges within the budget "
        f"({budget:.2g} expected false edges); at {MAX_THRESHOLD}"
    )
    chosen = edge
    if len(positives):
        ranked = np.sort(positives)[::-1]
        best = float((ranked >= edge).mean())
        keep = max(1, math.ceil((best - RECALL_SLACK) * len(ranked)))
        chosen = max(edge, (edge + float(ranked[keep - 1])) / 2) if best > RECALL_SLACK else edge
        if best < POOR_RECALL:
            decision.reason = (
                f"this embedding does not separate copies from unrelated images here: {where}, it "
                f"reaches {best:.0%} of {len(ranked)} {positive_kind}"
            )
    if edge >= MAX_THRESHOLD:
        decision.reason = "; ".join(
            r
            for r in (
                "unrelated pairs reach near-identical cosines: only near-identical vectors are joined "
                "(pairs count as unrelated unless sha256 or phash joins them, so in a corpus of many "
                "copies, two edits of one image the hashes miss count as unrelated too)",
                decision.reason,
            )
            if r
        )
    decision.threshold = float(min(chosen, MAX_THRESHOLD))
    return measured(decision, positives, positive_kind, edits)


def _copies_from(positives: np.ndarray) -> float | None:
    """Where known copies start: their 5% quantile (the fit below is told the data stop there,
    so a cut into the unrelated pairs' own tail loses information, not accuracy)."""
    return float(np.quantile(positives, COPIES_QUANTILE)) if len(positives) else None


def measured(
    decision: EmbeddingThreshold,
    positives: np.ndarray,
    positive_kind: str,
    edits: dict[str, np.ndarray] | None = None,
) -> EmbeddingThreshold:
    """Fill the figures at the decided threshold: expected false edges, recall of positives."""
    t = decision.threshold
    if t is None:
        return decision
    if decision.tail:
        decision.expected_false_edges = expected_false_edges(
            decision.tail, t, max(decision.pairs_compared, 1)
        )
    decision.positives = positive_kind if len(positives) else "none"
    decision.positive_pairs = int(len(positives))
    decision.threshold_recall = float((positives >= t).mean()) if len(positives) else None
    decision.recall_by_edit = {k: float((v >= t).mean()) for k, v in (edits or {}).items() if len(v)}
    return decision
