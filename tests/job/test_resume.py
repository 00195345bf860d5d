"""Kill the driver with SIGKILL mid-run, rerun the same command: every input exactly
once, with the same content as an uninterrupted run. (A kill during a nightly update of
a committed table: tests/job/test_nightly.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.core.errors import TagpipeError
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.table.tag_table import read_current

VOLATILE = {"run_id", "tagged_at"}


def _rows(table) -> dict[str, dict]:
    rows = table.to_pylist()
    by_uri = {r["uri"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}
    assert len(by_uri) == len(rows), "duplicate rows"
    return by_uri


def staged_parts(path) -> list:
    """Parts written under data/ (committed or not)."""
    return sorted(path.glob("data/*/part-*.parquet"))


def test_sigkill_mid_run_then_rerun_gives_the_clean_result(ray_session, demo_bundle, demo_corpus, tmp_path):
    out = tmp_path / "killed"
    command = [
        sys.executable,
        str(Path(__file__).parents[2] / "jobs" / "tag.py"),
        "-i",
        str(demo_corpus / "images"),
        "-o",
        str(out),
        "-m",
        str(demo_bundle),
        "--rows-per-part",
        "8",
        "--batch-size",
        "4",
        "--decode-batch-size",
        "4",
        "--no-progress",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not staged_parts(out):
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no part committed in time"
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    total = len(list((demo_corpus / "images").rglob("*.*")))
    written = _rows(pads.dataset([str(p) for p in staged_parts(out)], format="parquet").to_table())
    assert 0 < len(written) < total, "the kill must land mid-run"
    with pytest.raises(TagpipeError, match="no committed table"):  # readers see no half table
        read_current(str(out))

    # the rerun in this process, on the session's Ray (the kill, not the rerun's process, is
    # under test): parts are written by Ray tasks, and one may finish after the driver was
    # killed (its write is atomic): the rerun reuses every part on disk when it plans
    settings = dict(model=str(demo_bundle), rows_per_part=8, batch_size=4, decode_batch_size=4)
    rerun = run_tag_job(make_tag_config(inputs=[str(demo_corpus / "images")], output=str(out), **settings))
    assert len(written) <= rerun.reused < total and rerun.version == 1

    clean_out = tmp_path / "clean"
    run_tag_job(make_tag_config(inputs=[str(demo_corpus / "images")], output=str(clean_out), **settings))
    resumed, clean = _rows(read_current(str(out))), _rows(read_current(str(clean_out)))
    assert sorted(resumed) == sorted(clean) and len(clean) == total
    assert resumed == clean  # same tags, scores, logits, hashes, errors, row for row
