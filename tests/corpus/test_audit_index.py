"""The audit of a split searched in dedup's index: the same leaks as an audit with its own
train-only index, and after a nightly's change only what changed is searched again."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.corpus.audit import run_audit
from pipeline.corpus.dedup import run_dedup
from pipeline.demo.planted_table import Increment, PlantedSpec, apply_increment, write_planted_table
from pipeline.table.reading import read_parquet


def _leaky_split(tags: str, folder, held_out=frozenset()) -> str:
    """Rows to train or val by a hash of their uri, clusters ignored: planted copies cross."""
    rows = read_parquet(tags, columns=["uri", "sha256", "phash", "phash_degenerate"])
    split = [
        "held_out" if u in held_out else "val" if hashlib.sha256(u.encode()).digest()[0] < 40 else "train"
        for u in rows.column("uri").to_pylist()
    ]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows.append_column("split", pa.array(split)), folder / "splits.parquet")
    return str(folder)


def _embedding_leaks(leaks: pa.Table) -> set[tuple[str, str]]:
    emb = leaks.filter(pc.equal(leaks.column("signal"), "embedding"))
    return set(zip(emb.column("eval_uri").to_pylist(), emb.column("train_uri").to_pylist()))


def test_an_audit_in_dedups_index_follows_the_change(tmp_path):
    spec = PlantedSpec(rows=4000, dim=128, rows_per_part=1000, identical=20, copy_share=0.03, seed=11)
    tags = str(tmp_path / "tags")
    truth = write_planted_table(tags, spec)
    run_dedup(tags, str(tmp_path / "dedup"), embedding_threshold=0.8)
    split = _leaky_split(tags, tmp_path / "split")
    audit_out = str(tmp_path / "audit")
    leaks, report = run_audit(
        split, split, output=audit_out, tags=tags, embedding_threshold=0.8, dedup=str(tmp_path / "dedup")
    )
    own, _ = run_audit(split, split, tags=tags, embedding_threshold=0.8)  # its own train-only index
    assert report.embedding.index.mode == "full"
    assert _embedding_leaks(leaks) == _embedding_leaks(own) and len(_embedding_leaks(leaks)) > 10
    assert report.not_checked["embedding"] == 0

    apply_increment(tags, spec, Increment(added=80, changed=20, deleted=20, copy_share=0.5), truth)
    run_dedup(tags, str(tmp_path / "dedup"), embedding_threshold=0.8)
    gone = {train for _, train in sorted(_embedding_leaks(leaks))[:8]}  # leak partners leave train
    split = _leaky_split(tags, tmp_path / "split2", held_out=gone)
    leaks, report = run_audit(
        split, split, output=audit_out, tags=tags, embedding_threshold=0.8, dedup=str(tmp_path / "dedup")
    )
    own, own_report = run_audit(split, split, tags=tags, embedding_threshold=0.8)
    facts = report.embedding.index
    assert facts.mode == "incremental"
    assert facts.eval_searched < 0.2 * facts.eval_vectors and facts.train_searched <= 100
    said = f"searched in dedup's index (incremental: {facts.eval_searched} eval and "
    assert said in report.text() and "searched in" not in own_report.text()  # the terminal line says so
    assert _embedding_leaks(leaks) == _embedding_leaks(own)
    assert not {train for _, train in _embedding_leaks(leaks)} & gone


def test_when_the_nearest_train_image_leaves_train_the_next_one_is_found(tmp_path):
    """e is 0.97 from t1 and 0.90 from t2: once t1 is held out, e leaks through t2."""
    from pipeline.demo.planted_table import near_copy
    from pipeline.table.tag_table import TagTable, commit_version

    rng = np.random.default_rng(3)
    base = rng.standard_normal((300, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    t1 = near_copy(rng, base[:1], np.array([0.97], np.float32))
    t2 = near_copy(rng, base[:1], np.array([0.90], np.float32))
    vectors = np.vstack([base, t1, t2])
    uris = [f"/a/{i:03d}.jpg" for i in range(302)]  # 0 is e, 300 is t1, 301 is t2
    flat = pa.array(vectors.astype(np.float16).reshape(-1), pa.float16())
    rows = pa.table(
        {
            "uri": uris,
            "sha256": [hashlib.sha256(u.encode()).hexdigest() for u in uris],
            "phash": pa.nulls(302, pa.uint64()),
            "phash_degenerate": [False] * 302,
            "embedding": pa.FixedSizeListArray.from_arrays(flat, 64),
        }
    )
    table = TagTable(str(tmp_path / "tags"))
    part = table.write_part("data/k/part-0.parquet", rows)
    commit_version(
        table, None, [part], model_sha256="m", inference_key="k", rules_key="r", run_id="r",
        model_name="m",
    )  # fmt: skip
    tags, dedup = str(tmp_path / "tags"), str(tmp_path / "dedup")
    run_dedup(tags, dedup, embedding_threshold=0.85)

    def split(folder, held_out):
        names = ["val" if u == uris[0] else "held_out" if u in held_out else "train" for u in uris]
        table = rows.select(["uri", "sha256", "phash", "phash_degenerate"]).append_column(
            "split", pa.array(names)
        )
        (tmp_path / folder).mkdir()
        pq.write_table(table, tmp_path / folder / "splits.parquet")
        return str(tmp_path / folder)

    audit = str(tmp_path / "audit")
    first, _ = run_audit(
        split("s1", set()),
        split("s1b", set()),
        output=audit,
        tags=tags,
        embedding_threshold=0.85,
        dedup=dedup,
    )
    assert _embedding_leaks(first) == {(uris[0], uris[300])}
    s2 = split("s2", {uris[300]})
    second, report = run_audit(s2, s2, output=audit, tags=tags, embedding_threshold=0.85, dedup=dedup)
    assert report.embedding.index.mode == "incremental" and report.embedding.index.eval_searched == 1
    assert _embedding_leaks(second) == {(uris[0], uris[301])}
