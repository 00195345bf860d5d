"""The embedding pair search against brute force: exact below the partition limit,
recall >= 0.98 above it (pairs planted near the threshold), Ray tasks equal to a loop."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.corpus.embedding_search import cosine_pairs


def _planted(n: int, d: int, seed: int = 0, copies: int = 300) -> np.ndarray:
    """Rows around 50 centres, plus near-copies with cosine spread across 0.85-0.99."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d)).astype(np.float32)
    data = centres[rng.integers(0, 50, n)] + rng.normal(size=(n, d)).astype(np.float32)
    pick = rng.permutation(n)[: 2 * copies]
    noise = rng.uniform(0.1, 0.8, size=(copies, 1)).astype(np.float32)
    data[pick[copies:]] = data[pick[:copies]] + noise * rng.normal(size=(copies, d)).astype(np.float32)
    return data.astype(np.float16)


def brute_force(data: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    x = data.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    ok = norms > 0
    unit = np.where(ok[:, None], x / np.where(ok, norms, 1)[:, None], 0)
    sims = unit @ unit.T
    a, b = np.nonzero(np.triu(sims >= threshold, 1) & ok[:, None] & ok[None, :])
    return set(zip(a.tolist(), b.tolist()))


def test_exact_search_equals_brute_force_and_skips_zero_vectors():
    data = _planted(3000, 32)
    data[[5, 17]] = 0  # no direction: they match nothing
    found = cosine_pairs(data, 0.9, exact=True)
    want = brute_force(data.astype(np.float32), 0.9)
    got = set(zip(found.a.tolist(), found.b.tolist()))
    near_threshold = {
        p for p in got ^ want
    }  # float16 unit rows vs float64: only pairs at the threshold may differ
    assert len(near_threshold) <= 2 and len(want) > 250
    assert found.unusable == 2 and not {5, 17} & {i for pair in got for i in pair}
    assert np.all(found.similarity >= 0.9) and np.all(found.a < found.b)


def test_partitioned_search_finds_at_least_98_percent_of_the_pairs():
    data = _planted(40_000, 48, seed=1, copies=800)
    exact = cosine_pairs(data, 0.9, exact=True)
    partitioned = cosine_pairs(data, 0.9, exact=False, partition_rows=500)
    want = set(zip(exact.a.tolist(), exact.b.tolist()))
    got = set(zip(partitioned.a.tolist(), partitioned.b.tolist()))
    assert partitioned.method == "partitioned" and partitioned.partitions == 80
    assert got <= want  # nothing false: every reported pair is exact cosine
    assert len(want) > 600 and len(got) / len(want) >= 0.98, len(got) / len(want)


def test_one_probe_would_miss_pairs():
    """The measure can fail: with each row only in its own partition, recall drops."""
    data = _planted(40_000, 48, seed=1, copies=800)
    exact = cosine_pairs(data, 0.9, exact=True)
    one = cosine_pairs(data, 0.9, exact=False, partition_rows=500, probes=1)
    assert len(one.a) / len(exact.a) < 0.97


@pytest.mark.usefixtures("ray_session")
def test_partitions_as_ray_tasks_equal_the_loop():
    data = _planted(30_000, 32, seed=2)
    local = cosine_pairs(data, 0.9, exact=False, parallel=False)
    remote = cosine_pairs(data, 0.9, exact=False, parallel=True)
    assert set(zip(local.a.tolist(), local.b.tolist())) == set(zip(remote.a.tolist(), remote.b.tolist()))
