"""All pairs of embeddings whose cosine similarity reaches a threshold, at scale.

Near-duplicates that phash misses (crops, borders, overlays, colour edits) stay close
in the tagger's own embedding. Finding every pair above a cosine threshold is a
self-join: exact for small sets (every pair, in blocks), and for large ones
partitioned as SemDeDup does: spherical k-means centroids from a sample, each row
assigned to its 3 nearest centroids (PROBES), and exact cosine inside each
partition between the rows whose first partition it is and every row assigned to it.
A pair is missed only when neither row's first partition is among the other's 3; recall is
measured against the exact search (tests/test_embedding_search.py,
benchmarks/embedding_search.py). Partitions are independent: on a cluster they run as
Ray tasks over the unit vectors in the object store.

Vectors are kept as float16 unit rows (as stored: 2 bytes a dimension) and widened to
float32 a block at a time, so 1M x 1152 needs about 2.3 GB. Zero (or non-finite)
vectors have no direction: they match nothing and are counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EXACT_LIMIT = 20_000  # rows: below this every pair is compared
PARTITION_ROWS = 1_000  # rows per k-means partition, on average, at least (sqrt(n / probes) beyond 3M rows)
BLOCK_ROWS = 4_096  # rows widened to float32 at a time
PROBES = 3  # partitions each row joins, its nearest centroids: 2 missed 1.4% of planted pairs, 3 missed 0.2%


@dataclass(frozen=True)
class CosinePairs:
    """Row pairs (a < b) with cosine >= threshold, and how they were found."""

    a: np.ndarray  # int64
    b: np.ndarray  # int64
    similarity: np.ndarray  # float32
    method: str  # "exact" or "partitioned"
    partitions: int = 0
    unusable: int = 0  # zero or non-finite vectors


def unit_rows(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 unit vectors, usable mask), a block at a time."""
    n, d = embeddings.shape
    out = np.zeros((n, d), np.float16)
    usable = np.zeros(n, bool)
    for start in range(0, n, BLOCK_ROWS):
        block = np.asarray(embeddings[start : start + BLOCK_ROWS], np.float32)
        norms = np.linalg.norm(block, axis=1)
        good = np.isfinite(norms) & (norms > 0) & np.isfinite(block).all(axis=1)
        block[good] /= norms[good, None]
        block[~good] = 0
        out[start : start + BLOCK_ROWS] = block
        usable[start : start + BLOCK_ROWS] = good
    return out, usable


