"""All pairs of 64-bit hashes within Hamming distance R, exactly, without N^2 work.

The permuted-table / multi-index method (Manku, Jain, Das Sarma 2007; Norouzi et al.
2012): cut the 64 bits into R + t blocks. Two hashes within distance R differ in at
most R blocks, so they agree exactly on at least t of them: for each choice of t
blocks as a key, sort by the key and compare only hashes that share it. Every pair
within R shares at least one key (pigeonhole), so the search is exact; candidates are
verified by popcount. t is chosen per (N, R) to balance the number of tables against
the candidates each produces. Tables are independent: they run in parallel as Ray
tasks when the input is large.

Callers collapse identical hashes first (real hash distributions are skewed), so the
input here is distinct hashes.
"""

from __future__ import annotations

import itertools
import logging
import math
import time

import numpy as np

from pipeline.core.arrays import unique_sorted

log = logging.getLogger(__name__)


def block_bounds(blocks: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, 64, blocks + 1).round().astype(int)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(blocks)]


def choose_t(n: int, radius: int) -> int:
    """Blocks per key: the t minimising (tables x sort cost + expected random candidates)."""
    best, best_cost = 1, math.inf
    for t in range(1, 64 - radius):
        blocks = radius + t
        if blocks > 64:
            break
        tables = math.comb(blocks, t)
        key_bits = 64 * t / blocks
        candidates = n * n / 2 / 2**key_bits  # pairs sharing a key, for uniform hashes
        cost = tables * (n * max(math.log2(max(n, 2)), 1) * 4 + candidates * 20)
        if cost < best_cost:
            best, best_cost = t, cost
    return best


def table_keys(hashes: np.ndarray, bounds: list[tuple[int, int]], chosen: tuple[int, ...]) -> np.ndarray:
    key = np.zeros(len(hashes), np.uint64)
    for b in chosen:
        lo, hi = bounds[b]
        width = hi - lo
        key = (key << np.uint64(width)) | ((hashes >> np.uint64(lo)) & np.uint64((1 << width) - 1))
    return key


def key_order(key: np.ndarray) -> np.ndarray:
    """The stable sort order of a table's keys, in the narrowest type that holds them: keys
    of 16 bits or less (t = 2 blocks of 8, up to ~5M hashes at R = 6) radix-sort several
    times faster than as uint64; 32-bit ones take half the memory as uint32
    (docs/benchmarks.md, 'The nightly: 1% changed on 1M rows')."""
    top = int(key.max()) if len(key) else 0
    narrow = key.astype(np.uint16) if top < 2**16 else key.astype(np.uint32) if top < 2**32 else key
    return np.argsort(narrow, kind="stable")


