"""The evidence an embedding threshold is chosen on, and what the search found against it.

- negatives: sampled queries' top candidates in the index, re-ranked exactly (the upper
  tail of the pairs the search compares), without pairs sha256 or phash joined;
- positives: the table's planted edits (tagged at tag time), else pairs of distinct
  vectors that sha256 or phash joined (hash-confirmed pairs);
- after the search: for sampled queries, their true neighbours (exact, against every live
  vector) and how many the search returned; and how many hash-confirmed pairs above the
  threshold the search returned as edges. Both count what the search found, not what a
  threshold would accept.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pipeline.corpus import embedding_threshold as thresholds
from pipeline.corpus import vector_index
from pipeline.corpus.embedding_threshold import EmbeddingThreshold

POSITIVE_PAIRS = 100_000  # hash-confirmed pairs whose cosines measure recall, at most
RECALL_QUERIES = 500  # sampled queries checked against every vector, exactly


def decide(
    setting, base, faiss_index, layout, alive, reader, entry, groups, rows, edits
) -> EmbeddingThreshold:
    pairs = int(len(alive) * vector_index.compared_per_query(layout, len(alive)))
    if base is not None:  # an update keeps the threshold and what was measured of it
        decision = replace(base.threshold)  # a copy: the base's record stays as it was read
        decision.chosen_by = "kept" if decision.chosen_by != "given" else "given"
        decision.pairs_compared = pairs
        if setting in ("auto", None) or float(setting) == decision.threshold:
            if decision.tail and decision.threshold is not None:
                decision.expected_false_edges = thresholds.expected_false_edges(
                    decision.tail, decision.threshold, max(pairs, 1)
                )
            return decision
        decision.threshold, decision.chosen_by = float(setting), "given"
        positives, kind = _positive_cosines(entry, groups, reader, edits)
        return thresholds.measured(decision, positives, kind, _edit_cosines(edits))
    positives, kind = _positive_cosines(entry, groups, reader, edits)
    negatives, denominator = _negative_cosines(faiss_index, layout, alive, reader, entry, groups)
    if setting == "auto":
        decision = thresholds.choose(
            negatives, denominator, pairs, rows, positives, kind, _edit_cosines(edits)
        )
    else:
        decision = EmbeddingThreshold(
            min(float(setting), thresholds.MAX_THRESHOLD), "given", pairs_compared=pairs
        )
        decision.negatives_sampled = int(len(negatives))
        decision.tail = thresholds.tail_fit(negatives, denominator)
        decision = thresholds.measured(decision, positives, kind, _edit_cosines(edits))
    return decision


def _edit_cosines(edits) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in (edits or {}).items()}


def _positive_cosines(entry, groups, reader, edits) -> tuple[np.ndarray, str]:
    if edits:
        values = [np.asarray(v, np.float32) for v in edits.values()]
        return np.concatenate(values) if values else np.zeros(0, np.float32), "planted edits"
    a, b = hash_confirmed_pairs(entry, groups)
    if not len(a):
        return np.zeros(0, np.float32), "hash-confirmed pairs"
    return _pair_cosines(a, b, reader), "hash-confirmed pairs"


def hash_confirmed_pairs(entry: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct entries that sha256 or phash joined: each to its group's first entry (at most
    POSITIVE_PAIRS, the first groups in uri order)."""
    have = np.flatnonzero(entry >= 0)
    if not len(have):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    g, e = groups[have], entry[have]
    order = np.lexsort((e, g))
    g, e = g[order], e[order]
    first = np.r_[True, g[1:] != g[:-1]]
    head = e[np.maximum.accumulate(np.where(first, np.arange(len(g)), 0))]
    keep = (head != e) & np.r_[True, (g[1:] != g[:-1]) | (e[1:] != e[:-1])]
    return head[keep][:POSITIVE_PAIRS], e[keep][:POSITIVE_PAIRS]


def _pair_cosines(a: np.ndarray, b: np.ndarray, reader) -> np.ndarray:
    out = np.empty(len(a), np.float32)
    for start in range(0, len(a), 20_000):
        x = reader(a[start : start + 20_000]).astype(np.float32)
        y = reader(b[start : start + 20_000]).astype(np.float32)
        out[start : start + 20_000] = np.einsum("ij,ij->i", x, y)
    return out


def _negative_cosines(faiss_index, layout, alive, reader, entry, groups) -> tuple[np.ndarray, float]:
    """Exact cosines of sampled queries' top candidates (the tail of the pairs the search
    compares), without pairs sha256 or phash joined; and the compared pairs they top."""
    rng = np.random.default_rng(1)
    sample = np.sort(rng.choice(alive, size=min(len(alive), thresholds.SAMPLE_QUERIES), replace=False))
    wide = replace(layout, neighbours=min(thresholds.SAMPLE_NEIGHBOURS, len(alive) - 1))
    found = vector_index.search(faiss_index, wide, sample, reader, -1.0)
    group_of = np.full(int(entry.max()) + 1, -1, np.int64)
    group_of[entry[entry >= 0]] = groups[entry >= 0]
    keep = group_of[found.query] != group_of[found.found]
    per_query = vector_index.compared_per_query(layout, len(alive))
    return found.cosine[keep], len(sample) * per_query


def sampled_recall(layout, queries, alive, reader, found, floor: float) -> dict:
    """For sampled queries, their true neighbours (exact, against every live vector: the
    `neighbours` nearest at or above the floor) and how many of them the search returned."""
    rng = np.random.default_rng(2)
    sample = np.sort(rng.choice(queries, size=min(RECALL_QUERIES, len(queries)), replace=False))
    q = reader(sample).astype(np.float32)
    parts: tuple[list, list, list] = ([], [], [])
    for ids, vectors in reader.scan(alive):
        sims = q @ vectors.astype(np.float32).T
        sims[sample[:, None] == ids[None, :]] = -np.inf
        rows, cols = np.nonzero(sims >= floor)
        for out, values in zip(parts, (sample[rows], ids[cols], sims[rows, cols])):
            out.append(values)
    query, other, cosine = (np.concatenate(p) for p in parts)
    order = np.lexsort((-cosine, query))
    query, other = query[order], other[order]
    start = np.searchsorted(query, query, "left")  # each query's nearest first: keep `neighbours`
    true = (np.arange(len(query)) - start) < layout.neighbours
    width = int(max(other.max(initial=0), found.found.max(initial=0), sample.max(initial=0))) + 1
    hits = np.isin(query[true] * width + other[true], found.query * width + found.found)
    return {"queries": int(len(sample)), "sampled_true": int(true.sum()), "sampled_found": int(hits.sum())}


def positives_found(update, entry, groups, reader) -> dict:
    """Of the pairs sha256 or phash joined whose cosine reaches the threshold, the share the
    embedding search returned as an edge: the search's recall on copies known by other means."""
    a, b = hash_confirmed_pairs(entry, groups)
    if not len(a):
        return {}
    low, high = np.minimum(a, b), np.maximum(a, b)
    reach = _pair_cosines(low, high, reader) >= update.decision.threshold
    width = int(max(update.pair_b.max(initial=0), high.max(initial=0))) + 1
    found = np.isin(low[reach] * width + high[reach], update.pair_a * width + update.pair_b)
    return {"hash_confirmed_reaching": int(reach.sum()), "hash_confirmed_found": int(found.sum())}
