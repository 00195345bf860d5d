"""Real Ray nodes on loopback for tests and benchmarks: `ray start --head` and `ray start
--address`, each started with an environment the caller chooses (as a user's shell or a
pod spec gives it). ray.cluster_utils.Cluster cannot do this: its nodes inherit the
caller's environment. Each cluster is its own (a temp dir and ports of its own; never
`ray stop`, which would stop every Ray on the machine) and is stopped by the ids it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.local_servers import free_port

CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
NODE_START_SECONDS = 120


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
    ports = ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]
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
    port = free_port()
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
