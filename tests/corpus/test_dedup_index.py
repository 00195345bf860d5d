"""The near-duplicate index kept by dedup: incremental runs equal a rebuild, identical vectors
cost one entry, a nightly searches only what changed, deletions split clusters, and a run
that stops before its commit leaves the last version whole."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import TagpipeError
from pipeline.corpus import vector_index
from pipeline.corpus.dedup import run_dedup
from pipeline.corpus.duplicate_index import DuplicateIndex
from pipeline.demo.planted_table import (
    Increment,
    PlantedSpec,
    apply_increment,
    near_copy,
    write_planted_table,
)
from pipeline.table.tag_table import TagTable, commit_version


def _clusters(folder) -> dict[str, str]:
    table = pq.read_table(folder / "clusters.parquet", columns=["uri", "cluster_id"])
    return dict(zip(table.column("uri").to_pylist(), table.column("cluster_id").to_pylist()))


def _partition(clusters: dict[str, str]) -> set[frozenset]:
    """Clusters as sets of uris (ids aside: the same grouping, whatever names it)."""
    groups: dict[str, set] = {}
    for uri, cluster in clusters.items():
        groups.setdefault(cluster, set()).add(uri)
    return {frozenset(g) for g in groups.values()}


@pytest.fixture(params=["flat", "ivf-pq"])
def layout_kind(request, monkeypatch):
    """Both index layouts: IVF-PQ (cells, 4-bit codes, re-ranking) on a small table by
    lowering the exact limit, as a million-row table would get it."""
    if request.param == "ivf-pq":
        monkeypatch.setattr(vector_index, "EXACT_LIMIT", 1_000)
        monkeypatch.setattr(vector_index, "ROWS_PER_LIST", 64)
    return request.param


def test_nightly_increments_equal_a_full_rebuild(tmp_path, layout_kind):
    """Four nightlies of adds (some copies of old rows), changes and deletes, each an
    incremental run on the index, give the clusters one --full rebuild gives at the end;
    every run searches only its new vectors."""
    spec = PlantedSpec(rows=4000, dim=256, rows_per_part=1000, identical=50, seed=3)
    tags, out = str(tmp_path / "tags"), tmp_path / "dedup"
    truth = write_planted_table(tags, spec)
    first = run_dedup(tags, str(out))
    assert first.index.mode == "full" and first.index.vectors.entries_searched == first.index.vectors.entries
    checked = first.embedding.search_recall  # sampled queries against every vector, exactly
    assert checked["sampled_true"] > 0 and checked["sampled_found"] >= 0.95 * checked["sampled_true"]
    kind = json.loads((out / "_index" / "_current.json").read_text())["layout"]["kind"]
    assert kind == layout_kind
    for night in range(4):
        step = Increment(added=60, changed=20, deleted=30, seed=night)
        apply_increment(tags, spec, step, truth)
        summary = run_dedup(tags, str(out))
        assert summary.index.mode == "incremental"
        assert summary.index.vectors.rows_read == step.added + step.changed  # embeddings read: only theirs
        assert (
            summary.index.vectors.entries_searched
            == summary.index.vectors.new_entries
            <= step.added + step.changed
        )
        assert summary.index.hashes_searched <= step.added + step.changed
    rebuilt = run_dedup(tags, str(tmp_path / "rebuilt"), full=True)
    assert rebuilt.index.mode == "full" and rebuilt.embedding.threshold == pytest.approx(
        first.embedding.threshold, abs=0.05
    )
    incremental, full = _partition(_clusters(out)), _partition(_clusters(tmp_path / "rebuilt"))
    if summary.embedding.threshold == rebuilt.embedding.threshold:
        assert incremental == full
    else:  # auto chose a slightly other cosine on the grown table: the planted truth decides
        assert len(incremental ^ full) <= 4
    clusters = _clusters(out)
    together = sum(clusters[a] == clusters[b] for a, b in zip(truth.source, truth.copy))
    assert together >= 0.98 * len(truth.source) and len(truth.source) > 40


def test_the_same_threshold_gives_identical_clusters(tmp_path):
    """With the cosine given, nothing varies between the runs: incremental == full exactly."""
    spec = PlantedSpec(rows=3000, dim=128, rows_per_part=750, seed=5)
    tags = str(tmp_path / "tags")
    truth = write_planted_table(tags, spec)
    run_dedup(tags, str(tmp_path / "inc"), embedding_threshold=0.8)
    for night in range(3):
        apply_increment(tags, spec, Increment(added=50, changed=25, deleted=25, seed=night), truth)
        run_dedup(tags, str(tmp_path / "inc"), embedding_threshold=0.8)
    run_dedup(tags, str(tmp_path / "full"), embedding_threshold=0.8, full=True)
    assert _clusters(tmp_path / "inc") == _clusters(tmp_path / "full")
    edges = [pq.read_table(tmp_path / d / "edges.parquet") for d in ("inc", "full")]
    assert edges[0].num_rows == edges[1].num_rows


def test_identical_vectors_are_one_entry_and_one_edge_each(tmp_path):
    """2,000 blank images share one vector among 5,000 rows: one index entry, one edge per
    extra row (not 2M pairs), and the embedding still finds the planted copies."""
    spec = PlantedSpec(rows=3000, dim=256, rows_per_part=1000, identical=2000, seed=7)
    tags = str(tmp_path / "tags")
    truth = write_planted_table(tags, spec)
    summary = run_dedup(tags, str(tmp_path / "out"))
    assert summary.embedding.threshold is not None
    assert summary.index.vectors.entries == 3000 + 1
    edges = pq.read_table(tmp_path / "out" / "edges.parquet")
    assert edges.num_rows <= 5000  # at most one edge per row
    assert summary.edges["embedding"] == 1999 + len(truth.source)
    clusters = _clusters(tmp_path / "out")
    assert len({clusters[u] for u in truth.identical}) == 1
    assert all(clusters[a] == clusters[b] for a, b in zip(truth.source, truth.copy))


def _table_of(tmp_path, vectors: np.ndarray, uris: list[str]) -> str:
    uri = str(tmp_path / "tags")
    table = TagTable(uri)
    rows = _rows(uris, vectors)
    file = table.write_part("data/k/part-0.parquet", rows)
    commit_version(
        table,
        None,
        [file],
        model_sha256="m",
        inference_key="k",
        rules_key="r",
        run_id="r1",
        model_name="m",
    )
    return uri


def _rows(uris: list[str], vectors: np.ndarray) -> pa.Table:
    n = len(uris)
    flat = pa.array(vectors.astype(np.float16).reshape(-1), pa.float16())
    return pa.table(
        {
            "uri": uris,
            "sha256": [hashlib.sha256(u.encode()).hexdigest() for u in uris],
            "phash": pa.nulls(n, pa.uint64()),
            "error": pa.nulls(n, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
        }
    )


def test_deleting_a_bridge_splits_its_cluster(tmp_path):
    """a ~ b ~ c joined only through b: with b deleted, a and c fall apart again."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    b = near_copy(rng, base[:1], np.array([0.95], np.float32))
    c = near_copy(rng, b, np.array([0.95], np.float32))  # about 0.90 from a: under the threshold
    vectors = np.vstack([base, b, c])
    uris = [f"/v/{i:03d}.jpg" for i in range(202)]
    tags = _table_of(tmp_path, vectors, uris)
    run_dedup(tags, str(tmp_path / "out"), embedding_threshold=0.93)
    assert len({_clusters(tmp_path / "out")[u] for u in (uris[0], uris[200], uris[201])}) == 1
    table = TagTable(tags)
    kept = _rows(uris[:200] + uris[201:], np.vstack([base, c]))
    file = table.write_part("data/k/part-1.parquet", kept)
    commit_version(
        table,
        table.snapshot(),
        [file],
        model_sha256="m",
        inference_key="k",
        rules_key="r",
        run_id="r2",
        model_name="m",
    )
    summary = run_dedup(tags, str(tmp_path / "out"), embedding_threshold=0.93)
    clusters = _clusters(tmp_path / "out")
    assert summary.index.mode == "incremental" and summary.index.vectors.rows_read == 0
    assert clusters[uris[0]] != clusters[uris[201]]


