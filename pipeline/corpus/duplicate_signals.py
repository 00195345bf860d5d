"""The evidence that two images are the same picture, one signal at a time.

- sha256: the same bytes.
- phash: Hamming distance <= R between hashes that carry detail. A hash is unreliable
  when its row says so (phash_degenerate: blank, or more than LOW_DETAIL_BITS fragile
  bits, pipeline/image/phash.py) or, for rows written before that count existed, when it lies
  within NEAR_BLANK_BITS of a blank image's hash. Unreliable hashes match nothing.
- embedding: cosine similarity >= a threshold on the tagger's own pooled embedding
  (pipeline/corpus/embedding_search.py), which survives crops, borders and colour edits that
  move phash. The threshold is given, or chosen from the data (auto_threshold).

Each signal gives edges (row a, row b, signal, phash distance or cosine); dedup, split
and audit take the union.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.corpus.embedding_search import cosine_pairs_of_units, unit_rows
from pipeline.corpus.hamming_search import near_pairs, pairs_touching
from pipeline.image.phash import near_blank

SHA256, PHASH, EMBEDDING = "sha256", "phash", "embedding"
DEFAULT_TARGET_RATE = 1e-6  # auto threshold: false matches per random pair
# float16 unit rows (as stored) give an identical pair a cosine of ~0.9998, not 1: no
# threshold above this can be told apart from "identical", so none is used
MAX_THRESHOLD = 0.999
RANDOM_PAIRS = 2_000_000  # random pairs sampled to estimate that rate


@dataclass
class Edges:
    """Row pairs and what joined them (a signal per edge)."""

    a: list = field(default_factory=list)
    b: list = field(default_factory=list)
    signal: list = field(default_factory=list)
    distance: list = field(default_factory=list)  # phash bits (phash edges), else -1
    cosine: list = field(default_factory=list)  # embedding edges, else nan
    counts: dict = field(default_factory=lambda: {SHA256: 0, PHASH: 0, EMBEDDING: 0})  # signal -> edges

    def add(self, a: np.ndarray, b: np.ndarray, signal: str, distance=None, cosine=None) -> None:
        n = len(a)
        self.counts[signal] += n
        self.a.append(np.asarray(a, np.int64))
        self.b.append(np.asarray(b, np.int64))
        self.signal.append(np.full(n, signal, object))
        self.distance.append(np.full(n, -1, np.int16) if distance is None else np.asarray(distance, np.int16))
        # float16 unit rows can give 1.0002 for a pair of identical vectors: stored as at most 1
        self.cosine.append(
            np.full(n, np.nan, np.float32)
            if cosine is None
            else np.minimum(np.asarray(cosine, np.float32), 1)
        )

    def arrays(self) -> tuple[np.ndarray, ...]:
        def cat(parts, dtype):
            return np.concatenate(parts) if parts else np.zeros(0, dtype)

        return (
            cat(self.a, np.int64),
            cat(self.b, np.int64),
            cat(self.signal, object),
            cat(self.distance, np.int16),
            cat(self.cosine, np.float32),
        )


def table_hashes(table: pa.Table, flag_column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """A table's phash column as (hashes, 0 where missing; has a hash; usable for
    matching; unusable counts by reason), with the row flag in flag_column if present."""
    column = table.column("phash")
    has_hash = column.is_valid().to_numpy(zero_copy_only=False)
    hashes = column.fill_null(0).to_numpy().astype(np.uint64)
    flagged = None
    if flag_column in table.column_names:
        flagged = table.column(flag_column).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    usable, reasons = hash_reliability(hashes, has_hash, flagged)
    return hashes, has_hash, usable, reasons


def hash_reliability(
    phash: np.ndarray, has_hash: np.ndarray, flagged: np.ndarray | None
) -> tuple[np.ndarray, dict]:
    """(usable mask, counts of unusable hashes by reason)."""
    flagged = np.zeros(len(phash), bool) if flagged is None else flagged
    blank = near_blank(phash) & has_hash & ~flagged
    usable = has_hash & ~flagged & ~blank
    reasons = {
        "no_hash": int((~has_hash).sum()),
        "low_detail": int((has_hash & flagged).sum()),
        "near_blank_hash": int(blank.sum()),
    }
    return usable, reasons


def sha256_edges(sha256: list, edges: Edges) -> int:
    """Every row to the first row with its bytes; returns the exact copies (rows - distinct)."""
    present = [i for i, s in enumerate(sha256) if s]
    if not present:
        return 0
    values = np.asarray([sha256[i] for i in present], object)
    rows = np.asarray(present, np.int64)
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    other = rows[first][inverse]
    keep = other != rows
    edges.add(rows[keep], other[keep], SHA256)
    return int(len(rows) - len(first))


def phash_edges(phash: np.ndarray, usable: np.ndarray, max_distance: int, edges: Edges) -> int:
    """Same hash, and distinct hashes within max_distance; returns the near pairs of distinct hashes."""
    rows = np.flatnonzero(usable)
    if not len(rows):
        return 0
    hashes, first, inverse = np.unique(phash[rows], return_index=True, return_inverse=True)
    rep = rows[first]
    same = rep[inverse] != rows
    edges.add(rows[same], rep[inverse][same], PHASH, distance=np.zeros(int(same.sum())))
    a, b = near_pairs(hashes, max_distance)
    edges.add(rep[a], rep[b], PHASH, distance=np.bitwise_count(hashes[a] ^ hashes[b]))
    return int(len(a))


@dataclass
class ThresholdChoice:
    """How the embedding threshold was chosen, for the summary and the report."""

    threshold: float | None  # None: auto could not choose one (see reason); embedding edges are off
    chosen_by: str  # "auto" or "given"
    target_rate: float | None = None
    positive_pairs: int = 0  # sha256/phash-confirmed pairs between rows with embeddings
    positive_recall: float | None = None  # of those, the share at or above the threshold
    negative_pairs: int = 0  # random pairs not joined by sha256/phash
    negative_rate: float | None = None  # of those, the share at or above the threshold
    reason: str = ""  # why auto chose none


def auto_threshold(
    unit: np.ndarray,
    usable: np.ndarray,
    positives: tuple[np.ndarray, np.ndarray],
    same_group: np.ndarray,
    target_rate: float = DEFAULT_TARGET_RATE,
    seed: int = 0,
) -> ThresholdChoice:
    """The cosine at which random pairs would match at target_rate, from the data.

    Negatives: random pairs of usable rows (all pairs when there are few) that sha256
    and phash did not already join (same_group), so known copies do not count. Copies
    nobody has found yet are among them too, and at 1e-6 they would set the bar (a
    corpus with 5% copies has 0.05 / n of its pairs copies: 1.7e-5 at n = 3,000). So the
    threshold is not read at 1e-6 directly: log10 of the negatives' survival is fitted,
    as a line in the cosine, between survival 1e-2 and 1e-4 (or 10 pairs), where copies
    are too rare to matter, and extrapolated to target_rate. Real similarity tails fall
    faster than that line, so the estimate errs towards fewer false matches. Positives
    (pairs sha256 and phash joined) do not choose it; they report its recall."""
    negatives = _negative_cosines(unit, usable, same_group, seed)
    choice = ThresholdChoice(None, "auto", target_rate, negative_pairs=int(len(negatives)))
    if len(negatives) < 100:
        choice.reason = f"{len(negatives)} random pairs, too few to estimate a false-match rate"
        return choice
    ranked = np.sort(negatives)[::-1]
    levels = np.logspace(-2, np.log10(max(1e-4, 10 / len(ranked))), 12)
    at = ranked[np.minimum((levels * len(ranked)).astype(np.int64), len(ranked) - 1)].astype(np.float64)
    fitted = 1.0
    if float(at[-1] - at[0]) >= 1e-6:
        slope, intercept = np.polyfit(at, np.log10(levels), 1)
        fitted = (np.log10(target_rate) - intercept) / slope if slope < 0 else 1.0
    if fitted > MAX_THRESHOLD:
        # the random pairs' own tail is near-identical: unfound copies are too common
        # (over ~1e-4 of pairs) or the embedding does not separate images; a cosine read
        # off such a tail would find nothing and look clean
        near = int((negatives >= 0.99).sum())
        choice.reason = (
            f"random pairs are near-identical too often ({near} of {len(negatives)} at cosine >= 0.99): "
            "give --embedding-threshold a cosine"
        )
        choice.negative_rate = float((negatives >= MAX_THRESHOLD).mean())
        return choice
    choice.threshold = float(fitted)
    choice.negative_rate = float((negatives >= choice.threshold).mean())
    return _with_recall(choice, unit, positives)


def _negative_cosines(unit: np.ndarray, usable: np.ndarray, same_group: np.ndarray, seed: int) -> np.ndarray:
    """Cosines of random pairs of usable rows not already joined (all such pairs when few)."""
    rows = np.flatnonzero(usable)
    m = len(rows)
    if m < 2:
        return np.zeros(0, np.float32)
    if m * (m - 1) // 2 <= RANDOM_PAIRS:
        a, b = np.triu_indices(m, 1)
    else:
        rng = np.random.default_rng(seed)
        a, b = rng.integers(0, m, RANDOM_PAIRS), rng.integers(0, m, RANDOM_PAIRS)
    a, b = rows[a], rows[b]
    keep = (a != b) & (same_group[a] != same_group[b])
    return _cosines(unit, a[keep], b[keep])


def _with_recall(choice: ThresholdChoice, unit: np.ndarray, positives) -> ThresholdChoice:
    sims = _cosines(unit, *positives)
    choice.positive_pairs = int(len(sims))
    choice.positive_recall = float((sims >= choice.threshold).mean()) if len(sims) else None
    return choice


def _cosines(unit: np.ndarray, a: np.ndarray, b: np.ndarray, block: int = 65_536) -> np.ndarray:
    out = np.empty(len(a), np.float32)
    for start in range(0, len(a), block):
        x = unit[a[start : start + block]].astype(np.float32)
        y = unit[b[start : start + block]].astype(np.float32)
        out[start : start + block] = np.einsum("ij,ij->i", x, y)
    return out


def embedding_matrix(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(rows that have an embedding, their vectors [m, d] float16) from the table's column."""
    array = column.combine_chunks()
    valid = np.flatnonzero(array.is_valid().to_numpy(zero_copy_only=False))
    if not len(valid):
        return valid, np.zeros((0, 0), np.float16)
    present = array.take(pa.array(valid))
    width = present.type.list_size if pa.types.is_fixed_size_list(present.type) else len(present[0])
    values = present.flatten().to_numpy(zero_copy_only=False)
    return valid, values.reshape(len(valid), width).astype(np.float16, copy=False)


