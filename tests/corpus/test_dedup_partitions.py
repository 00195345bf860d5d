"""The index searched over partitions: the same neighbours as one index, and on a 2-node
Ray cluster each partition searched on the node that holds it, a full build and the
nightly's incremental query both."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.corpus import vector_index
from pipeline.corpus.dedup import run_dedup
from pipeline.corpus.duplicate_index import DuplicateIndex, SegmentVectors
from pipeline.corpus.index_partitions import Partition, PartitionedIndex, PartitionSearcher, plan
from pipeline.demo.planted_table import Increment, PlantedSpec, apply_increment, write_planted_table


def _edges(folder) -> set[tuple]:
    table = pq.read_table(folder / "edges.parquet", columns=["uri_a", "uri_b", "signal"])
    return set(zip(*(table.column(c).to_pylist() for c in ("uri_a", "uri_b", "signal"))))


def _clusters(folder) -> dict[str, str]:
    table = pq.read_table(folder / "clusters.parquet", columns=["uri", "cluster_id"])
    return dict(zip(table.column("uri").to_pylist(), table.column("cluster_id").to_pylist()))


def test_plan_deals_the_largest_segments_first_onto_the_lightest_partition():
    parts = plan(["a", "b", "c", "d", "e"], [50, 10, 40, 30, 20], 2)
    assert sorted(p.entries for p in parts) == [70, 80]
    assert sorted(s for p in parts for s in p.segments) == ["a", "b", "c", "d", "e"]
    assert len(plan(["a"], [5], 4)) == 1  # never more partitions than segments


def test_partitions_find_what_one_index_finds(tmp_path, monkeypatch):
    """Three in-process partitions of an IVF-PQ index (two full-build pieces and an update's
    segment) return the same pairs and cosines as the same segments merged into one index."""
    monkeypatch.setattr(vector_index, "EXACT_LIMIT", 1_000)
    monkeypatch.setattr(vector_index, "ROWS_PER_LIST", 64)
    spec = PlantedSpec(rows=4000, dim=128, rows_per_part=1000, seed=11)
    tags, out = str(tmp_path / "tags"), str(tmp_path / "dedup")
    truth = write_planted_table(tags, spec)
    run_dedup(tags, out, embedding_threshold=0.8)
    apply_increment(tags, spec, Increment(added=80, changed=20, deleted=20, seed=1), truth)
    run_dedup(tags, out, embedding_threshold=0.8)
    index = DuplicateIndex(out)
    version = index.current()
    layout = version.layout
    assert layout is not None
    assert layout.kind == "ivf-pq" and len(version.segments) == 2
    reader = SegmentVectors(index, list(version.segments), layout.dim)
    entries = index.read_table(version.entries).column("entry").to_numpy()
    whole = vector_index.open_index([index.read_bytes(f"segments/{s}.faiss") for s in version.segments])
    one = vector_index.search(whole, layout, entries, reader, 0.8)
    rows = index.read_table(version.entries).column("segment").to_numpy()
    sizes = np.bincount(rows, minlength=len(version.segments)).tolist()
    searchers = [
        PartitionSearcher(out, None, Partition((s,), n), layout.dim) for s, n in zip(version.segments, sizes)
    ]
    split = vector_index.search(
        PartitionedIndex(searchers, [s.partition for s in searchers], False), layout, entries, reader, 0.8
    )
    assert len(one.query) > 50
    pairs = {(a, b): c for a, b, c in zip(one.query.tolist(), one.found.tolist(), one.cosine.tolist())}
    found = {(a, b): c for a, b, c in zip(split.query.tolist(), split.found.tolist(), split.cosine.tolist())}
    assert found.keys() == pairs.keys()
    assert all(abs(found[k] - pairs[k]) < 1e-6 for k in pairs)
    assert split.compared == one.compared


@pytest.fixture()
def two_nodes():
    from ray.cluster_utils import Cluster

    store = 150 * 1024 * 1024
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 1, "object_store_memory": store, "include_dashboard": False},
    )
    worker = cluster.add_node(num_cpus=1, object_store_memory=store)
    cluster.wait_for_nodes()
    yield cluster, {cluster.head_node.node_id, worker.node_id}
    cluster.shutdown()


def _dedup_on(cluster, tags: str, out, *extra: str) -> dict:
    command = [sys.executable, "-m", "pipeline.cli", "dedup", "--tags", tags, "-o", str(out)]
    command += ["--embedding-threshold", "0.8", "--partitions", "2", "--ray-address", cluster.address, *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "_summary.json").read_text())


@pytest.mark.slow  # two nodes; the partitions' search is compared in one process in the default run
def test_two_nodes_search_their_own_partitions_and_match_one_process(two_nodes, tmp_path):
    """A full build over 2 partitions (one per node) and a nightly update of it give the
    edges and clusters that one process gives, and each node searched one partition."""
    cluster, nodes = two_nodes
    spec = PlantedSpec(rows=24_000, dim=128, rows_per_part=6000, seed=12)
    tags, spread = str(tmp_path / "tags"), tmp_path / "spread"
    truth = write_planted_table(tags, spec)
    summary = _dedup_on(cluster, tags, spread)
    placed = summary["index"]["partitions"]
    assert summary["index"]["mode"] == "full" and len(placed) == 2
    assert {p["node"] for p in placed} == nodes
    assert sum(p["entries"] for p in placed) == summary["index"]["entries"] > 20_000  # IVF-PQ
    run_dedup(tags, str(tmp_path / "local"), embedding_threshold=0.8)
    assert _edges(spread) == _edges(tmp_path / "local")

    apply_increment(tags, spec, Increment(added=300, changed=100, deleted=100, seed=4), truth)
    night = _dedup_on(cluster, tags, spread)
    assert night["index"]["mode"] == "incremental"
    assert night["index"]["entries_searched"] == night["index"]["new_entries"] <= 400
    assert {p["node"] for p in night["index"]["partitions"]} == nodes
    run_dedup(tags, str(tmp_path / "rebuilt"), embedding_threshold=0.8, full=True)
    assert _clusters(spread) == _clusters(tmp_path / "rebuilt")