def exact_pairs(unit: np.ndarray, threshold: float, rows: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Every pair among rows (default all) with cosine >= threshold: (a, b, similarity), a < b."""
    rows = np.arange(len(unit)) if rows is None else np.asarray(rows, np.int64)
    found_a, found_b, found_s = [], [], []
    for i in range(0, len(rows), BLOCK_ROWS):
        left = unit[rows[i : i + BLOCK_ROWS]].astype(np.float32)
        for j in range(i, len(rows), BLOCK_ROWS):
            right = unit[rows[j : j + BLOCK_ROWS]].astype(np.float32)
            sims = left @ right.T
            x, y = np.nonzero(sims >= threshold)
            if i == j:
                keep = x < y
                x, y = x[keep], y[keep]
            found_a.append(rows[i + x])
            found_b.append(rows[j + y])
            found_s.append(sims[x, y])
    return _ordered(found_a, found_b, found_s)


def _ordered(a_parts, b_parts, s_parts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.concatenate(a_parts) if a_parts else np.zeros(0, np.int64)
    b = np.concatenate(b_parts) if b_parts else np.zeros(0, np.int64)
    s = np.concatenate(s_parts).astype(np.float32) if s_parts else np.zeros(0, np.float32)
    low, high = np.minimum(a, b), np.maximum(a, b)
    return low.astype(np.int64), high.astype(np.int64), s


def spherical_kmeans(
    unit: np.ndarray, rows: np.ndarray, k: int, seed: int = 0, sample: int | None = None, iterations: int = 8
) -> np.ndarray:
    """k unit centroids [k, d] float32, trained on a sample of rows (40 per centroid)."""
    rng = np.random.default_rng(seed)
    take = rng.choice(len(rows), size=min(len(rows), sample or 40 * k), replace=False)
    points = unit[rows[np.sort(take)]].astype(np.float32)
    centroids = points[rng.choice(len(points), size=k, replace=False)].copy()
    for _ in range(iterations):
        labels = np.argmax(points @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, points)
        empty = np.linalg.norm(sums, axis=1) == 0
        sums[empty] = points[
            rng.choice(len(points), size=int(empty.sum()), replace=False)
        ]  # re-seed empty ones
        centroids = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    return centroids


def nearest_centroids(unit: np.ndarray, rows: np.ndarray, centroids: np.ndarray, probes: int) -> np.ndarray:
    """Each of rows' `probes` nearest centroids, nearest first: int32 [len(rows), probes]."""
    out = np.empty((len(rows), probes), np.int32)
    for start in range(0, len(rows), BLOCK_ROWS):
        sims = unit[rows[start : start + BLOCK_ROWS]].astype(np.float32) @ centroids.T
        top = np.argpartition(-sims, probes - 1, axis=1)[:, :probes]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[start : start + BLOCK_ROWS] = np.take_along_axis(top, order, axis=1)
    return out


def partition_pairs(
    unit: np.ndarray, threshold: float, primary: np.ndarray, members: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Pairs between one partition's primary rows and all its rows (a < b)."""
    left = unit[primary].astype(np.float32)
    right = unit[members].astype(np.float32)
    found_a, found_b, found_s = [], [], []
    for i in range(0, len(primary), BLOCK_ROWS):
        sims = left[i : i + BLOCK_ROWS] @ right.T
        x, y = np.nonzero(sims >= threshold)
        a, b = primary[i + x], members[y]
        keep = a != b
        found_a.append(a[keep])
        found_b.append(b[keep])
        found_s.append(sims[x[keep], y[keep]])
    return _ordered(found_a, found_b, found_s)


def _partition_batch(unit, threshold, groups) -> tuple[np.ndarray, ...]:
    parts = [partition_pairs(unit, threshold, primary, members) for primary, members in groups]
    return _ordered([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])


def cosine_pairs(
    embeddings: np.ndarray,
    threshold: float,
    *,
    exact: bool | None = None,
    partition_rows: int | None = None,
    probes: int = PROBES,
    seed: int = 0,
    parallel: bool | None = None,
) -> CosinePairs:
    """Every pair of rows with cosine >= threshold (exactly below EXACT_LIMIT rows or
    with exact=True; partitioned above). parallel: partitions as Ray tasks (None: when
    Ray is running and there are >= 1M rows)."""
    unit, usable = unit_rows(embeddings)
    return cosine_pairs_of_units(
        unit,
        usable,
        threshold,
        exact=exact,
        partition_rows=partition_rows,
        probes=probes,
        seed=seed,
        parallel=parallel,
    )


def cosine_pairs_of_units(
    unit: np.ndarray,
    usable: np.ndarray,
    threshold: float,
    *,
    exact: bool | None = None,
    partition_rows: int | None = None,
    probes: int = PROBES,
    seed: int = 0,
    parallel: bool | None = None,
) -> CosinePairs:
    """cosine_pairs on rows already made unit vectors by unit_rows. partition_rows
    defaults to the size that balances assigning rows to centroids (n x n / size) with
    comparing inside partitions (n x size x probes): sqrt(n / probes), at least 1,000."""
    rows = np.flatnonzero(usable)
    unusable = int(len(unit) - len(rows))
    if exact or (exact is None and len(rows) <= EXACT_LIMIT):
        a, b, s = exact_pairs(unit, threshold, rows)
        return _unique(CosinePairs(a, b, s, "exact", 0, unusable))
    partition_rows = partition_rows or max(PARTITION_ROWS, int(math.sqrt(len(rows) / probes)))
    k = max(probes, math.ceil(len(rows) / partition_rows))
    centroids = spherical_kmeans(unit, rows, k, seed=seed)
    nearest = nearest_centroids(unit, rows, centroids, probes)
    first = nearest[:, 0]
    order = np.argsort(first, kind="stable")
    bounds = np.searchsorted(first[order], np.arange(k + 1))
    member_of = nearest.reshape(-1)  # every (row, partition) it joins
    member_row = np.repeat(rows, probes)
    by_partition = np.argsort(member_of, kind="stable")
    member_bounds = np.searchsorted(member_of[by_partition], np.arange(k + 1))
    groups = []
    for p in range(k):
        primary = rows[order[bounds[p] : bounds[p + 1]]]
        if len(primary):
            groups.append((primary, member_row[by_partition[member_bounds[p] : member_bounds[p + 1]]]))
    a, b, s = _run_groups(unit, threshold, groups, parallel, len(rows))
    return _unique(CosinePairs(a, b, s, "partitioned", k, unusable))


def _run_groups(unit, threshold, groups, parallel, n) -> tuple[np.ndarray, ...]:
    if parallel is None:
        import ray

        parallel = n >= 1_000_000 and ray.is_initialized()
    if not parallel:
        return _partition_batch(unit, threshold, groups)
    import ray

    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    shared = ray.put(unit)
    task = ray.remote(num_cpus=1)(_partition_batch)
    chunks = [groups[i :: workers * 4] for i in range(workers * 4)]
    parts = ray.get([task.remote(shared, threshold, chunk) for chunk in chunks if chunk])
    return _ordered([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])


def _unique(pairs: CosinePairs) -> CosinePairs:
    """Each pair once (a partitioned search finds some in two partitions)."""
    if not len(pairs.a):
        return pairs
    key = pairs.a * (int(max(pairs.b.max(), pairs.a.max())) + 1) + pairs.b
    _, first = np.unique(key, return_index=True)
    return CosinePairs(
        pairs.a[first],
        pairs.b[first],
        pairs.similarity[first],
        pairs.method,
        pairs.partitions,
        pairs.unusable,
    )
