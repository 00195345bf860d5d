"""Leakage beyond phash: metadata groups never cross splits, and the audit checks
sha256, reliable phash and embedding, saying what it could not check."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.audit import audit
from pipeline.dedup import run_dedup
from pipeline.errors import TagpipeError
from pipeline.split import run_split


def _tags(folder, n: int, seed: int = 0, dim: int = 16) -> tuple[str, list[str]]:
    rng = np.random.default_rng(seed)
    uris = [f"/img/{i:04d}.jpg" for i in range(n)]
    table = pa.table({
        "uri": uris,
        "sha256": [hashlib.sha256(u.encode()).hexdigest() for u in uris],
        "phash": pa.array(rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * 2 + 1, pa.uint64()),
        "phash_degenerate": [False] * n,
        "width": [100] * n, "height": [100] * n, "size": [1000] * n,
        "error": pa.nulls(n, pa.string()),
        "tags": [["a"] if i % 3 else ["b"] for i in range(n)],
        "embedding": pa.array([np.asarray(v, np.float16) for v in rng.normal(size=(n, dim))], pa.list_(pa.float16(), dim)),
    })  # fmt: skip
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-0.parquet")
    return str(folder), uris


def test_a_metadata_group_never_crosses_splits(tmp_path):
    tags, uris = _tags(tmp_path / "tags", 600)
    run_dedup(tags, str(tmp_path / "dedup"), embedding_threshold=None)
    posts = {u: f"post-{i // 4}" if i < 400 else None for i, u in enumerate(uris)}  # 100 posts of 4, 200 alone
    pq.write_table(pa.table({"uri": list(posts), "post": list(posts.values())}), tmp_path / "meta.parquet")
    run_split(tags, str(tmp_path / "dedup"), str(tmp_path / "split"), {"train": 0.5, "val": 0.25, "test": 0.25},
              group_column="post", metadata=str(tmp_path / "meta.parquet"))  # fmt: skip
    rows = pq.read_table(tmp_path / "split" / "splits.parquet").to_pylist()
    split_of = {r["uri"]: r["split"] for r in rows}
    by_post: dict[str, set] = {}
    for u, post in posts.items():
        if post:
            by_post.setdefault(post, set()).add(split_of[u])
    assert all(len(s) == 1 for s in by_post.values())
    assert len({next(iter(s)) for s in by_post.values()}) == 3  # the groups are spread, not all in one split
    assert len({r["split_unit"] for r in rows}) == 100 + 200
    # without the groups the same posts would cross splits: the check can fail
    run_split(tags, str(tmp_path / "dedup"), str(tmp_path / "plain"), {"train": 0.5, "val": 0.25, "test": 0.25})
    plain = {r["uri"]: r["split"] for r in pq.read_table(tmp_path / "plain" / "splits.parquet").to_pylist()}
    assert sum(len({plain[u] for u in posts if posts[u] == p}) > 1 for p in by_post) > 50


def test_group_options_name_what_is_wrong(tmp_path):
    tags, uris = _tags(tmp_path / "tags", 20)
    run_dedup(tags, str(tmp_path / "dedup"), embedding_threshold=None)
    with pytest.raises(TagpipeError, match="--metadata"):
        run_split(tags, str(tmp_path / "dedup"), str(tmp_path / "s"), group_column="post")
    pq.write_table(pa.table({"uri": uris, "parent": ["x"] * 20}), tmp_path / "meta.parquet")
    with pytest.raises(TagpipeError, match="no column 'post'"):
        run_split(tags, str(tmp_path / "dedup"), str(tmp_path / "s"), group_column="post", metadata=str(tmp_path / "meta.parquet"))


def _side(prefix: str, hashes, vectors, degenerate=None, sha=None) -> pa.Table:
    n = len(hashes)
    return pa.table({
        "uri": [f"{prefix}/{i}.jpg" for i in range(n)],
        "sha256": sha or [f"{prefix}{i}" for i in range(n)],
        "phash": pa.array(hashes, pa.uint64()),
        "phash_unreliable": degenerate or [False] * n,
        "embedding": pa.array([None if v is None else np.asarray(v, np.float16) for v in vectors],
                              pa.list_(pa.float16(), 8)),
    })  # fmt: skip


def test_the_audit_finds_leaks_by_each_signal_and_counts_what_it_could_not_check():
    rng = np.random.default_rng(1)
    train_vec = rng.normal(size=(50, 8))
    train_hash = [int(h) * 2 + 1 for h in rng.integers(0, 2**62, 50)]
    eval_vec = list(rng.normal(size=(6, 8)))
    eval_hash = [int(h) * 2 + 1 for h in rng.integers(0, 2**62, 6)]
    eval_vec[0] = train_vec[3] + 0.02 * rng.normal(size=8)  # an embedding copy, phash far away
    eval_hash[1] = train_hash[7] ^ 0b111  # a phash copy, 3 bits
    sha = [f"e{i}" for i in range(6)]
    sha[2] = "t9"  # the same bytes
    eval_vec[4] = None  # no embedding, and a low-detail hash: nothing can check it
    degenerate = [False, False, False, False, True, False]
    leaks, report = audit(_side("t", train_hash, list(train_vec)), _side("e", eval_hash, eval_vec, degenerate, sha), 6, 0.99)
    got = {(r["eval_uri"], r["signal"]): r for r in leaks.to_pylist()}
    assert set(got) == {("e/0.jpg", "embedding"), ("e/1.jpg", "phash"), ("e/2.jpg", "sha256")}
    assert got[("e/0.jpg", "embedding")]["train_uri"] == "t/3.jpg" and got[("e/0.jpg", "embedding")]["cosine"] >= 0.99
    assert got[("e/1.jpg", "phash")]["distance"] == 3 and got[("e/2.jpg", "sha256")]["exact"]
    assert report.leaks == 3 and report.by_signal == {"sha256": 1, "phash": 1, "embedding": 1}
    assert report.not_checked["phash"] == 1 and report.not_checked["embedding"] == 1 and report.unchecked == 1
    clean_eval = _side("e", [eval_hash[5]], [eval_vec[5]])
    _, clean = audit(_side("t", train_hash, list(train_vec)), clean_eval, 6, 0.99)
    assert clean.leaks == 0 and clean.text().startswith("audit: clean")
    _, partial = audit(_side("t", train_hash, list(train_vec)), _side("e", [eval_hash[4]], [None], [True]), 6, 0.99)
    assert partial.leaks == 0 and "could not be checked" in partial.text() and "clean" not in partial.text()
