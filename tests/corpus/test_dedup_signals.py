"""Dedup over three signals: sha256, reliable phash, and the tagger's embedding."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import TagpipeError
from pipeline.corpus.dedup import parse_embedding_threshold, run_dedup


def _table(tmp_path, uris, phash, embeddings, **extra) -> str:
    n = len(uris)
    columns = {
        "uri": uris,
        "sha256": extra.pop("sha256", [hashlib.sha256(u.encode()).hexdigest() for u in uris]),
        "phash": pa.array(phash, pa.uint64()),
        "phash_degenerate": extra.pop("degenerate", [False] * n),
        "width": extra.pop("width", [100] * n),
        "height": extra.pop("height", [100] * n),
        "size": extra.pop("size", [1000] * n),
        "error": pa.nulls(n, pa.string()),
        "embedding": pa.array(
            [None if e is None else np.asarray(e, np.float16) for e in embeddings],
            pa.list_(pa.float16(), len(next(e for e in embeddings if e is not None))),
        ),
    }
    (tmp_path / "tags").mkdir()
    pq.write_table(pa.table(columns), tmp_path / "tags" / "part-0.parquet")
    return str(tmp_path / "tags")


def _planted(n: int, d: int, copies: int, seed: int = 0):
    """Rows around 40 centres; `copies` near-copies (cosine >= 0.97) of the first rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, d))
    base = centres[rng.integers(0, 40, n)] + rng.normal(size=(n, d))
    near = base[:copies] + 0.15 * rng.normal(size=(copies, d))
    hashes = rng.integers(0, 2**63, n + copies, dtype=np.int64).astype(np.uint64) * 2 + 1
    return np.vstack([base, near]), hashes


