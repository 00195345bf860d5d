"""Object-store failures a user can fix print one `error:` line naming the bucket or
endpoint and the likely cause, exit 2, show no traceback and no secret."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.local_servers import free_port, start_moto

SECRET = "sekrit-never-print-me-7Q2"
TAGPIPE = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(scope="module")
def strict_s3():
    """A second moto server that checks credentials (moto's IAM auth on from the first call)."""
    proc, url = start_moto(dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"))
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _run(args: list[str], **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_SECRET_ACCESS_KEY=SECRET, AWS_EC2_METADATA_DISABLED="true")
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([*TAGPIPE, *args], capture_output=True, text=True, env=env, timeout=240)


def _one_line(done: subprocess.CompletedProcess, *words: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "╭" not in done.stderr, done.stderr[-3000:]
    assert SECRET not in done.stderr + done.stdout
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_missing_bucket_is_named_and_never_created(s3_server, demo_bundle, tmp_path):
    import boto3

    images = tmp_path / "in"
    images.mkdir()
    (images / "a.bin").write_text("not an image")  # listed (a .txt is a sidecar, and lists nothing)
    done = _run(
        ["tag", "-i", str(images), "-o", "s3://tagpipe-no-such-bucket/out", "-m", str(demo_bundle), "-q"]
    )
    _one_line(done, "no such bucket: s3://tagpipe-no-such-bucket", s3_server)
    names = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
    assert "tagpipe-no-such-bucket" not in names


def test_unreachable_endpoint_is_named(demo_bundle):
    endpoint = f"http://127.0.0.1:{free_port()}"
    done = _run(
        ["tag", "-i", "s3://some-bucket/in", "-o", "s3://some-bucket/out", "-m", str(demo_bundle)],
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
    )
    _one_line(done, f"cannot connect to the S3 endpoint {endpoint}", "AWS_ENDPOINT_URL")


def test_missing_credentials_are_named(s3_server, demo_bundle, tmp_path):
    done = _run(
        ["tag", "-i", "s3://some-bucket/in", "-o", "s3://some-bucket/out", "-m", str(demo_bundle)],
        AWS_ACCESS_KEY_ID=None,
        AWS_SECRET_ACCESS_KEY=None,
        AWS_PROFILE=None,
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
    )
    _one_line(done, "no credentials for s3://some-bucket", "AWS_ACCESS_KEY_ID")


def test_access_denied_is_named(strict_s3, demo_bundle):
    done = _run(
        ["tag", "-i", "s3://some-bucket/in", "-o", "s3://locked-bucket/out", "-m", str(demo_bundle)],
        AWS_ENDPOINT_URL=strict_s3,
        AWS_ACCESS_KEY_ID="AKIAUNKNOWNKEY000000",
    )
    _one_line(done, "access denied to", "s3://some-bucket", strict_s3, "the driver's environment")


def test_a_local_permission_error_is_not_called_a_store_error():
    from pipeline.storage.filesystem import storage_error_text

    assert storage_error_text(PermissionError(13, "Permission denied", "/data/out"), ["/data/in"]) is None


def test_a_workers_failure_is_told_from_the_drivers():
    """The same refusal, raised in the driver or come back from a Ray task, names whose
    environment lacks what (the preflight's own lines: tests/job/test_cluster_preflight.py)."""
    from botocore.exceptions import NoCredentialsError
    from ray.exceptions import RayTaskError

    from pipeline.storage.filesystem import storage_error_text

    in_driver = storage_error_text(NoCredentialsError(), ["s3://b/x"])
    from_task = RayTaskError("write_part", "Traceback ...", NoCredentialsError()).as_instanceof_cause()
    in_workers = storage_error_text(from_task, ["s3://b/x"])
    assert in_driver is not None and "in the driver's environment" in in_driver
    assert in_workers is not None and "in the Ray workers' environment" in in_workers
    assert "on every Ray node" in in_workers
