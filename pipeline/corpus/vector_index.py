"""Nearest neighbours of embeddings among millions, with FAISS: compressed codes, exact re-ranking.

Near-duplicates are rare and close: each vector needs its few nearest neighbours above a
cosine, never all pairs. So the search is a k-nearest-neighbour search (NEIGHBOURS per
query), which bounds the edges at k per row however many vectors crowd together, and
its candidates are re-ranked by their exact cosine (float16 unit vectors, as stored):

- up to EXACT_LIMIT vectors, `flat`: every vector compared (FAISS's BLAS inner
  products), exact;
- beyond, `ivf-pq`: an inverted file of `lists` k-means cells (a query visits its
  `probes` nearest), holding 4-bit product-quantised codes (FAISS's fast-scan PQ,
  dim/8 bytes a vector: 144 B for 1152-d, so 10M vectors take 1.4 GB). Candidates
  whose estimated cosine could reach the floor (`screen`, fitted on a sample when the
  index is trained) are re-ranked exactly; the others are dropped.

Why FAISS and these settings: docs/decisions.md ("The near-duplicate index"), with the
side-by-side benchmark (benchmarks/vector_search.py). An index is built in pieces:
`train` once (the cells and codebooks, from a sample), then `encode` any set of vectors
into a segment with the same codebooks; segments merge (`open_index`) into one index to
search. That is what lets a nightly add a segment instead of re-encoding the corpus.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

EXACT_LIMIT = 20_000  # vectors: a flat (exact) index up to this many (20k x 20k x 1152: ~1e12 flops)
NEIGHBOURS = 16  # per query: the edges a row can get from its own search
PROBES = 16  # cells an IVF query visits (recall: benchmarks/vector_search.py)
ROWS_PER_LIST = 256  # IVF cells sized so a probe scans about this many codes
TRAIN_PER_LIST = 40  # k-means sample per cell (FAISS warns below 39)
QUERY_BLOCK = 20_000  # queries searched and re-ranked at a time
PAIR_BLOCK = 50_000  # candidate pairs whose vectors are read at a time (230 MB as float32 at 1152-d)
MAX_LISTS = 16_384  # cells, at most: beyond ~4M vectors the cells grow instead (scan ~ sqrt growth)
COARSE_DIM = 128  # cells are found in this many PCA dimensions (9x cheaper than 1152 to assign)
SCREEN_MARGIN = 0.05  # cosine below the floor that a candidate's estimate may still reach


@dataclass(frozen=True)
class IndexLayout:
    """How vectors are indexed; recorded with the index so every segment matches it."""

    kind: str  # "flat" | "ivf-pq"
    dim: int
    lists: int = 0
    probes: int = 0
    subquantizers: int = 0  # 4-bit PQ codes: subquantizers / 2 bytes a vector
    neighbours: int = NEIGHBOURS
    designed_for: int = 0  # vectors when trained; an index grown far past this is retrained
    screen: tuple[float, ...] = ()  # (a, b, sd): exact ~ a * estimate + b; () keeps every candidate

    def record(self) -> dict:
        return {**self.__dict__, "screen": list(self.screen)}

    @classmethod
    def from_record(cls, record: dict) -> IndexLayout:
        return cls(**{**record, "screen": tuple(record.get("screen") or ())})

    def outgrown(self, vectors: int) -> bool:
        """True when this many vectors should be indexed with a layout trained afresh."""
        if self.kind == "flat":
            return vectors > EXACT_LIMIT
        return vectors > 4 * self.designed_for


def layout_for(vectors: int, dim: int, neighbours: int = NEIGHBOURS, probes: int = PROBES) -> IndexLayout:
    """Flat for few vectors; else an IVF with cells of ~ROWS_PER_LIST vectors (room to grow 4x)."""
    if vectors <= EXACT_LIMIT:
        return IndexLayout("flat", dim, neighbours=neighbours, designed_for=vectors)
    lists = min(2 ** round(math.log2(max(vectors / ROWS_PER_LIST, 64))), MAX_LISTS)
    return IndexLayout(
        "ivf-pq",
        dim,
        lists=lists,
        probes=min(probes, lists),
        subquantizers=_subquantizers(dim),
        neighbours=neighbours,
        designed_for=vectors,
    )


def _subquantizers(dim: int) -> int:
    """The largest divisor of dim that is at most dim / 4 (4 dimensions per 4-bit code)."""
    return max(m for m in range(1, max(dim // 4, 1) + 1) if dim % m == 0)


def _faiss():
    import faiss

    return faiss


def train(layout: IndexLayout, sample: np.ndarray, seed: int = 0) -> bytes:
    """The trained, empty index (cells and codebooks) from unit vectors, serialised."""
    faiss = _faiss()
    if layout.kind == "flat":
        return bytes(faiss.serialize_index(faiss.IndexIDMap2(faiss.IndexFlatIP(layout.dim))))
    take = TRAIN_PER_LIST * layout.lists
    if len(sample) > take:  # callers that sampled already pass no more: no copy of it is made
        rng = np.random.default_rng(seed)
        sample = sample[np.sort(rng.choice(len(sample), size=take, replace=False))]
    points = np.ascontiguousarray(sample, np.float32)
    quantizer = _cells(layout, points, seed)
    index = faiss.IndexIVFPQFastScan(
        quantizer, layout.dim, layout.lists, layout.subquantizers, 4, faiss.METRIC_INNER_PRODUCT
    )
    index.by_residual = False  # codes of the vectors themselves: the cells live in PCA space
    index.own_fields = True
    quantizer.this.disown()  # the index frees it
    index.train(points)  # the cells are trained: only the PQ codebooks are
    return bytes(faiss.serialize_index(index))


def _cells(layout: IndexLayout, points: np.ndarray, seed: int):
    """The coarse quantizer: k-means cells, found in the top COARSE_DIM principal directions
    when the vectors are wider (assigning a vector costs lists x COARSE_DIM, not lists x dim;
    a near-copy stays near in the projection)."""
    faiss = _faiss()
    kmeans = faiss.Kmeans(
        min(layout.dim, COARSE_DIM) if layout.dim > 2 * COARSE_DIM else layout.dim,
        layout.lists,
        niter=10,
        seed=seed,
        max_points_per_centroid=TRAIN_PER_LIST,
    )
    if layout.dim <= 2 * COARSE_DIM:
        kmeans.train(points)
        flat = faiss.IndexFlatL2(layout.dim)
        flat.add(kmeans.centroids)
        return flat
    pca = faiss.PCAMatrix(layout.dim, COARSE_DIM)
    pca.train(points[: min(len(points), 65_536)])
    kmeans.train(pca.apply(points))
    flat = faiss.IndexFlatL2(COARSE_DIM)
    flat.add(kmeans.centroids)
    quantizer = faiss.IndexPreTransform(pca, flat)
    quantizer.own_fields = True
    pca.this.disown()
    flat.this.disown()
    return quantizer


def encode_rows(trained: bytes, ids: np.ndarray, stored, rows: np.ndarray) -> bytes:
    """A segment: stored[rows] (unit vectors) under ids, coded with the trained index's
    codebooks, a block at a time (stored: an array, or a RowFile larger than memory)."""
    faiss = _faiss()
    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
    for start in range(0, len(ids), QUERY_BLOCK):
        block = np.ascontiguousarray(stored[rows[start : start + QUERY_BLOCK]], np.float32)
        index.add_with_ids(block, np.ascontiguousarray(ids[start : start + QUERY_BLOCK], np.int64))
    return bytes(faiss.serialize_index(index))


def open_index(segments: list[bytes]):
    """One searchable index from segments encoded with the same trained index."""
    faiss = _faiss()
    index = faiss.deserialize_index(np.frombuffer(segments[0], np.uint8))
    for blob in segments[1:]:
        other = faiss.deserialize_index(np.frombuffer(blob, np.uint8))
        index.merge_from(other, 0)
    return index


@dataclass(frozen=True)
class Neighbours:
    """Query pairs at or above the floor, exact cosines, and the work the search did."""

    query: np.ndarray  # int64 ids
    found: np.ndarray  # int64 ids
    cosine: np.ndarray  # float32, exact (float16 vectors widened)
    compared: int  # (query, vector) pairs the index scored: the false-edge budget's denominator
    reranked: int  # candidates re-ranked exactly


def compared_per_query(layout: IndexLayout, vectors: int) -> float:
    """Vectors one query is scored against: all (flat), or its probed cells' share (IVF)."""
    if layout.kind == "flat":
        return float(vectors)
    return vectors * layout.probes / layout.lists


