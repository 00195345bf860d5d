"""`tagpipe model pull` against a loopback Hub (tests/hub_server.py) through HF_ENDPOINT:
the family is found from the file list, the bundle is checked before it lands, the
source is recorded, and a failed or refused pull leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import joytag_bundle, run_cli, wd_bundle
from tests.hub_server import FakeHub

TAGPIPE = [sys.executable, "-m", "pipeline.cli"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _files(directory: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    wd = _files(wd_bundle(root / "wd"))
    joytag_bundle(root / "joy")
    broken = dict(_files(wd_bundle(root / "broken", tags=12, vocab_size=11)))
    repos = {
        "SmilingWolf/wd-vit-tagger-v3": {**wd, "README.md": b"# card\n", "sw_jax_cv_config.json": b"{}"},
        "someone/many": {**_files(root / "wd", "v1/"), **_files(root / "joy", "v2/"), "README.md": b"x"},
        "someone/mismatch": broken,
        "someone/empty": {"README.md": b"nothing here"},
    }
    with FakeHub(repos) as server:
        yield server


def _pull(hub: FakeHub, *args, token: str | None = None, home: Path):
    env = dict(
        os.environ,
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
    )
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [*TAGPIPE, "model", "pull", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_pull_writes_a_checked_bundle_and_records_its_source(hub, tmp_path):
    target = tmp_path / "wd"
    done = _pull(
        hub,
        "SmilingWolf/wd-vit-tagger-v3",
        str(target),
        "--revision",
        "main",
        token="hf_test_token",
        home=tmp_path / "hf",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(wd_v3): 2 files" in done.stdout
    assert sorted(p.name for p in target.iterdir()) == [
        "model.onnx",
        "selected_tags.csv",
        "tagpipe_source.json",
    ]
    assert oct(target.stat().st_mode & 0o777) == oct(
        0o777 & ~_umask()
    )  # readable by others, not mkdtemp's 0700
    source = json.loads((target / "tagpipe_source.json").read_text())
    assert source["repo_id"] == "SmilingWolf/wd-vit-tagger-v3" and source["revision"] == "main"
    assert source["commit"] == hub.commits["SmilingWolf/wd-vit-tagger-v3"] and source["profile"] == "wd_v3"
    import hashlib

    for entry in source["files"]:
        assert hashlib.sha256((target / Path(entry["path"]).name).read_bytes()).hexdigest() == entry["sha256"]
    assert any(auth == "Bearer hf_test_token" for _, _, auth in hub.requests)  # HF_TOKEN reached the Hub
    inspect = run_cli("model", "inspect", str(target))
    assert "profile:     wd_v3" in inspect.stdout


def test_pull_from_a_subfolder_and_clear_refusals(hub, tmp_path):
    many = _pull(hub, "someone/many", str(tmp_path / "x"), home=tmp_path / "hf")
    assert (
        many.returncode == 2 and "several bundles (v1 (wd_v3), v2 (joytag)); pass --subfolder" in many.stderr
    )
    joy = _pull(hub, "someone/many", str(tmp_path / "joy"), "--subfolder", "v2", home=tmp_path / "hf")
    assert joy.returncode == 0, joy.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "joy").iterdir()) == [
        "model.onnx",
        "tagpipe_source.json",
        "top_tags.txt",
    ]
    empty = _pull(hub, "someone/empty", str(tmp_path / "e"), home=tmp_path / "hf")
    assert empty.returncode == 2 and "no supported tagger found" in empty.stderr
    missing = _pull(hub, "someone/nothing", str(tmp_path / "m"), home=tmp_path / "hf")
    assert (
        missing.returncode == 2
        and f"someone/nothing: no such model repository on {hub.url}" in missing.stderr
    )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    taken = _pull(hub, "SmilingWolf/wd-vit-tagger-v3", str(tmp_path / "taken"), home=tmp_path / "hf")
    assert taken.returncode == 2 and "exists and is not empty" in taken.stderr
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]


def test_a_bundle_that_fails_its_check_leaves_nothing(hub, tmp_path):
    done = _pull(hub, "someone/mismatch", str(tmp_path / "bad"), home=tmp_path / "hf")
    assert done.returncode == 2 and "model and vocabulary do not belong together" in done.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "hf"] or not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".bad", "bad"))]


def _closed_port() -> int:
    """A loopback port nothing listens on: a connection to it is refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("offline", [False, True], ids=["connection-refused", "HF_HUB_OFFLINE"])
def test_no_reachable_hub_is_one_line_naming_the_ways_round_it(offline, tmp_path):
    env = dict(
        os.environ,
        HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    target = tmp_path / "wd"
    done = subprocess.run(
        [*TAGPIPE, "model", "pull", "SmilingWolf/wd-vit-tagger-v3", str(target)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: SmilingWolf/wd-vit-tagger-v3: ")
    assert ("HF_HUB_OFFLINE is set" if offline else f"cannot reach the Hub at {env['HF_ENDPOINT']}") in lines[
        0
    ]
    assert "copy a bundle folder by hand" in lines[0] and (offline or "HF_ENDPOINT" in lines[0])
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".wd")]
