"""No part is ever written over: a part is created exclusively, locally as on S3, so a
run that loses the commit race cannot replace a part the winner's version names. A run
that starts while another works on the same table says so (an advisory lease with a
heartbeat); the lease never blocks, and the commit stays the only arbiter."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.table import lease
from pipeline.table.tag_table import CommitConflict, Snapshot, TagTable, read_current


def _rows(run: str) -> pa.Table:
    return pa.table({"uri": ["/img/a.png", "/img/b.png"], "run_id": [run, run]})


def _snapshot(version: int, run: str, files: list[str]) -> Snapshot:
    return Snapshot(version, tuple(files), 2 * len(files), "m", "i", "r", run, "2026-12-01T00:00:00+00:00")


def _state(root: Path, files: tuple[str, ...]) -> dict[str, tuple[bytes, int, int]]:
    """Each part's bytes, mtime (ns) and inode: what a replace would change."""
    return {
        f: ((root / f).read_bytes(), (root / f).stat().st_mtime_ns, (root / f).stat().st_ino) for f in files
    }


def _run(uri: str, run: str, names: list[str], start: threading.Barrier, after: threading.Event | None):
    """One run: write its parts (after `after` is set, when given), then commit them."""
    table = TagTable(uri)
    base = table.current()
    start.wait()
    if after is not None:
        after.wait(30)
    for name in names:
        time.sleep(random.random() / 1000)
        table.write_part(name, _rows(run))
    return table.commit(base, _snapshot((base.version if base else 0) + 1, run, names))


def test_twenty_racing_pairs_on_local_disk_never_replace_a_committed_part(tmp_path):
    """Even pairs: the loser writes its parts only after the winner committed (the case
    that replaced a committed part); odd pairs: both write and commit at once."""
    uri, root = str(tmp_path / "table"), tmp_path / "table"
    for pair in range(20):
        names = [f"data/k/part-{pair:02d}-{i}.parquet" for i in range(4)]
        start, committed = threading.Barrier(2), threading.Event()
        outcome: dict[str, object] = {}

        def side(run, after, outcome=outcome, names=names, start=start, committed=committed):
            try:
                snapshot = _run(uri, run, names, start, after)
                outcome["state"] = _state(root, snapshot.files)  # at once, before the other run goes on
                outcome["winner"] = run
                committed.set()
            except CommitConflict:
                outcome.setdefault("refused", run)
                committed.set()

        late = committed if pair % 2 == 0 else None
        threads = [
            threading.Thread(target=side, args=(f"p{pair}-a", None)),
            threading.Thread(target=side, args=(f"p{pair}-b", late)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert "winner" in outcome and "refused" in outcome, outcome
        current = TagTable(uri).current()
        assert current.version == pair + 1 and current.run_id == outcome["winner"]
        assert _state(root, current.files) == outcome["state"], f"pair {pair}: a committed part was replaced"
        if late is not None:  # the loser came after: every row is the winner's
            assert set(read_current(uri, columns=["run_id"]).column("run_id").to_pylist()[-8:]) == {
                outcome["winner"]
            }
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]  # no temp file left by a refused write


def test_an_existing_part_is_used_as_it_is(tmp_path):
    table = TagTable(str(tmp_path / "t"))
    table.write_part("data/k/part-x.parquet", _rows("first"))
    before = _state(tmp_path / "t", ("data/k/part-x.parquet",))
    table.write_part("data/k/part-x.parquet", _rows("second"))
    assert _state(tmp_path / "t", ("data/k/part-x.parquet",)) == before


def _lease(root: Path, run: str, heartbeat_age: float) -> None:
    now = time.time()
    record = {"run_id": run, "host": "elsewhere", "pid": 4242, "started_at": now - 600}
    record["heartbeat_at"] = now - heartbeat_age
    (root / lease.LEASES_DIR).mkdir(parents=True, exist_ok=True)
    (root / lease.LEASES_DIR / f"{run}.json").write_text(json.dumps(record))


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "another run" in r.getMessage()
    ]


def test_a_live_lease_warns_and_a_stale_one_does_not(tmp_path, caplog):
    root = tmp_path / "t"
    table = TagTable(str(root))
    _lease(root, "live-run", heartbeat_age=5)
    _lease(root, "crashed-run", heartbeat_age=lease.TIMEOUT_SECONDS + 30)
    with caplog.at_level(logging.WARNING, logger="pipeline.table.lease"):
        active = lease.warn_if_active(table, "me")
    assert active == {"live-run"}
    (message,) = _warnings(caplog)
    assert "run live-run (host elsewhere, pid 4242" in message and "only one commits" in message
    assert not (root / lease.LEASES_DIR / "crashed-run.json").exists()  # a stale lease goes, unread again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.table.lease"):
        assert lease.warn_if_active(table, "me", known={"live-run"}) == {"live-run"}
    assert not _warnings(caplog)  # said once


def test_a_lease_of_a_process_gone_from_this_machine_is_stale_at_once(tmp_path, caplog):
    root = tmp_path / "t"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _lease(root, "killed-run", heartbeat_age=1)
    record = json.loads((root / lease.LEASES_DIR / "killed-run.json").read_text())
    record.update(host=socket.gethostname(), pid=gone.pid)
    (root / lease.LEASES_DIR / "killed-run.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="pipeline.table.lease"):
        assert lease.warn_if_active(TagTable(str(root)), "me") == set()
    assert not _warnings(caplog)
    record.update(pid=os.getpid())  # a live process of this machine: its run is at work
    (root / lease.LEASES_DIR / "killed-run.json").write_text(json.dumps(record))
    assert lease.warn_if_active(TagTable(str(root)), "me") == {"killed-run"}


def test_a_held_lease_beats_and_goes_at_the_end(tmp_path):
    root = tmp_path / "t"
    table = TagTable(str(root))
    with lease.held(table, "mine", heartbeat=0.05):
        first = json.loads((root / lease.LEASES_DIR / "mine.json").read_text())
        time.sleep(0.3)
        later = json.loads((root / lease.LEASES_DIR / "mine.json").read_text())
        assert later["heartbeat_at"] > first["heartbeat_at"] and later["started_at"] == first["started_at"]
        assert lease.live_leases(table, "other") and not lease.live_leases(table, "mine")
    assert not (root / lease.LEASES_DIR / "mine.json").exists()
    with pytest.raises(RuntimeError), lease.held(table, "failing", heartbeat=0.05):
        raise RuntimeError("the run failed")
    assert not (root / lease.LEASES_DIR / "failing.json").exists()  # released whatever happened


def test_a_tag_run_says_at_start_that_another_run_is_active(
    ray_session, demo_bundle, demo_corpus, tmp_path, caplog
):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((demo_corpus / "images" / "red").iterdir())[:3]:
        shutil.copy(path, images / path.name)
    out = tmp_path / "tags"
    cfg = make_tag_config(inputs=[str(images)], output=str(out), model=str(demo_bundle))
    run_tag_job(cfg)
    assert not list((out / lease.LEASES_DIR).iterdir())  # released after the run
    _lease(out, "other-run", heartbeat_age=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.table.lease"):
        summary = run_tag_job(cfg, dry_run=True)
    assert summary.dry_run and any("run other-run" in m for m in _warnings(caplog))
    _lease(out, "other-run", heartbeat_age=lease.TIMEOUT_SECONDS * 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.table.lease"):
        again = run_tag_job(cfg)
    assert again.change == "no change" and not _warnings(caplog)  # a crashed run's lease, timed out
