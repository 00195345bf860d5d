"""The vector index (FAISS) against brute force in numpy, and the threshold's tail fit against
distributions whose tails are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from pipeline.corpus import embedding_threshold as thresholds
from pipeline.corpus import vector_index
from pipeline.demo.planted_table import near_copy


def _planted(n: int, dim: int, copies: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    source = rng.choice(n - copies, copies, replace=False)
    x[n - copies :] = near_copy(rng, x[source], rng.uniform(0.9, 0.99, copies).astype(np.float32))
    return x.astype(np.float16), source, np.arange(n - copies, n)


def _index(unit: np.ndarray, layout):
    ids = np.arange(len(unit), dtype=np.int64)
    trained = vector_index.train(layout, unit.astype(np.float32))
    return vector_index.open_index([vector_index.encode_rows(trained, ids, unit, ids)])


def _brute(unit: np.ndarray, floor: float, k: int) -> set[tuple[int, int]]:
    x = unit.astype(np.float32)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :k]
    return {(i, int(j)) for i in range(len(x)) for j in top[i] if sims[i, j] >= floor}


def test_a_flat_index_finds_exactly_the_k_nearest_above_the_floor():
    unit, _, _ = _planted(600, 32, 20)
    layout = vector_index.layout_for(600, 32, neighbours=4)
    index = _index(unit, layout)
    found = vector_index.search(index, layout, np.arange(600), lambda ids: unit[ids], 0.5)
    assert layout.kind == "flat" and found.compared == 600 * 600
    assert set(zip(found.query.tolist(), found.found.tolist())) == _brute(unit, 0.5, 4)
    exact = (unit[found.query].astype(np.float32) * unit[found.found].astype(np.float32)).sum(1)
    assert np.allclose(found.cosine, exact, atol=1e-5)


def test_ivf_pq_finds_the_planted_pairs_with_exact_cosines(monkeypatch):
    """4-bit PQ codes underestimate cosines by a third on random vectors: the re-ranking
    restores the exact value and the screen keeps every candidate that could reach the floor."""
    monkeypatch.setattr(vector_index, "EXACT_LIMIT", 1_000)
    monkeypatch.setattr(vector_index, "ROWS_PER_LIST", 64)
    unit, source, copy = _planted(8_000, 128, 200, seed=1)
    layout = vector_index.layout_for(8_000, 128)
    assert layout.kind == "ivf-pq" and layout.lists == 128 and layout.subquantizers == 32
    index = _index(unit, layout)
    vectors_of = lambda ids: unit[ids]  # noqa: E731
    screened = vector_index.calibrate_screen(index, layout, np.arange(0, 8_000, 8), vectors_of)
    slope, _, spread = screened.screen
    assert slope > 1.2 and spread < 0.08  # estimates shrink; the fit says by how much
    found = vector_index.search(index, screened, np.arange(8_000), vectors_of, 0.85)
    pairs = set(zip(found.query.tolist(), found.found.tolist()))
    either = sum((int(s), int(c)) in pairs or (int(c), int(s)) in pairs for s, c in zip(source, copy))
    assert either >= 0.99 * len(source)
    exact = (unit[found.query].astype(np.float32) * unit[found.found].astype(np.float32)).sum(1)
    assert np.allclose(found.cosine, exact, atol=1e-5) and (found.cosine >= 0.85).all()
    unscreened = vector_index.search(index, layout, np.arange(8_000), vectors_of, 0.85)
    assert set(zip(unscreened.query.tolist(), unscreened.found.tolist())) == pairs
    assert found.reranked < unscreened.reranked / 10
    assert found.compared < 8_000 * 8_000 * 0.2  # the cells visited, not every vector


def test_segments_merge_into_the_index_one_encoding_gives():
    unit, _, _ = _planted(3_000, 64, 50, seed=2)
    layout = vector_index.IndexLayout("ivf-pq", 64, lists=32, probes=8, subquantizers=16, designed_for=3_000)
    trained = vector_index.train(layout, unit.astype(np.float32))
    ids = np.arange(3_000, dtype=np.int64)
    whole = vector_index.open_index([vector_index.encode_rows(trained, ids, unit, ids)])
    parts = vector_index.open_index(
        [vector_index.encode_rows(trained, ids[:1000], unit, ids[:1000]),
         vector_index.encode_rows(trained, ids[1000:], unit, ids[1000:])]
    )  # fmt: skip
    q = unit[:200].astype(np.float32)
    assert np.array_equal(whole.search(q, 5)[1], parts.search(q, 5)[1])


def test_queries_outside_the_index_search_it_under_their_own_ids():
    unit, _, _ = _planted(500, 32, 0, seed=3)
    layout = vector_index.layout_for(400, 32, neighbours=1)
    index = _index(unit[:400], layout)
    queries = unit[400:].copy()
    queries[:10] = unit[:10]  # ten eval rows identical to train rows
    found = vector_index.search(
        index,
        layout,
        np.arange(1000, 1100),
        lambda ids: unit[ids],
        0.999,
        queries_of=lambda q: queries[q - 1000],
    )
    assert sorted(zip(found.query.tolist(), found.found.tolist())) == [(1000 + i, i) for i in range(10)]


def test_vectors_without_a_direction_are_not_usable():
    rows = np.array([[1, 0, 0], [0, 0, 0], [np.nan, 1, 0], [3, 4, 0]], np.float32)
    unit, usable = vector_index.unit_rows(rows)
    assert usable.tolist() == [True, False, False, True]
    assert np.allclose(unit[3].astype(np.float32), [0.6, 0.8, 0], atol=1e-3)


def _sampled_tail(rng, negatives_sd: float, copies: int, queries: int = 2000, compared: int = 50_000):
    """Each query's top 256 of `compared` Gaussian cosines (sd negatives_sd), plus copies at 0.95."""
    top = norm.isf(rng.uniform(0, 256 / compared, (queries, 256)), scale=negatives_sd)
    sample = np.r_[top.reshape(-1), rng.uniform(0.93, 0.99, copies)]
    return sample, queries * compared


