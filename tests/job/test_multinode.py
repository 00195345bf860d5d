"""A head and two worker nodes on this machine (ray.cluster_utils.Cluster), one of them
advertising a GPU: tagger actors must land on the GPU node, decode tasks elsewhere.

Resources make placement deterministic: the GPU node has 1 CPU, which the tagger actor
(1 CPU + 1 GPU) takes; decode tasks ask for 2 CPUs, which only the CPU node has.
Without a real GPU, ONNX Runtime on the "GPU" node falls back to CPU (runtime.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.demo.end_to_end import check_tags
from pipeline.table.tag_table import read_current


@pytest.fixture()
def cluster():
    from ray.cluster_utils import Cluster

    store = 150 * 1024 * 1024
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 1, "object_store_memory": store, "include_dashboard": False},
    )
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=store)
    cpu_node = cluster.add_node(num_cpus=2, object_store_memory=store)
    cluster.wait_for_nodes()
    yield cluster, gpu_node, cpu_node
    cluster.shutdown()


@pytest.mark.slow  # three nodes; placement is planned by plan_placement, tested in the default run
def test_tagger_on_the_gpu_node_and_decode_on_the_others(cluster, demo_bundle, demo_corpus, tmp_path):
    cluster, gpu_node, cpu_node = cluster
    out = tmp_path / "tags"
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "tag",
        "-i",
        str(demo_corpus / "images"),
        "-o",
        str(out),
        "-m",
        str(demo_bundle),
        "--ray-address",
        cluster.address,
        "--decode-cpus",
        "2",
        "--tagger-cpus",
        "1",
        "--gpus-per-actor",
        "1",
        "--rows-per-part",
        "32",
        "--run-id",
        "multinode",
        "--no-progress",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]

    record = json.loads((out / "_runs" / "multinode.json").read_text())
    summary = record["summary"]
    assert (
        "1 GPU, 2 batch(es) in flight" in summary["placement"]
    )  # the default on GPU: concurrent calls in the actor
    total = len(list((demo_corpus / "images").rglob("*.*")))
    assert summary["rows_by_node"]["tag"] == {gpu_node.node_id: total}
    assert summary["rows_by_node"]["decode"] == {cpu_node.node_id: total}
    assert read_current(str(out)).num_rows == total
    checked, correct, wrong = check_tags(out, demo_corpus)
    assert (checked, correct, wrong) == (total, total, [])