def pairs_in_table(hashes: np.ndarray, key: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Verified pairs (i < j) among hashes that share a key."""
    order = key_order(key)
    k = key[order]
    n = len(k)
    same_next = k[1:] == k[:-1]  # position p and p+1 share a key
    firsts_a, firsts_b = [], []
    # positions p whose group extends to p+d, for d = 1, 2, ...: shrinks fast
    active = np.flatnonzero(same_next)
    d = 1
    while len(active):
        a, b = order[active], order[active + d]
        close = np.bitwise_count(hashes[a] ^ hashes[b]) <= radius
        if close.any():
            firsts_a.append(np.minimum(a[close], b[close]))
            firsts_b.append(np.maximum(a[close], b[close]))
        d += 1
        active = active[active + d < n]
        active = active[k[active + d] == k[active]]
    if not firsts_a:
        empty = np.zeros(0, np.int64)
        return empty, empty
    return np.concatenate(firsts_a).astype(np.int64), np.concatenate(firsts_b).astype(np.int64)


def _tables_pairs(hashes: np.ndarray, radius: int, bounds, tables) -> np.ndarray:
    found = []
    for chosen in tables:
        a, b = pairs_in_table(hashes, table_keys(hashes, bounds, chosen), radius)
        if len(a):
            found.append(unique_sorted(a * len(hashes) + b))
    return unique_sorted(np.concatenate(found)) if found else np.zeros(0, np.int64)


def near_pairs(
    hashes: np.ndarray, radius: int, t: int | None = None, parallel: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j and popcount(h[i] ^ h[j]) <= radius, each pair once.
    hashes: distinct uint64. parallel: Ray tasks over tables (None: when N >= 1M and
    Ray is running)."""
    hashes = np.ascontiguousarray(hashes, np.uint64)
    n = len(hashes)
    if n < 2 or radius < 0:
        empty = np.zeros(0, np.int64)
        return empty, empty
    if radius >= 32:  # pigeonhole keys would be too short to help: plain brute force
        return brute_force_pairs(hashes, radius)
    t = t or choose_t(n, radius)
    bounds = block_bounds(radius + t)
    tables = list(itertools.combinations(range(radius + t), t))
    started = time.monotonic()
    if parallel is None:
        import ray

        parallel = n >= 1_000_000 and ray.is_initialized()
    if parallel:
        import ray

        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        shared = ray.put(hashes)
        task = ray.remote(num_cpus=1)(_tables_pairs)
        chunks = [tables[i::workers] for i in range(workers)]
        found = ray.get([task.remote(shared, radius, bounds, chunk) for chunk in chunks if chunk])
        codes = unique_sorted(np.concatenate(found)) if found else np.zeros(0, np.int64)
    else:
        codes = _tables_pairs(hashes, radius, bounds, tables)
    log.info(
        "%d hashes, R=%d: %d tables of %d-block keys, %d pairs, %.1f s",
        n,
        radius,
        len(tables),
        t,
        len(codes),
        time.monotonic() - started,
    )
    return codes // n, codes % n


def brute_force_pairs(hashes: np.ndarray, radius: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The N^2 reference: every pair, in chunks."""
    hashes = np.asarray(hashes, np.uint64)
    found_a, found_b = [], []
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk]
        dist = np.bitwise_count(block[:, None] ^ hashes[None, :])
        rows, cols = np.nonzero(dist <= radius)
        rows = rows + start
        keep = rows < cols
        found_a.append(rows[keep])
        found_b.append(cols[keep])
    return np.concatenate(found_a).astype(np.int64), np.concatenate(found_b).astype(np.int64)


def pairs_touching(
    hashes: np.ndarray, fresh: np.ndarray, radius: int, t: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of near_pairs(hashes, radius) with at least one hash in `fresh` (a mask),
    without looking at pairs of two old hashes: a nightly's new hashes against all. Each
    table's keys are sorted once; a fresh hash is compared with the hashes sharing its key."""
    hashes = np.ascontiguousarray(hashes, np.uint64)
    queries = np.flatnonzero(fresh)
    n = len(hashes)
    if n < 2 or radius < 0 or not len(queries):
        empty = np.zeros(0, np.int64)
        return empty, empty
    if radius >= 32:
        return _brute_touching(hashes, queries, radius)
    t = t or choose_t(n, radius)
    bounds = block_bounds(radius + t)
    found = []
    for chosen in itertools.combinations(range(radius + t), t):
        key = table_keys(hashes, bounds, chosen)
        order = key_order(key)
        ranked = key[order]
        lo = np.searchsorted(ranked, key[queries], "left")
        hi = np.searchsorted(ranked, key[queries], "right")
        count = hi - lo
        left = np.repeat(queries, count)
        offsets = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
        right = order[np.repeat(lo, count) + offsets]
        close = (left != right) & (np.bitwise_count(hashes[left] ^ hashes[right]) <= radius)
        a, b = np.minimum(left[close], right[close]), np.maximum(left[close], right[close])
        found.append(unique_sorted(a.astype(np.int64) * n + b))
    codes = unique_sorted(np.concatenate(found)) if found else np.zeros(0, np.int64)
    return codes // n, codes % n


def _brute_touching(hashes: np.ndarray, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    found = []
    for start in range(0, len(queries), 2048):
        rows = queries[start : start + 2048]
        dist = np.bitwise_count(hashes[rows][:, None] ^ hashes[None, :])
        x, y = np.nonzero(dist <= radius)
        a, b = rows[x], y
        keep = a != b
        found.append(unique_sorted(np.minimum(a[keep], b[keep]) * len(hashes) + np.maximum(a[keep], b[keep])))
    codes = unique_sorted(np.concatenate(found)) if found else np.zeros(0, np.int64)
    return codes // len(hashes), codes % len(hashes)
