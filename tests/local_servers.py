"""Servers the tests and benchmarks start on loopback: a free port, and moto's
standalone S3 server (as s3fs's own tests run it), started and waited for."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

MOTO_START_SECONDS = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto(env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """moto's server on a free loopback port, once it answers (any HTTP status: a server
    with IAM auth on refuses the probe): (its process, its endpoint). `env`: the server's
    environment (e.g. INITIAL_NO_AUTH_ACTION_COUNT), this process's by default."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + MOTO_START_SECONDS
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP answer: it is up
                return proc, endpoint
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from exc
            time.sleep(0.2)