def search(
    index,
    layout: IndexLayout,
    query_ids: np.ndarray,
    vectors_of: Callable[[np.ndarray], np.ndarray],
    floor: float,
    live: Callable[[np.ndarray], np.ndarray] | None = None,
    queries_of: Callable[[np.ndarray], np.ndarray] | None = None,
    allowed: np.ndarray | None = None,
) -> Neighbours:
    """Each query's nearest neighbours (not itself, only `live` ones) with exact cosine >= floor.

    query_ids: ids searched a block at a time; vectors_of(ids): the unit float16 vectors of
    any indexed ids (the candidates', for the exact re-ranking, and the queries' unless
    queries_of gives them: queries that are not in the index, under ids apart from its own).
    allowed: only these indexed ids are candidates (FAISS's IDSelectorBatch, applied while
    scanning, so the nearest allowed vectors are found, not the nearest filtered after)."""
    selector = _faiss().IDSelectorBatch(np.asarray(allowed, np.int64)) if allowed is not None else None
    if selector is not None and hasattr(index, "scored"):
        raise ValueError("a partitioned index takes no `allowed` selector")
    parts: tuple[list, list, list] = ([], [], [])
    reranked = 0
    k = min(layout.neighbours + 1, int(index.ntotal))  # +1: a query usually finds itself
    for start in range(0, len(query_ids), QUERY_BLOCK):
        q_ids = np.asarray(query_ids[start : start + QUERY_BLOCK], np.int64)
        q = np.ascontiguousarray((queries_of or vectors_of)(q_ids), np.float32)
        if hasattr(index, "scored"):  # pipeline/corpus/index_partitions.py: scored where held
            a, b, _, cosine = index.scored(layout, q_ids, q, floor, k)
        else:
            a, b, _, cosine = scored_candidates(index, layout, q_ids, q, vectors_of, floor, selector, k)
        reranked += int(np.count_nonzero(~np.isnan(cosine))) if layout.kind != "flat" else 0
        ok = cosine >= floor  # NaN (not scored: itself, or cannot reach the floor) is never
        if live is not None:
            ok &= live(b)
        for out, values in zip(parts, (a[ok], b[ok], cosine[ok])):
            out.append(values)
    query, found, cosine = (np.concatenate(p) if p else np.zeros(0) for p in parts)
    compared = int(len(query_ids) * compared_per_query(layout, index.ntotal))
    return Neighbours(
        query.astype(np.int64), found.astype(np.int64), cosine.astype(np.float32), compared, reranked
    )


