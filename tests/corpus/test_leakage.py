"""Leakage beyond phash: metadata groups never cross splits, and the audit checks
sha256, reliable phash and embedding, saying what it could not check."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import TagpipeError
from pipeline.corpus.audit import audit
from pipeline.corpus.dedup import run_dedup
from pipeline.corpus.split import run_split


def _tags(folder, n: int, seed: int = 0, dim: int = 16) -> tuple[str, list[str]]:
    rng = np.random.default_rng(seed)
    uris = [f"/img/{i:04d}.jpg" for i in range(n)]
    table = pa.table(
        {
            "uri": uris,
            "sha256": [hashlib.sha256(u.encode()).hexdigest() for u in uris],
            "phash": pa.array(
                rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * 2 + 1, pa.uint64()
            ),
            "phash_degenerate": [False] * n,
            "width": [100] * n,
            "height": [100] * n,
            "size": [1000] * n,
            "error": pa.nulls(n, pa.string()),
            "tags": [["a"] if i % 3 else ["b"] for i in range(n)],
            "embedding": pa.array(
                [np.asarray(v, np.float16) for v in rng.normal(size=(n, dim))], pa.list_(pa.float16(), dim)
            ),
        }
    )
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-0.parquet")
    return str(folder), uris


def test_a_metadata_group_never_crosses_splits(tmp_path):
    tags, uris = _tags(tmp_path / "tags", 600)
    run_dedup(tags, str(tmp_path / "dedup"), embedding_threshold=None)
    posts = {
        u: f"post-{i // 4}" if i < 400 else None for i, u in enumerate(uris)
    }  # 100 posts of 4, 200 alone
    pq.write_table(pa.table({"uri": list(posts), "post": list(posts.values())}), tmp_path / "meta.parquet")
    run_split(
        tags,
        str(tmp_path / "dedup"),
        str(tmp_path / "split"),
        ratios={"train": 0.5, "val": 0.25, "test": 0.25},
        group_column="post",
        metadata=str(tmp_path / "meta.parquet"),
    )
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
    run_split(
        tags,
        str(tmp_path / "dedup"),
        str(tmp_path / "plain"),
        ratios={"train": 0.5, "val": 0.25, "test": 0.25},
    )
    plain = {r["uri"]: r["split"] for r in pq.read_table(tmp_path / "plain" / "splits.parquet").to_pylist()}
    assert sum(len({plain[u] for u in posts if posts[u] == p}) > 1 for p in by_post) > 50


def test_group_options_name_what_is_wrong(tmp_path):
    tags, uris = _tags(tmp_path / "tags", 20)
    run_dedup(tags, str(tmp_path / "dedup"), embedding_threshold=None)
    with pytest.raises(TagpipeError, match="--metadata"):
        run_split(tags, str(tmp_path / "dedup"), str(tmp_path / "s"), group_column="post")
    pq.write_table(pa.table({"uri": uris, "parent": ["x"] * 20}), tmp_path / "meta.parquet")
    with pytest.raises(TagpipeError, match="no column 'post'"):
        run_split(
            tags,
            str(tmp_path / "dedup"),
            str(tmp_path / "s"),
            group_column="post",
            metadata=str(tmp_path / "meta.parquet"),
        )


def _side(prefix: str, hashes, vectors, degenerate=None, sha=None) -> pa.Table:
    n = len(hashes)
    return pa.table(
        {
            "uri": [f"{prefix}/{i}.jpg" for i in range(n)],
            "sha256": sha or [f"{prefix}{i}" for i in range(n)],
            "phash": pa.array(hashes, pa.uint64()),
            "phash_unreliable": degenerate or [False] * n,
            "embedding": pa.array(
                [None if v is None else np.asarray(v, np.float16) for v in vectors],
                pa.list_(pa.float16(), next((len(v) for v in vectors if v is not None), 8)),
            ),
        }
    )


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
    leaks, report = audit(
        _side("t", train_hash, list(train_vec)), _side("e", eval_hash, eval_vec, degenerate, sha), 6, 0.99
    )
    got = {(r["eval_uri"], r["signal"]): r for r in leaks.to_pylist()}
    assert set(got) == {("e/0.jpg", "embedding"), ("e/1.jpg", "phash"), ("e/2.jpg", "sha256")}
    assert (
        got[("e/0.jpg", "embedding")]["train_uri"] == "t/3.jpg"
        and got[("e/0.jpg", "embedding")]["cosine"] >= 0.99
    )
    assert got[("e/1.jpg", "phash")]["distance"] == 3 and got[("e/2.jpg", "sha256")]["exact"]
    assert report.leaks == 3 and report.by_signal == {"sha256": 1, "phash": 1, "embedding": 1}
    assert report.not_checked["phash"] == 1 and report.not_checked["embedding"] == 1 and report.unchecked == 1
    clean_eval = _side("e", [eval_hash[5]], [eval_vec[5]])
    _, clean = audit(_side("t", train_hash, list(train_vec)), clean_eval, 6, 0.99)
    assert clean.leaks == 0 and clean.text().startswith("audit: clean")
    _, partial = audit(
        _side("t", train_hash, list(train_vec)), _side("e", [eval_hash[4]], [None], [True]), 6, 0.99
    )
    assert partial.leaks == 0 and "could not be checked" in partial.text() and "clean" not in partial.text()


def test_many_leaks_do_not_blind_the_auto_threshold():
    """The leaks themselves are not negatives: 150 planted copies among 600 eval images
    are all found with auto (its random pairs come from train only)."""
    rng = np.random.default_rng(5)
    train_vec = rng.normal(size=(400, 64))
    eval_vec = list(rng.normal(size=(600, 64)))
    for i in range(150):
        eval_vec[i] = train_vec[i] + 0.05 * rng.normal(size=64)
    hashes = lambda k: [int(h) * 2 + 1 for h in rng.integers(0, 2**62, k)]  # noqa: E731
    leaks, report = audit(
        _side("t", hashes(400), list(train_vec)), _side("e", hashes(600), eval_vec), 6, "auto"
    )
    assert report.embedding.chosen_by == "auto" and report.embedding.threshold is not None
    assert report.by_signal["embedding"] == 150


def test_what_could_not_be_checked_is_never_called_checked():
    rng = np.random.default_rng(6)
    vec = rng.normal(size=(20, 8))
    train = _side(
        "t", [int(h) * 2 + 1 for h in rng.integers(0, 2**62, 20)], list(vec), degenerate=[True] * 20
    )
    evaluation = _side(
        "e", [int(h) * 2 + 1 for h in rng.integers(0, 2**62, 3)], [vec[0] * 1e5, vec[1], vec[2]]
    )
    _, report = audit(train, evaluation, 6, 0.95)
    assert report.not_checked["phash"] == 3  # no usable train hash: nothing was compared
    assert report.train_not_usable["phash"] == 20
    assert (
        report.not_checked["embedding"] == 1 and report.unchecked == 1
    )  # 1e5 overflows float16: no direction
    assert "could not be checked" in report.text()


def test_identical_embeddings_are_found_at_any_given_threshold():
    """float16 unit rows give identical vectors ~0.9998, so a given threshold is capped at 0.999."""
    vec = np.random.default_rng(7).normal(size=(10, 8))
    leaks, report = audit(_side("t", [3] * 10, list(vec)), _side("e", [5] * 10, list(vec)), 0, 1.0)
    assert report.embedding.threshold == 0.999 and report.by_signal["embedding"] == 10


def test_a_split_output_carries_its_hash_flags(tmp_path):
    tags, uris = _tags(tmp_path / "tags", 30)
    table = pq.read_table(tmp_path / "tags" / "part-0.parquet")
    flags = [i < 10 for i in range(30)]
    pq.write_table(
        table.set_column(table.column_names.index("phash_degenerate"), "phash_degenerate", pa.array(flags)),
        tmp_path / "tags" / "part-0.parquet",
    )
    run_dedup(tags, str(tmp_path / "dedup"), embedding_threshold=None)
    run_split(tags, str(tmp_path / "dedup"), str(tmp_path / "split"))
    split = pq.read_table(tmp_path / "split" / "splits.parquet")
    flagged = dict(zip(split.column("uri").to_pylist(), split.column("phash_degenerate").to_pylist()))
    assert [flagged[u] for u in uris] == flags


def test_missing_or_foreign_inputs_are_one_line_errors_and_split_folders_read_after_an_audit(tmp_path):
    from pipeline.corpus.audit import run_audit
    from pipeline.table.reading import read_parquet

    with pytest.raises(TagpipeError, match="no such file or folder"):
        read_parquet(str(tmp_path / "nowhere"))
    (tmp_path / "meta.csv").write_text("uri,post\n/a.jpg,1\n")
    with pytest.raises(TagpipeError, match="not a Parquet file"):
        read_parquet(str(tmp_path / "meta.csv"))
    tags, _ = _tags(tmp_path / "tags", 40)
    run_dedup(tags, str(tmp_path / "dedup"), embedding_threshold=None)
    run_split(tags, str(tmp_path / "dedup"), str(tmp_path / "split"), ratios={"train": 0.5, "val": 0.5})
    with pytest.raises(TagpipeError, match="--metadata needs --group-column"):
        run_split(tags, str(tmp_path / "dedup"), str(tmp_path / "s2"), metadata=str(tmp_path / "meta.csv"))
    run_audit(str(tmp_path / "split"), str(tmp_path / "split"), output=str(tmp_path / "split" / "audit"))
    assert (tmp_path / "split" / "audit" / "audit.json").is_file()
    _, again = run_audit(
        str(tmp_path / "split"), str(tmp_path / "split")
    )  # the folder still reads: only Parquet
    assert again.eval_images + again.train_images == 40


def test_an_audit_that_could_not_check_every_eval_image_never_exits_0():
    """0 only when every eval image was checked by every signal the run was asked to use:
    the embedding is asked for unless its threshold is off (`auto`, the default, asks)."""
    rng = np.random.default_rng(8)
    train_vec, eval_vec = rng.normal(size=(40, 8)), list(rng.normal(size=(4, 8)))
    train_hash = [int(h) * 2 + 1 for h in rng.integers(0, 2**62, 40)]
    eval_hash = [int(h) * 2 + 1 for h in rng.integers(0, 2**62, 4)]
    train = _side("t", train_hash, list(train_vec))
    _, full = audit(train, _side("e", eval_hash, eval_vec), 6, 0.99)
    assert (full.exit_status(), full.complete, full.text().startswith("audit: clean")) == (0, True, True)
    low_detail = _side("e", eval_hash, eval_vec, degenerate=[True, False, False, False])
    _, covered = audit(train, low_detail, 6, 0.99)  # phash cannot check it; the embedding did
    assert covered.exit_status() == 0 and covered.not_checked["phash"] == 1 and not covered.short_of()
    _, phash_short = audit(train, low_detail, 6, None)  # embedding off: nothing checked it for near copies
    assert phash_short.exit_status() == 4 and phash_short.short_of() == {"phash": 1}
    assert "not checked by phash 1 of 4" in phash_short.text()
    blank_no_vector = _side("e", eval_hash, [None, *eval_vec[1:]], degenerate=[True, False, False, False])
    _, neither = audit(train, blank_no_vector, 6, 0.99)  # neither near-copy signal checked it
    assert neither.exit_status() == 4 and neither.short_of() == {"embedding": 1}
    no_vectors = _side("e", eval_hash, [None] * 4)
    for threshold in ("auto", 0.99):  # asked for, given or not, but nothing to compare
        _, short = audit(train, no_vectors, 6, threshold)
        assert short.exit_status() == 4 and short.short_of() == {"embedding": 4}, threshold
        assert "NOT FULLY CHECKED" in short.text() and "clean" not in short.text()
    _, hashes_only = audit(train, no_vectors, 6, None)  # `off`: only sha256 and phash were asked for
    assert hashes_only.exit_status() == 0 and hashes_only.asked == ("sha256", "phash")
    copy = _side("e", [train_hash[0]], [None])
    _, leaky = audit(train, copy, 6, 0.99)
    assert leaky.exit_status() == 1  # leaks come first
