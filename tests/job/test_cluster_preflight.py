"""The cluster preflight on a real 2-node Ray cluster: `ray start --head` and `ray start
--address` on loopback, each node started with an environment the test chooses (as a
user's shell or a pod spec gives it), with moto's S3 server. ray.cluster_utils.Cluster
cannot do this: its nodes inherit the test's environment.

Each cluster is its own (a temp dir and ports of its own, never `ray stop`, which would
stop every Ray on the machine) and is stopped by its fixture, by the ids it started."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
BUCKET = "preflight-imgs"
NODE_START_SECONDS = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalCluster:
    address: str
    processes: list[subprocess.Popen]
    temp_dir: str

    def stop(self) -> None:
        """SIGTERM to each `ray start --block` (it stops its node's processes), then the
        process groups it started, by their ids."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            with _ignored():
                os.killpg(proc.pid, signal.SIGKILL)  # its group: raylet, workers left behind
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class _ignored:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is ProcessLookupError or exc[0] is PermissionError


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """One node, blocking in the foreground; returns once the node has joined."""
    ray = str(Path(sys.executable).parent / "ray")
    ports = ["--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port())]
    handle = log.open("w")
    proc = subprocess.Popen(
        [ray, "start", "--block", "--disable-usage-stats", "--num-cpus=1", *ports, *args],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + NODE_START_SECONDS
    while "Ray runtime started" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    return proc


def start_cluster(env: dict[str, str]) -> LocalCluster:
    """A head and one worker node on 127.0.0.1, started with `env`; 1 CPU each."""
    temp_dir = tempfile.mkdtemp(prefix="tpray", dir="/tmp")  # short: Ray's socket paths must fit
    port = _free_port()
    cluster = LocalCluster(f"127.0.0.1:{port}", [], temp_dir)
    try:
        head = [
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
        ]
        cluster.processes.append(_ray_start(head, env, Path(temp_dir) / "head.log"))
        worker = [f"--address={cluster.address}", "--node-ip-address=127.0.0.1"]
        cluster.processes.append(_ray_start(worker, env, Path(temp_dir) / "worker.log"))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def ray_env() -> dict[str, str]:
    """The test's environment (endpoint, keys, PYTHONPATH) for a Ray node or a driver of
    these clusters: no RAY_ADDRESS, and Ray's token auth (on by default for `ray start`
    in Ray 2.5x+, with a token in the home folder) off, so nothing outside the test counts."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def node_env(with_credentials: bool) -> dict[str, str]:
    """The nodes' environment: the test's, with or without keys; without, no file or
    instance metadata service supplies any either."""
    env = ray_env()
    if not with_credentials:
        for key in CREDENTIALS:
            env.pop(key, None)
        none = "/nonexistent/tagpipe-preflight"
        env.update(AWS_SHARED_CREDENTIALS_FILE=none, AWS_CONFIG_FILE=none, AWS_EC2_METADATA_DISABLED="true")
    return env


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