def test_auto_threshold_finds_copies_phash_misses_and_reports_its_choice(tmp_path):
    n, copies = 3000, 60
    vectors, hashes = _planted(n, 48, copies)
    hashes[n : n + copies // 2] = hashes[: copies // 2]  # half the copies also share a phash: the positives
    uris = [f"/c/{i:05d}.jpg" for i in range(n + copies)]
    summary = run_dedup(_table(tmp_path, uris, hashes, list(vectors)), str(tmp_path / "out"))
    emb = summary.embedding
    sims = _cos(vectors[:copies], vectors[n:])
    assert emb.chosen_by == "auto" and emb.threshold < sims.min()  # every planted copy above it
    # the known copies (phash joined them) are what the threshold's recall is measured on
    assert emb.positives == "hash-confirmed pairs" and emb.positive_pairs == copies // 2
    assert emb.threshold_recall == 1.0
    # negatives: 2,000 sampled queries' 256 best candidates, less pairs phash joined; the tail
    # fitted before the copies' bump, and the expected false edges within the budget (1 per 10k rows)
    assert 400_000 < emb.negatives_sampled <= 2000 * 256
    # the fitted tail stops where the known copies start, and the false edges expected at the
    # threshold over every pair compared are within the budget (1 per 10,000 rows)
    assert emb.tail["copies_from"] <= np.quantile(sims[: copies // 2], 0.05) + 1e-3
    assert emb.budget_threshold <= emb.threshold and emb.expected_false_edges <= 1e-4 * (n + copies)
    clusters = {
        r["uri"]: r["cluster_id"] for r in pq.read_table(tmp_path / "out" / "clusters.parquet").to_pylist()
    }
    assert all(clusters[uris[i]] == clusters[uris[n + i]] for i in range(copies))
    assert summary.clusters == n  # nothing else merged
    edges = pq.read_table(tmp_path / "out" / "edges.parquet").to_pylist()
    by_signal = {s: [e for e in edges if e["signal"] == s] for s in ("phash", "embedding")}
    assert len(by_signal["phash"]) == copies // 2 and all(
        e["phash_distance"] == 0 for e in by_signal["phash"]
    )
    assert len(by_signal["embedding"]) == copies and all(
        e["cosine"] >= emb.threshold for e in by_signal["embedding"]
    )
    assert summary.edges["embedding"] == copies
    assert "hash-confirmed pairs at or above it 1.000 of 30" in summary.text()


def _cos(x, y):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    return (x * y).sum(1)


def test_a_given_threshold_and_off(tmp_path):
    vectors, hashes = _planted(400, 16, 10)
    uris = [f"/g/{i:04d}.jpg" for i in range(410)]
    tags = _table(tmp_path, uris, hashes, list(vectors))
    given = run_dedup(tags, str(tmp_path / "a"), embedding_threshold=0.999999)
    assert given.embedding.chosen_by == "given" and given.edges["embedding"] == 0 and given.clusters == 410
    off = run_dedup(tags, str(tmp_path / "b"), embedding_threshold=None)
    assert off.embedding.threshold is None and off.embedding.reason == "--embedding-threshold off"
    assert "embedding not used (--embedding-threshold off)" in off.text()
    for bad in ("1.5", "0", "sometimes"):
        with pytest.raises(TagpipeError, match="--embedding-threshold"):
            parse_embedding_threshold(bad)


def test_low_detail_hashes_match_nothing_and_are_counted(tmp_path):
    """Rows flagged low-detail, and old rows a few bits from a blank hash, never join by
    phash, whatever their distance; reliable hashes still do."""
    blank = 1 << 63
    hashes = [
        blank ^ 1,
        blank ^ 2,
        blank ^ 6,
        0x0F0F0F0F0F0F0F0F,
        0x0F0F0F0F0F0F0F0E,
        0x3C3C3C3C3C3C3C3C,
        0x3C3C3C3C3C3C3C3D,
    ]
    degenerate = [False, False, False, False, False, True, True]
    uris = [f"/h/{i}.jpg" for i in range(7)]
    summary = run_dedup(
        _table(tmp_path, uris, hashes, [[1.0, float(i)] for i in range(7)], degenerate=degenerate),
        str(tmp_path / "out"),
        embedding_threshold=None,
    )
    assert summary.unmatched_hashes == {"no_hash": 0, "low_detail": 2, "near_blank_hash": 3}
    assert summary.clusters == 6 and summary.edges["phash"] == 1  # only the two reliable neighbours
    assert "low_detail 2" in summary.text()


def test_the_best_copy_represents_its_cluster(tmp_path):
    """More pixels, then a lossless format, then more bytes, then the smallest uri."""
    uris = ["/b/a.jpg", "/b/b.png", "/b/c.jpg", "/b/d.png", "/b/e.jpg"]
    same = ["0" * 64] * 5  # one cluster by sha256
    cases = [
        (dict(width=[100, 100, 200, 100, 100], height=[100] * 5, size=[9, 1, 1, 1, 1]), "/b/c.jpg"),  # pixels
        (dict(width=[100] * 5, height=[100] * 5, size=[9, 1, 1, 2, 9]), "/b/d.png"),  # lossless, then bytes
        (dict(width=[100] * 5, height=[100] * 5, size=[1, 1, 9, 1, 9]), "/b/b.png"),  # lossless beats bytes
        (dict(width=[100] * 5, height=[100] * 5, size=[5, 1, 5, 1, 5]), "/b/b.png"),  # then the smallest uri
    ]
    for i, (extra, best) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        tags = _table(folder, uris, [1, 2, 3, 4, 5], [[1.0, 0.0]] * 5, sha256=same, **extra)
        run_dedup(tags, str(folder / "out"), embedding_threshold=None)
        reps = [
            r["uri"]
            for r in pq.read_table(folder / "out" / "clusters.parquet").to_pylist()
            if r["is_representative"]
        ]
        assert reps == [best], (i, reps)


def test_summary_json_holds_the_embedding_choice(tmp_path):
    from pipeline.corpus.embedding_threshold import EmbeddingThreshold

    vectors, hashes = _planted(300, 128, 5)
    summary = run_dedup(
        _table(tmp_path, [f"/s/{i}.jpg" for i in range(305)], hashes, list(vectors)), str(tmp_path / "out")
    )
    saved = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert saved["embedding"]["chosen_by"] == "auto" and saved["index"]["mode"] == "full"
    assert EmbeddingThreshold.from_record(saved["embedding"]) == summary.embedding  # read back whole
    # records from before a field existed: a bare threshold was given; none, not used
    assert (
        EmbeddingThreshold.from_record({"threshold": 0.9})
        .text()
        .startswith("embedding cosine >= 0.9000 (given)")
    )
    assert EmbeddingThreshold.from_record({}).text() == "embedding not used (not asked)"
    assert saved["index"]["entries_searched"] == 305 and saved["index"]["rows_read"] == 305
    assert set(saved["edges"]) == {"sha256", "phash", "embedding"}


def test_auto_holds_when_copies_are_common(tmp_path):
    """Half the rows are copies (half of those phash found too): the compared pairs' tail
    carries a bump of them, which the fit leaves out from where the known copies start, so
    auto still separates them (it used to refuse)."""
    vectors, hashes = _planted(300, 128, 300)
    hashes[300:450] = hashes[:150]
    uris = [f"/x/{i}.jpg" for i in range(600)]
    summary = run_dedup(_table(tmp_path, uris, hashes, list(vectors)), str(tmp_path / "o"))
    sims = _cos(vectors[:300], vectors[300:])
    threshold = summary.embedding.threshold
    assert threshold is not None and threshold < np.quantile(sims, 0.01)
    clusters = {
        r["uri"]: r["cluster_id"] for r in pq.read_table(tmp_path / "o" / "clusters.parquet").to_pylist()
    }
    together = sum(clusters[uris[i]] == clusters[uris[300 + i]] for i in range(300))
    assert together >= 297 and summary.clusters >= 300 - 3  # nothing else merged wholesale


@pytest.mark.parametrize("fresh_share", [0.01, 0.5])
def test_pairs_touching_fresh_hashes_equal_the_brute_force_pairs(fresh_share):
    """The nightly's hash search (few fresh hashes: only keys they share are sorted; many:
    every key) returns exactly the brute-force pairs with a fresh end, planted near pairs
    included."""
    from pipeline.corpus.hamming_search import brute_force_pairs, pairs_touching

    rng = np.random.default_rng(7)
    hashes = rng.integers(0, 2**63, 6000, dtype=np.uint64)
    flips = np.bitwise_left_shift(np.uint64(1), rng.integers(0, 64, (600, 4)).astype(np.uint64))
    hashes[:600] = hashes[600:1200] ^ np.bitwise_xor.reduce(flips, axis=1)  # within 4 bits
    fresh = rng.random(len(hashes)) < fresh_share
    a, b = pairs_touching(hashes, fresh, 6)
    want_a, want_b = brute_force_pairs(hashes, 6)
    keep = fresh[want_a] | fresh[want_b]
    assert set(zip(a.tolist(), b.tolist())) == set(zip(want_a[keep].tolist(), want_b[keep].tolist()))
    assert keep.sum() >= 3
