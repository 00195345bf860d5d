"""Source (human) tags compared with the model: likely missing and likely wrong tags, and a
per-image label-quality score, from the probabilities a row stores. Pure: no Ray
(pipeline/job/label_check.py runs it over a table's parts).

Probabilities: a row's `logit_indices`/`logit_values` (float16) through the Postprocessor
(pipeline/model/postprocess.py), the same lookup tags are decided with. Every tag is stored
for vocabularies of <= 4,096 tags; else only those at or above the logit floor, and an
absent tag reads as probability 0. Only tags at or above the floor can be likely missing,
whatever was stored, so dense and sparse rows give the same answer.

Judged tags: those of the vocabulary's threshold categories (general, character, copyright,
artist, meta, ...), or the ones `label_categories` names. rating and quality are softmax
groups with one argmax winner, not independent tags: never judged. Source tags the
vocabulary lacks are kept in `source_tags`, never judged, and counted.

Rules, per tag k with probability p and source label y (1: the humans gave it):
- calibrated (the bundle's calibration table applies): q = calibrated p. Likely missing:
  y = 0 and q >= the category's missing cut-off (default 0.85); likely wrong: y = 1 and
  q <= its wrong cut-off (0.05; character, copyright, artist 0.01). With a calibrated q,
  the cut-off is about the share of flags that are right (as far as the calibration holds
  on this corpus).
- data (no calibration): confident learning's per-class thresholds, one-vs-rest per tag
  (cleanlab's multi-label `get_confident_thresholds`): t1 = mean p over the rows given k,
  t0 = mean (1 - p) over the rows not given it (a class no row has: 2, never confident;
  both at least 2e-6). A row is confidently "has k" when p >= t1 - 1e-6, "lacks k" when
  1 - p >= t0 - 1e-6; when both, the larger of p and 1 - p (a tie: lacks): the confident
  joint's off-diagonal (cleanlab's filter_by="confident_learning"). Then, as cleanlab's
  find_label_issues does for every filter, an issue stays only where the model's own
  prediction (p > 0.5) differs from the given label. So: likely missing = y = 0, confidently
  has, p > 0.5; likely wrong = y = 1, confidently lacks, p <= 0.5.
  Thresholds are sums over the whole version (TagStatistics), so the check is two passes.
label_quality: cleanlab's multi-label label quality score: per judged tag the self-confidence
(q when y = 1, 1 - q when y = 0), aggregated by an exponential moving average over the
scores sorted high to low (EMA_1 = the highest, EMA_t = a * s_t + (1 - a) * EMA_{t-1},
a = 0.8), so the worst few dominate. Tags below the floor that the humans did not give
count as 1 (any number of leading 1s gives the same average as one).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import ConfigError
from pipeline.core.schemas import LABELS_SCHEMA
from pipeline.core.settings import suggestion
from pipeline.corpus.label_settings import DEFAULT_WRONG_CUTOFFS, LabelCheckSettings, LabelRule
from pipeline.corpus.source_tags import MERGED_ROWS_KEY, normalise_tag, read_source_tags
from pipeline.model.postprocess import ARGMAX_CATEGORIES, Postprocessor

__all__ = ["read_source_tags", "LabelRules", "TagStatistics", "index_source_tags", "label_table"]
SLACK, LOWEST_THRESHOLD, NEVER = 1e-6, 2e-6, 2.0  # cleanlab's comparison slack, threshold floor, absent class
CHUNK_ROWS = 1024  # rows per step: bounds the entry arrays of dense rows (4,096 logits each)
INDEXED_SCHEMA = pa.schema(
    [("uri", pa.string()), ("source_tags", pa.list_(pa.string())), ("source_index", pa.list_(pa.int32()))]
)


@dataclass
class TagStatistics:
    """What the data rule's thresholds need, summed over parts: rows with source tags,
    and per tag the rows given it, their summed p, and p summed over all rows."""

    rows: int
    given: np.ndarray  # [T] rows whose source tags include the tag
    p_given: np.ndarray  # [T] sum of p over those rows
    p_all: np.ndarray  # [T] sum of p over every row (absent: 0)

    @classmethod
    def empty(cls, width: int) -> TagStatistics:
        return cls(0, np.zeros(width), np.zeros(width), np.zeros(width))

    def __add__(self, other: TagStatistics) -> TagStatistics:
        return TagStatistics(
            self.rows + other.rows,
            self.given + other.given,
            self.p_given + other.p_given,
            self.p_all + other.p_all,
        )

    def thresholds(self) -> tuple[np.ndarray, np.ndarray]:
        """(t1, t0): mean p over the rows given each tag, mean 1 - p over the others."""
        not_given = self.rows - self.given
        with np.errstate(invalid="ignore", divide="ignore"):
            t1 = np.where(self.given > 0, self.p_given / self.given, NEVER)
            t0 = np.where(not_given > 0, (not_given - (self.p_all - self.p_given)) / not_given, NEVER)
        return np.maximum(t1, LOWEST_THRESHOLD), np.maximum(t0, LOWEST_THRESHOLD)


@dataclass(frozen=True)
class LabelRules:
    """The rules resolved for one model: which tags are judged, and the cut-offs (calibrated)
    or thresholds (data) per tag."""

    rule: LabelRule  # CALIBRATED or DATA
    judged: np.ndarray  # [T] bool
    upper: np.ndarray  # [T] missing at or above (calibrated) | t1 (data)
    lower: np.ndarray  # [T] wrong at or below (calibrated) | t0 (data)
    alpha: float
    floor: float

    @classmethod
    def resolve(
        cls, post: Postprocessor, settings: LabelCheckSettings, statistics: TagStatistics | None = None
    ) -> LabelRules:
        """The rules for this model: `statistics` are needed (and used) by the data rule only."""
        judged = judged_mask(post, settings.label_categories)
        categories = np.asarray(post.category_names)[post.category_of]
        rule = settings.label_rule
        if rule is LabelRule.AUTO:
            rule = LabelRule.CALIBRATED if post.table is not None else LabelRule.DATA
        if rule is LabelRule.CALIBRATED:
            if post.table is None:
                raise ConfigError(
                    "field label_rule: calibrated needs the bundle's calibration table "
                    "(calibration_table in its tag metrics) and calibrate on; use data"
                )
            upper = _per_category(categories, settings.missing_cutoff, settings.category_missing_cutoffs)
            wrong = {**DEFAULT_WRONG_CUTOFFS, **settings.category_wrong_cutoffs}
            lower = _per_category(categories, settings.wrong_cutoff, wrong)
        else:
            if statistics is None:
                raise ValueError("the data rule needs the table's TagStatistics")
            upper, lower = statistics.thresholds()
        return cls(rule, judged, upper, lower, settings.quality_alpha, post.rules.logit_floor)

    def flags(self, cols: np.ndarray, q: np.ndarray, given: bool) -> np.ndarray:
        """Which (tag, probability) pairs are flagged: likely missing among tags not given
        (given False), likely wrong among given ones (given True)."""
        if self.rule is LabelRule.CALIBRATED:
            return q <= self.lower[cols] if given else q >= self.upper[cols]
        has = q >= self.upper[cols] - SLACK
        lacks = 1.0 - q >= self.lower[cols] - SLACK
        predicted = q > 1.0 - q  # the argmax of (1 - q, q); a tie is "lacks", as argmax picks the first
        # the confident guess (the argmax when both are confident) differs from the label,
        # and so does the prediction: with it, the guess is "has" exactly when has & predicted
        if given:
            return lacks & ~predicted
        return has & predicted

    def key(self) -> str:
        """A digest of the resolved rules (part names of labelled parts derive from it)."""
        digest = hashlib.sha256(f"{self.rule}\0{self.alpha!r}\0{self.floor!r}".encode())
        for array in (self.judged, self.upper, self.lower):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


def judged_mask(post: Postprocessor, categories: tuple[str, ...]) -> np.ndarray:
    """[T] bool: the tags of the judged categories (given names, else every threshold one)."""
    names = post.category_names
    for name in categories:
        if name in ARGMAX_CATEGORIES:
            raise ConfigError(
                f"field label_categories: {name} is a softmax group (one argmax winner), not judged"
            )
        if name not in names:
            raise ConfigError(
                f"field label_categories: {name!r} is not a category of this model{suggestion(name, names)}; "
                f"its categories are {', '.join(names)}"
            )
    chosen = [c for c in names if c not in ARGMAX_CATEGORIES and (not categories or c in categories)]
    return np.isin(np.asarray(names)[post.category_of], chosen)


def _per_category(categories: np.ndarray, default: float, by_category: dict[str, float]) -> np.ndarray:
    values = np.full(len(categories), default, np.float64)
    for name, value in by_category.items():
        values[categories == name] = value
    return values


@dataclass
class SourceTagCounts:
    """How the source tags met the vocabulary."""

    rows: int = 0  # uris in the source file
    merged_rows: int = 0  # rows that repeated a uri, merged
    tags: int = 0  # (uri, tag) pairs
    judged: int = 0  # pairs of a judged tag
    unknown: int = 0  # pairs whose tag the vocabulary lacks
    unknown_tags: int = 0  # distinct such tags
    unknown_examples: list = field(default_factory=list)  # the most frequent ones, with counts


def index_source_tags(source: pa.Table, post: Postprocessor, judged: np.ndarray):
    """(uri, source_tags respelt as the vocabulary spells them, source_index: the judged
    tags' vocabulary indices) and the counts. Tags match in the booru spelling
    (normalise_tag) on both sides."""
    lists = source.column("source_tags").combine_chunks()
    flat = pc.list_flatten(lists)
    vocabulary_keys = pa.array([normalise_tag(t) for t in post.tags.tolist()], pa.string())
    cols = _positions(pc.index_in(flat, value_set=vocabulary_keys))
    known = cols >= 0
    names = pc.take(pa.array(post.tags.tolist(), pa.string()), pa.array(np.maximum(cols, 0)))
    spelt = pc.if_else(pa.array(known), names, flat)
    offsets = lists.offsets
    respelt = pa.ListArray.from_arrays(offsets, spelt)
    keep = known & judged[np.maximum(cols, 0)]
    parents = pc.list_parent_indices(lists).to_numpy()
    judged_offsets = np.zeros(len(lists) + 1, np.int32)
    np.cumsum(np.bincount(parents[keep], minlength=len(lists)), out=judged_offsets[1:])
    source_index = pa.ListArray.from_arrays(pa.array(judged_offsets), pa.array(cols[keep], pa.int32()))
    unknown = pc.value_counts(flat.filter(pa.array(~known)))
    top = sorted(unknown.to_pylist(), key=lambda v: (-v["counts"], v["values"]))
    merged = (source.schema.metadata or {}).get(MERGED_ROWS_KEY, b"0")
    counts = SourceTagCounts(
        rows=source.num_rows,
        merged_rows=int(merged),
        tags=len(flat),
        judged=int(keep.sum()),
        unknown=int((~known).sum()),
        unknown_tags=len(top),
        unknown_examples=[(v["values"], v["counts"]) for v in top[:10]],
    )
    uris = source.column("uri").combine_chunks()
    table = pa.Table.from_arrays([uris, respelt, source_index], schema=INDEXED_SCHEMA)
    return table, counts


def join_source(uris: pa.ChunkedArray | pa.Array, source: pa.Table) -> np.ndarray:
    """For each uri, its row in the (indexed) source table, or -1."""
    found = np.full(len(uris), -1, np.int64)
    position = _positions(pc.index_in(source.column("uri"), value_set=uris))
    hit = position >= 0
    found[position[hit]] = np.flatnonzero(hit)
    return found


def _positions(index) -> np.ndarray:
    """pc.index_in's answer as int64, -1 where not found."""
    return np.asarray(pc.fill_null(index, -1).to_numpy(zero_copy_only=False), np.int64)


@dataclass
class PartLabelCounts:
    rows: int = 0
    with_source: int = 0  # rows whose uri the source file has
    judged: int = 0  # of those, rows with stored logits (no error)
    likely_missing: int = 0  # (row, tag) pairs
    likely_wrong: int = 0
    flagged_rows: int = 0  # rows with at least one of either

    def __add__(self, other: PartLabelCounts) -> PartLabelCounts:
        return PartLabelCounts(*(a + b for a, b in zip(self.__dict__.values(), other.__dict__.values())))


@dataclass
class _Chunk:
    """The judged entries of some rows: stored (row, tag, p), whether the humans gave the
    tag, and the given (row, tag) pairs with their p (0 when not stored)."""

    rows: np.ndarray  # the part's row numbers
    e_rows: np.ndarray  # index into rows
    e_cols: np.ndarray
    p: np.ndarray
    e_given: np.ndarray
    l_rows: np.ndarray
    l_cols: np.ndarray
    l_p: np.ndarray


def _chunks(part: pa.Table, source: pa.Table, post: Postprocessor, judged: np.ndarray, where: np.ndarray):
    ok = (where >= 0) & pc.is_null(part.column("error")).to_numpy(zero_copy_only=False)
    ok &= pc.is_valid(part.column("logit_indices")).to_numpy(zero_copy_only=False)
    width = len(judged)
    for chunk in np.array_split(np.flatnonzero(ok), max(1, -(-int(ok.sum()) // CHUNK_ROWS))):
        take = pa.array(chunk, pa.int64())
        indices = pc.take(part.column("logit_indices"), take).combine_chunks()
        values = pc.list_flatten(pc.take(part.column("logit_values"), take).combine_chunks())
        e_rows = pc.list_parent_indices(indices).to_numpy().astype(np.int64)
        e_cols = pc.list_flatten(indices).to_numpy().astype(np.int64)
        p = post.probabilities_of(values.to_numpy(zero_copy_only=False)).astype(np.float64)
        keep = judged[e_cols]
        e_rows, e_cols, p = e_rows[keep], e_cols[keep], p[keep]
        given = pc.take(source.column("source_index"), pa.array(where[chunk])).combine_chunks()
        l_rows = pc.list_parent_indices(given).to_numpy().astype(np.int64)
        l_cols = pc.list_flatten(given).to_numpy().astype(np.int64)
        keys = e_rows * width + e_cols
        order = np.argsort(keys, kind="stable")
        at = np.minimum(np.searchsorted(keys[order], l_rows * width + l_cols), max(len(keys) - 1, 0))
        found = (keys[order][at] == l_rows * width + l_cols) if len(keys) else np.zeros(len(l_rows), bool)
        e_given = np.zeros(len(keys), bool)
        e_given[order[at[found]]] = True
        l_p = np.where(found, p[order[at]] if len(keys) else 0.0, 0.0)
        yield _Chunk(chunk, e_rows, e_cols, p, e_given, l_rows, l_cols, l_p)


def part_statistics(
    part: pa.Table, source: pa.Table, post: Postprocessor, judged: np.ndarray
) -> TagStatistics:
    """One part's contribution to the data rule's thresholds (pass 1)."""
    width = len(judged)
    stats = TagStatistics.empty(width)
    for c in _chunks(part, source, post, judged, join_source(part.column("uri"), source)):
        stats.rows += len(c.rows)
        stats.given += np.bincount(c.l_cols, minlength=width)
        stats.p_given += np.bincount(c.l_cols, weights=c.l_p, minlength=width)
        stats.p_all += np.bincount(c.e_cols, weights=c.p, minlength=width)
    return stats


def label_table(
    part: pa.Table, source: pa.Table, post: Postprocessor, rules: LabelRules
) -> tuple[pa.Table, PartLabelCounts]:
    """The part's label-check columns, one row per part row (LABELS_SCHEMA: uri and the
    six LABEL_FIELDS), as the label sidecar keeps them; `part` needs uri, error and the
    stored logits only."""
    n, where = part.num_rows, join_source(part.column("uri"), source)
    missing, wrong, scored = [], [], np.zeros(n, bool)
    quality = np.zeros(n, np.float32)
    calibrated = rules.rule is LabelRule.CALIBRATED
    n_judged = int(rules.judged.sum())
    for c in _chunks(part, source, post, rules.judged, where):
        q_e = post.score(c.e_cols, c.p).astype(np.float64) if calibrated else c.p
        q_l = post.score(c.l_cols, c.l_p).astype(np.float64) if calibrated else c.l_p
        candidate = ~c.e_given & (c.p >= rules.floor)
        hit = candidate & rules.flags(c.e_cols, q_e, given=False)
        missing.append((c.rows[c.e_rows[hit]], c.e_cols[hit], q_e[hit]))
        bad = rules.flags(c.l_cols, q_l, given=True)
        wrong.append((c.rows[c.l_rows[bad]], c.l_cols[bad], q_l[bad]))
        rows = np.concatenate([c.l_rows, c.e_rows[candidate]])
        values = np.concatenate([q_l, 1.0 - q_e[candidate]])
        padded = np.flatnonzero(np.bincount(rows, minlength=len(c.rows)) < n_judged)
        rows, values = np.concatenate([rows, padded]), np.concatenate([values, np.ones(len(padded))])
        quality[c.rows] = ema_scores(rows, values, len(c.rows), rules.alpha)
        scored[c.rows] = True
    has_source = where >= 0
    source_tags = pc.take(source.column("source_tags"), pa.array(np.where(has_source, where, 0)))
    columns = [
        part.column("uri"),
        pc.if_else(pa.array(has_source), source_tags, pa.nulls(n, pa.list_(pa.string()))),
        *_flag_lists(missing, n, scored, post, descending=True),
        *_flag_lists(wrong, n, scored, post, descending=False),
        pa.array(quality, pa.float32(), mask=~scored),
    ]
    table = pa.Table.from_arrays(columns, schema=LABELS_SCHEMA)
    counts = PartLabelCounts(
        rows=n,
        with_source=int(has_source.sum()),
        judged=int(scored.sum()),
        likely_missing=sum(len(m[0]) for m in missing),
        likely_wrong=sum(len(w[0]) for w in wrong),
        flagged_rows=len(
            np.union1d(
                np.concatenate([m[0] for m in missing] or [[]]), np.concatenate([w[0] for w in wrong] or [[]])
            )
        ),
    )
    return table, counts


def _flag_lists(found: list, n: int, scored: np.ndarray, post: Postprocessor, descending: bool):
    """(tags, scores) list columns: per row its flagged tags, surest first; null unless scored."""
    rows = np.concatenate([f[0] for f in found] or [np.zeros(0, np.int64)]).astype(np.int64)
    cols = np.concatenate([f[1] for f in found] or [np.zeros(0, np.int64)]).astype(np.int64)
    q = np.concatenate([f[2] for f in found] or [np.zeros(0)])
    order = np.lexsort((cols, -q if descending else q, rows))
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    mask = pa.array(~scored)
    names = pa.array(post.tags[cols[order]].tolist(), pa.string())
    return (
        pa.ListArray.from_arrays(pa.array(offsets), names, mask=mask),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(q[order], pa.float32()), mask=mask),
    )


def ema_scores(rows: np.ndarray, values: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Per row r < n, cleanlab's exponential moving average of its values sorted high to
    low: EMA_1 = the highest, EMA_t = alpha * s_t + (1 - alpha) * EMA_{t-1}; 1 for a row
    with none. In closed form the t-th of K values weighs alpha * (1 - alpha)^(K - t),
    the first (1 - alpha)^(K - 1)."""
    order = np.lexsort((-values, rows))
    rows, values = rows[order], values[order]
    counts = np.bincount(rows, minlength=n)
    position = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
    power = (counts[rows] - 1 - position).astype(np.float64)
    weight = np.where(position == 0, (1.0 - alpha) ** power, alpha * (1.0 - alpha) ** power)
    scores = np.bincount(rows, weights=weight * values, minlength=n)
    scores[counts == 0] = 1.0
    return scores