def candidates(index, layout: IndexLayout, q_ids: np.ndarray, q: np.ndarray, selector=None, k=None):
    """(query id, found id, estimated cosine) of each query's k nearest (default: neighbours+1)."""
    k = k or min(layout.neighbours + 1, int(index.ntotal))
    if hasattr(index, "scored"):  # partitioned: pipeline/corpus/index_partitions.py
        return index.candidates(layout, q_ids, q, k)
    faiss = _faiss()
    if layout.kind != "flat":
        params = faiss.SearchParametersIVF(nprobe=layout.probes, sel=selector)
    else:
        params = faiss.SearchParameters(sel=selector) if selector is not None else None
    scores, found = index.search(q, k, params=params)
    a = np.repeat(q_ids, k)
    b, estimate = found.reshape(-1), scores.reshape(-1)
    real = b >= 0
    return a[real], b[real].astype(np.int64), estimate[real]


def scored_candidates(index, layout, q_ids, q, vectors_of, floor: float, selector=None, k=None):
    """candidates() and a fourth array: exact cosines of those that may reach the floor (not
    the query itself), NaN for the rest. vectors_of reads the candidates' vectors."""
    a, b, estimate = candidates(index, layout, q_ids, q, selector, k)
    exact = np.full(len(a), np.nan, np.float32)
    want = (b != a) & _may_reach(layout, estimate, floor)
    if layout.kind == "flat":  # its scores are exact already
        exact[want] = estimate[want]
    else:
        exact[want] = _exact(q, q_ids, a[want], b[want], vectors_of)
    return a, b, estimate, exact