def test_a_run_stopped_before_its_commit_leaves_the_last_version(tmp_path, monkeypatch):
    spec = PlantedSpec(rows=1500, dim=64, rows_per_part=500, seed=9)
    tags = str(tmp_path / "tags")
    truth = write_planted_table(tags, spec)
    run_dedup(tags, str(tmp_path / "out"), embedding_threshold=0.9)
    before = _clusters(tmp_path / "out")
    apply_increment(tags, spec, Increment(added=40, changed=10, deleted=10), truth)

    def stop(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DuplicateIndex, "commit", stop)
    with pytest.raises(KeyboardInterrupt):
        run_dedup(tags, str(tmp_path / "out"), embedding_threshold=0.9)
    monkeypatch.undo()
    index = DuplicateIndex(str(tmp_path / "out"))
    assert index.current().version == 1 and _clusters(tmp_path / "out") == before
    again = run_dedup(tags, str(tmp_path / "out"), embedding_threshold=0.9)
    assert again.index.version == 2 and again.index.mode == "incremental"


def test_two_runs_racing_for_one_version_refuse_the_second(tmp_path):
    spec = PlantedSpec(rows=800, dim=32, rows_per_part=400, seed=2)
    tags = str(tmp_path / "tags")
    write_planted_table(tags, spec)
    run_dedup(tags, str(tmp_path / "out"), embedding_threshold=0.9)
    index = DuplicateIndex(str(tmp_path / "out"))
    current = index.current()
    with pytest.raises(TagpipeError, match="another dedup run committed index version 1"):
        index.commit(None, current)


def test_a_new_model_or_a_lower_threshold_rebuilds(tmp_path):
    spec = PlantedSpec(rows=800, dim=32, rows_per_part=400, seed=4)
    tags = str(tmp_path / "tags")
    write_planted_table(tags, spec)
    run_dedup(tags, str(tmp_path / "out"), embedding_threshold=0.9)
    lower = run_dedup(tags, str(tmp_path / "out"), embedding_threshold=0.8)
    assert lower.index.mode == "full" and "below the 0.9000" in lower.index.reason
    higher = run_dedup(tags, str(tmp_path / "out"), embedding_threshold=0.85)
    assert higher.index.mode == "incremental" and higher.index.vectors.rows_read == 0
    table = TagTable(tags)
    snapshot = table.snapshot()
    commit_version(
        table,
        snapshot,
        list(snapshot.files),
        model_sha256="other",
        inference_key="another-model",
        rules_key="r",
        run_id="r9",
        model_name="other",
    )
    retagged = run_dedup(tags, str(tmp_path / "out"), embedding_threshold=0.85)
    assert retagged.index.mode == "full" and "model or preprocessing changed" in retagged.index.reason