def embedding_edges(
    vectors: np.ndarray,
    rows: np.ndarray,
    threshold: float | str,
    same_group: np.ndarray,
    positives: tuple[np.ndarray, np.ndarray],
    edges: Edges,
    negatives_from: np.ndarray | None = None,
) -> tuple[ThresholdChoice, dict]:
    """Cosine edges between rows (the table rows of vectors' rows).

    threshold: a cosine (at most MAX_THRESHOLD is used), or "auto" (auto_threshold;
    its random pairs from negatives_from, default every usable row). same_group and
    positives index vectors' rows. Returns the choice (threshold None: no edges) and
    the search's facts, with the usable mask (zero or non-finite vectors are not)."""
    unit, usable = unit_rows(vectors)
    first, second = (np.asarray(p, np.int64) for p in positives)
    ok = usable[first] & usable[second] if len(first) else np.zeros(0, bool)
    positives = (first[ok], second[ok])
    if threshold == "auto":
        choice = auto_threshold(
            unit, negatives_from if negatives_from is not None else usable, positives, same_group
        )
    else:
        choice = _with_recall(ThresholdChoice(min(float(threshold), MAX_THRESHOLD), "given"), unit, positives)
    facts = {"rows": int(len(rows)), "unusable": int((~usable).sum()), "usable": usable}
    if choice.threshold is None:
        return choice, {**facts, "method": "none", "partitions": 0, "pairs": 0}
    found = cosine_pairs_of_units(unit, usable, choice.threshold)
    edges.add(rows[found.a], rows[found.b], EMBEDDING, cosine=found.similarity)
    facts.update(method=found.method, partitions=found.partitions, pairs=int(len(found.a)))
    return choice, facts