@pytest.mark.parametrize("sd", [0.03, 0.1])
def test_the_budget_threshold_errs_towards_fewer_false_edges(sd):
    """Gaussian negatives (sd 0.03 is random 1152-d vectors; 0.1 is a crowded embedding),
    a bump of copies: the fitted tail leaves the copies out and its budget threshold has,
    under the true distribution, at most the budgeted false edges."""
    rng = np.random.default_rng(4)
    sample, denominator = _sampled_tail(rng, sd, copies=400)
    fit = thresholds.tail_fit(sample, denominator, copies_from=0.95)
    assert fit and fit["copies_from"] < 0.93 and fit["shape"] >= 0
    pairs, budget = 1_000_000 * 50_000, 100.0
    t = thresholds.budget_threshold(fit, budget, pairs)
    true_false_edges = pairs * norm.sf(t, scale=sd)
    assert true_false_edges <= budget
    assert t < 0.9  # and the copies stay above it
    assert thresholds.expected_false_edges(fit, t, pairs) == pytest.approx(budget, rel=1e-6)


def test_auto_sits_between_the_budget_and_the_copies_and_says_when_it_cannot():
    rng = np.random.default_rng(5)
    sample, denominator = _sampled_tail(rng, 0.03, copies=200)
    positives = rng.uniform(0.93, 0.99, 500).astype(np.float32)
    decision = thresholds.choose(sample, denominator, 10**9, 100_000, positives, "hash-confirmed pairs")
    assert decision.budget_threshold < decision.threshold < 0.93
    assert decision.threshold_recall == 1.0 and decision.expected_false_edges < 10
    weak = rng.uniform(0.05, 0.2, 500).astype(np.float32)  # an embedding that cannot tell copies apart
    poor = thresholds.choose(sample, denominator, 10**9, 100_000, weak, "planted edits")
    assert poor.threshold == pytest.approx(poor.budget_threshold) and "does not separate" in poor.reason


def test_a_cut_into_the_unrelated_tail_narrows_the_fit_without_bending_it():
    """Known copies that start inside the unrelated pairs' tail (an edit the embedding barely
    tells apart) cut it short; the fit is told where the data stop, so its threshold still
    keeps the true false edges within the budget."""
    rng = np.random.default_rng(6)
    sample, denominator = _sampled_tail(rng, 0.03, copies=0)
    low_cut = float(np.quantile(sample, 0.999))  # well inside the unrelated pairs' tail
    fit = thresholds.tail_fit(sample, denominator, copies_from=low_cut)
    pairs, budget = 1_000_000 * 50_000, 100.0
    t = thresholds.budget_threshold(fit, budget, pairs)
    assert fit["copies_from"] == pytest.approx(low_cut) and pairs * norm.sf(t, scale=0.03) <= budget
