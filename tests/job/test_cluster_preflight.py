"""The cluster preflight on a real 2-node Ray cluster: `ray start --head` and `ray start
--address` on loopback (tests/ray_nodes.py), the nodes started with or without AWS
credentials while the driver has them, with moto's S3 server. One cluster per
environment, for the module; the one with credentials only for the slow tests."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.ray_nodes import LocalCluster, node_env, ray_env, start_cluster

BUCKET = "preflight-imgs"


@pytest.fixture(scope="module")
def images(s3_server):
    """Four small images under s3://BUCKET/in/ (the demo tagger tags any image)."""
    import io

    import numpy as np
    import s3fs
    from PIL import Image

    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    rng = np.random.default_rng(0)
    for i in range(4):
        data = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(data, "PNG")
        fs.pipe_file(f"{BUCKET}/in/img_{i}.png", data.getvalue())
    return f"s3://{BUCKET}/in/"


@pytest.fixture(scope="module")
def cluster_without_credentials(s3_server):
    cluster = start_cluster(node_env(with_credentials=False))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def cluster_with_credentials(s3_server):
    cluster = start_cluster(node_env(with_credentials=True))
    yield cluster
    cluster.stop()


def tag_on(
    cluster: LocalCluster, inputs: str, output: str, bundle, *extra: str
) -> subprocess.CompletedProcess:
    """`tagpipe tag` as a user runs it against the cluster: the driver has credentials."""
    env = ray_env()
    command = [sys.executable, "-m", "pipeline.cli", "tag", "-i", inputs, "-o", output, "-m", str(bundle)]
    command += ["--ray-address", cluster.address, "--no-progress", "--run-id", "preflight", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _objects_under(uri: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return fs.find(uri.removeprefix("s3://")) if fs.exists(uri) else []


def _error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def test_workers_without_credentials_stop_the_run_before_the_listing(
    cluster_without_credentials, images, demo_bundle
):
    output = f"s3://{BUCKET}/out-no-credentials"
    started = time.monotonic()
    done = tag_on(cluster_without_credentials, images, output, demo_bundle)
    seconds = time.monotonic() - started
    line = _error_line(done)
    assert re.search(r"workers on node [0-9.]+ \([0-9a-f]{8}\) ", line), line  # its IP, and its id's start
    assert f"cannot read {images}img_0.png" in line, line  # the first object of the one listing page
    assert "no credentials in the workers' environment (the driver has them)" in line, line
    assert "--storage-options" in line, line
    assert _objects_under(output) == []  # nothing written: no manifest, no part, no probe left
    print(f"stopped in {seconds:.1f} s (driver process start included)")


@pytest.mark.slow  # a second cluster: ~45 s to start on 2 loaded cores
def test_workers_with_credentials_run(cluster_with_credentials, images, demo_bundle):
    import json

    import s3fs

    output = f"s3://{BUCKET}/out-credentials"
    done = tag_on(cluster_with_credentials, images, output, demo_bundle, "--rows-per-part", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    record = json.loads(fs.cat_file(f"{BUCKET}/out-credentials/_runs/preflight.json"))
    assert record["summary"]["images"] == 4
    assert record["summary"]["timings"]["preflight_seconds"] > 0  # the workers were asked
    assert not [name for name in _objects_under(output) if ".tagpipe-preflight" in name]


@pytest.mark.slow
def test_an_output_the_store_refuses_is_named_as_a_write_failure(
    cluster_with_credentials, images, demo_bundle
):
    output = "s3://preflight-no-such-bucket/out"
    done = tag_on(cluster_with_credentials, images, output, demo_bundle)
    line = _error_line(done)
    assert "cannot write s3://preflight-no-such-bucket/out/.tagpipe-preflight-" in line, line
    assert "no such bucket: s3://preflight-no-such-bucket" in line, line
    assert "the driver" in line, line  # the driver's check is first; the workers' comes after it