@dataclass
class ExactSignals:
    """sha256 and phash over a corpus's rows, as graph nodes: per row its sha256 group and
    its distinct reliable hash (-1: none), and the pairs of distinct hashes within R."""

    sha_group: np.ndarray  # int64 per row
    groups: int
    hash_node: np.ndarray  # int64 per row: index into hashes
    hashes: np.ndarray  # distinct reliable hashes, sorted
    pair_a: np.ndarray  # indices into hashes
    pair_b: np.ndarray
    distance: np.ndarray
    usable: np.ndarray  # rows whose hash can match
    unmatched: dict  # reason -> rows whose hash matches nothing
    searched: int  # distinct hashes searched this run (new ones, or all)


def exact_signals(
    sha256: pa.Array,
    phash: np.ndarray,
    has_hash: np.ndarray,
    degenerate: np.ndarray,
    max_distance: int,
    previous: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> ExactSignals:
    """previous: (hashes the last run had, its pairs as hash values a, b, distance): only
    hashes new since then are searched, against all; its pairs of hashes still present stay."""
    encoded = pc.dictionary_encode(sha256) if len(sha256) else None
    sha_group = (
        encoded.indices.fill_null(-1).to_numpy().astype(np.int64)
        if encoded is not None
        else np.zeros(0, np.int64)
    )
    usable, unmatched = hash_reliability(phash, has_hash, degenerate)
    hashes, inverse = np.unique(phash[usable], return_inverse=True)
    hash_node = np.full(len(phash), -1, np.int64)
    hash_node[usable] = inverse.reshape(-1)
    if previous is None:
        a, b = near_pairs(hashes, max_distance)
        searched = len(hashes)
    else:
        old_hashes, old_a, old_b, old_d = previous
        fresh = ~np.isin(hashes, old_hashes)
        a, b = pairs_touching(hashes, fresh, max_distance)
        keep_a, keep_b = _present(hashes, old_a), _present(hashes, old_b)
        a = np.r_[a, keep_a[0][keep_a[1] & keep_b[1]]]
        b = np.r_[b, keep_b[0][keep_a[1] & keep_b[1]]]
        searched = int(fresh.sum())
    distance = np.bitwise_count(hashes[a] ^ hashes[b]).astype(np.int16)
    return ExactSignals(
        sha_group,
        int(len(encoded.dictionary)) if encoded is not None else 0,
        hash_node,
        hashes,
        a.astype(np.int64),
        b.astype(np.int64),
        distance,
        usable,
        unmatched,
        searched,
    )


def _present(hashes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    at = np.minimum(np.searchsorted(hashes, values), max(len(hashes) - 1, 0))
    return at, (hashes[at] == values) if len(hashes) else np.zeros(len(values), bool)
