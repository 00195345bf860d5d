"""Two writers, one table: the version record is created exclusively, so of two runs
that worked from the same version exactly one commits; the other is refused with a
message naming the winner, loses nothing, and its rerun commits on top without tagging
again. On local disk and on the moto S3 server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.table.tag_table import CommitConflict, Snapshot, TagTable, read_current

TAGPIPE = [sys.executable, "-m", "pipeline.cli"]


def _snapshot(version: int, run: str) -> Snapshot:
    return Snapshot(
        version=version,
        files=(),
        rows=0,
        model_sha256="m",
        inference_key="i",
        rules_key="r",
        run_id=run,
        committed_at="2026-12-01T00:00:00+00:00",
    )


def _race(uri: str, rounds: int) -> list[tuple[str, str]]:
    """`rounds` times, two threads commit the next version from the same base at once."""
    table = TagTable(uri)
    outcomes = []
    for round_ in range(rounds):
        base = table.current()
        barrier = threading.Barrier(2)
        results: dict[str, str] = {}

        def commit(run: str, barrier=barrier, base=base, results=results):
            barrier.wait()
            try:
                TagTable(uri).commit(base, _snapshot((base.version if base else 0) + 1, run))
                results[run] = "committed"
            except CommitConflict as exc:
                results[run] = str(exc)

        threads = [threading.Thread(target=commit, args=(f"r{round_}{side}",)) for side in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        outcomes.append((results[f"r{round_}a"], results[f"r{round_}b"]))
    return outcomes


@pytest.mark.parametrize("where", ["local", "s3"])
def test_twenty_racing_commit_pairs_each_commit_once(where, s3_server, tmp_path):
    if where == "s3":
        import boto3

        bucket = f"race-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        uri = f"s3://{bucket}/table"
    else:
        uri = str(tmp_path / "table")
    outcomes = _race(uri, 20)
    for number, (a, b) in enumerate(outcomes, start=1):
        assert sorted([a == "committed", b == "committed"]) == [False, True], (a, b)
        loser = a if a != "committed" else b
        winner = f"r{number - 1}{'b' if a != 'committed' else 'a'}"
        assert (
            f"version {number} was committed by run {winner}" in loser
            and "running the same command again" in loser
        )
    table = TagTable(uri)
    assert table.versions() == list(range(1, 21)) and table.current().version == 20


def _images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            folder / f"{seed}_{i:03d}.png"
        )


def _tag(inputs: list[str], output: str, model: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [
        "tag",
        *sum((["-i", i] for i in inputs), []),
        "-o",
        output,
        "-m",
        str(model),
        "-q",
        "--rows-per-part",
        "8",
    ]
    return subprocess.Popen(
        [*TAGPIPE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _overlapping_pair(small: list[str], large: list[str], output: str, model: Path, attempts: int = 6):
    """Start both runs at once until they overlap (both work from the same version)."""
    for _ in range(attempts):
        base = TagTable(output).current()
        runs = {"small": _tag(small, output, model), "large": _tag(large, output, model)}
        done = {name: (proc.wait(timeout=600), *proc.communicate()) for name, proc in runs.items()}
        refused = [
            name for name, (code, _, err) in done.items() if code == 2 and "was committed by run" in err
        ]
        if refused:
            return base, done, refused[0]
        assert all(code == 0 for code, _, _ in done.values()), done  # ran one after the other: try again
    pytest.fail("the two runs never overlapped")


def _overlap_and_recover(output: str, folders: list[str], model: Path) -> None:
    small, large = folders[:1], folders
    base, done, loser = _overlapping_pair(small, large, output, model)
    winner = "large" if loser == "small" else "small"
    code, out, err = done[winner]
    assert code == 0, err[-2000:]
    winner_run = re.search(r"^run (\S+) ", out, re.M).group(1)
    message = done[loser][2]
    expected_version = (base.version if base else 0) + 1
    assert f"version {expected_version} was committed by run {winner_run}" in message
    assert "nothing of this run is lost" in message and "Traceback" not in message
    table = TagTable(output)
    assert table.current().version == expected_version and table.current().run_id == winner_run
    rows_after_win = read_current(output).num_rows
    assert rows_after_win == len(_listing(small if winner == "small" else large))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    inputs = small if loser == "small" else large
    args = [
        "tag",
        *sum((["-i", i] for i in inputs), []),
        "-o",
        output,
        "-m",
        str(model),
        "-q",
        "--rows-per-part",
        "8",
        "--max-delete-fraction",
        "1",
    ]
    rerun = subprocess.run([*TAGPIPE, *args], capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "no image tagged" in rerun.stdout or "(no change)" in rerun.stdout, (
        rerun.stdout
    )  # its parts were reused
    final = read_current(output)
    assert sorted(final.column("uri").to_pylist()) == sorted(
        _listing(inputs)
    )  # every row of the refused run's inputs
    if loser == "large":  # its inputs hold the winner's: every row of both
        assert final.num_rows == len(_listing(large))
    print(
        f"pair {output}: {winner} committed version {expected_version}, {loser} refused; "
        f"rerun -> {final.num_rows} rows"
    )


_LISTED: dict[str, list[str]] = {}


def _listing(inputs: list[str]) -> list[str]:
    return [uri for folder in inputs for uri in _LISTED[folder]]


@pytest.mark.slow  # about 30 s a pair; the racing-commit test above covers the mechanism in every run
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_real_runs_at_once(where, s3_server, demo_bundle, tmp_path):
    rounds = int(os.environ.get("CONCURRENT_PAIRS", "1"))
    folders = []
    for name, count in (("x", 24), ("y", 8)):
        _images(tmp_path / name, count, seed=ord(name))
        folder = str(tmp_path / name)
        folders.append(folder)
        _LISTED[folder] = sorted(str(p) for p in (tmp_path / name).iterdir())
    if where == "s3":
        import boto3

        bucket = f"runs-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        output = f"s3://{bucket}/tags"
    else:
        output = str(tmp_path / "tags")
    for round_ in range(rounds):  # each pair races for the first version of a new table
        _overlap_and_recover(f"{output}/round{round_:02d}", folders, demo_bundle)


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.parametrize("where", ["local", "s3"])
def test_twenty_overlapping_pairs_of_real_runs(where, s3_server, demo_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("CONCURRENT_PAIRS", os.environ.get("CONCURRENT_PAIRS", "20"))
    test_two_real_runs_at_once(where, s3_server, demo_bundle, tmp_path)


def test_a_base_older_than_the_newest_version_never_commits(tmp_path):
    """vacuum deletes old version records; a run that worked from one of them must not
    create its successor again (it would be missing every newer version's rows)."""
    table = TagTable(str(tmp_path / "t"))
    base = None
    for version in range(1, 5):
        base = table.commit(base, _snapshot(version, f"r{version}"))
    first = table.snapshot(1)
    assert table.vacuum(keep_versions=2, grace_hours=0)["versions_deleted"] == [1, 2]
    with pytest.raises(CommitConflict):
        table.commit(first, _snapshot(2, "stale"))
    assert table.current().version == 4 and table.current().run_id == "r4"
    assert json.loads((tmp_path / "t" / "_current.json").read_text())["version"] == 4


def test_reuse_reaches_back_to_the_version_before_the_base(tmp_path):
    """A run that lost a race to version N started from N-1: its parts, however old,
    are newer than N-1's commit, so its rerun reuses them all."""
    from datetime import datetime

    from pipeline.job.tag_job import _reuse_since

    table = TagTable(str(tmp_path / "t"))
    early = Snapshot(
        version=1,
        files=(),
        rows=0,
        model_sha256="m",
        inference_key="i",
        rules_key="r",
        run_id="a",
        committed_at="2026-12-01T00:00:00+00:00",
    )
    late = Snapshot(
        version=2,
        files=(),
        rows=0,
        model_sha256="m",
        inference_key="i",
        rules_key="r",
        run_id="b",
        committed_at="2026-12-01T09:00:00+00:00",
    )
    table.commit(None, early)
    table.commit(early, late)
    assert _reuse_since(table, late) == datetime.fromisoformat(early.committed_at).timestamp() - 3600
    assert _reuse_since(table, None) == 0.0