def set_threads(threads: int) -> None:
    """FAISS's OpenMP threads in this process (a Ray actor holding one CPU: 1)."""
    _faiss().omp_set_num_threads(threads)


def _may_reach(layout: IndexLayout, estimate: np.ndarray, floor: float) -> np.ndarray:
    if not layout.screen:
        return np.ones(len(estimate), bool)
    slope, intercept, spread = layout.screen
    return slope * estimate + intercept >= floor - max(4 * spread, SCREEN_MARGIN)


def _exact(q: np.ndarray, q_ids: np.ndarray, a: np.ndarray, b: np.ndarray, vectors_of) -> np.ndarray:
    """Cosines of candidate pairs from the stored float16 vectors (queries are in q)."""
    if not len(a):
        return np.zeros(0, np.float32)
    position = np.searchsorted(q_ids, a) if _sorted(q_ids) else _positions(q_ids, a)
    out = np.empty(len(a), np.float32)
    for start in range(0, len(a), PAIR_BLOCK):  # candidates' vectors a block at a time
        wanted, inverse = np.unique(b[start : start + PAIR_BLOCK], return_inverse=True)
        found = np.asarray(vectors_of(wanted), np.float32)
        out[start : start + PAIR_BLOCK] = np.einsum(
            "ij,ij->i", q[position[start : start + PAIR_BLOCK]], found[inverse.reshape(-1)]
        )
    return out


def _sorted(ids: np.ndarray) -> bool:
    return bool(len(ids) < 2 or (ids[1:] > ids[:-1]).all())


def _positions(ids: np.ndarray, a: np.ndarray) -> np.ndarray:
    order = np.argsort(ids, kind="stable")
    return order[np.searchsorted(ids[order], a)]


def calibrate_screen(index, layout: IndexLayout, sample_ids, vectors_of) -> IndexLayout:
    """Fit exact cosine ~ a * PQ estimate + b on sample queries' candidates (their own
    vector, estimated, is the cosine-1 end), so the screen drops only what cannot reach
    the floor. A flat index's scores are exact: nothing to fit."""
    if layout.kind == "flat" or not len(sample_ids):
        return layout
    q = np.ascontiguousarray(vectors_of(sample_ids), np.float32)
    a, b, estimate = candidates(index, replace(layout, screen=()), sample_ids, q)
    exact = _exact(q, np.asarray(sample_ids, np.int64), a, b, vectors_of)
    slope, intercept = np.polyfit(estimate.astype(np.float64), exact.astype(np.float64), 1)
    spread = float(np.std(exact - (slope * estimate + intercept)))
    return replace(layout, screen=(float(slope), float(intercept), spread))


def unit_rows(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 unit vectors, usable mask): zero or non-finite vectors have no direction."""
    block = np.asarray(embeddings, np.float32)
    norms = np.linalg.norm(block, axis=1) if block.size else np.zeros(len(block), np.float32)
    good = np.isfinite(norms) & (norms > 0)
    if block.size:
        good &= np.isfinite(block).all(axis=1)
    out = np.zeros_like(block)
    out[good] = block[good] / norms[good, None]
    return out.astype(np.float16), good
