"""The exact evidence that two images are the same picture: sha256 and phash.

- sha256: the same bytes.
- phash: Hamming distance <= R between hashes that carry detail. A hash is unreliable
  when its row says so (phash_degenerate: blank, or more than LOW_DETAIL_BITS fragile
  bits, pipeline/image/phash.py) or, for rows written before that count existed, when it lies
  within NEAR_BLANK_BITS of a blank image's hash. Unreliable hashes match nothing.

The third signal, the tagger's embedding, is approximate and lives in its own modules
(pipeline/corpus/vector_index.py, dedup_vectors.py, embedding_threshold.py). dedup takes
these as graph nodes (`exact_signals`, `exact_graph`); `Edges` lists row-level edges for
edges.parquet and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.corpus.hamming_search import near_pairs, pairs_touching
from pipeline.image.phash import near_blank

SHA256, PHASH, EMBEDDING = "sha256", "phash", "embedding"


@dataclass
class Edges:
    """Row pairs and what joined them (a signal per edge)."""

    a: list = field(default_factory=list)
    b: list = field(default_factory=list)
    signal: list = field(default_factory=list)
    distance: list = field(default_factory=list)  # phash bits (phash edges), else -1
    cosine: list = field(default_factory=list)  # embedding edges, else nan
    counts: dict[str, int] = field(
        default_factory=lambda: {SHA256: 0, PHASH: 0, EMBEDDING: 0}
    )  # signal -> edges

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
    unmatched: dict[str, int]  # reason -> rows whose hash matches nothing
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


def exact_graph(exact: ExactSignals) -> tuple[np.ndarray, np.ndarray, int]:
    """The exact signals as a graph (a, b, nodes): rows 0..n-1, then sha256 groups, then
    distinct hashes; a row joins its group and its hash, hashes within R join each other."""
    n, g = len(exact.sha_group), exact.groups
    idx = np.arange(n)
    has_sha, has_hash = exact.sha_group >= 0, exact.hash_node >= 0
    a = np.concatenate([idx[has_sha], idx[has_hash], n + g + exact.pair_a])
    b = np.concatenate(
        [n + exact.sha_group[has_sha], n + g + exact.hash_node[has_hash], n + g + exact.pair_b]
    )
    return a, b, n + g + len(exact.hashes)


def known_copies(exact: ExactSignals) -> np.ndarray:
    """Each row's component by sha256 and phash alone."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b, nodes = exact_graph(exact)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(nodes, nodes))
    return connected_components(graph, directed=False)[1][: len(exact.sha_group)]
