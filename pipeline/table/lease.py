"""Advisory leases: a run working on a table says so, so that another run that starts
on the same table can warn at its start instead of both doing all the work unawares.

A lease is `_leases/<run_id>.json` in the table (who, where, since when, and a
heartbeat rewritten every HEARTBEAT_SECONDS by a daemon thread while the run works). A
lease whose heartbeat is older than TIMEOUT_SECONDS is stale: its run crashed or was
killed, and the lease outlives it only by that timeout (the next run removes it); on the
same machine, a lease whose process is gone is stale at once.

A lease never blocks anything and never decides anything: the exclusive commit of the
version record (tag_table.py) stays the only arbiter of which run's work becomes the
next version. Clocks: heartbeats are compared with this machine's clock, so two machines
more than TIMEOUT_SECONDS apart may miss (or invent) a warning, never a conflict.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from pipeline.storage.filesystem import retry, write_atomic

log = logging.getLogger(__name__)

LEASES_DIR = "_leases"
HEARTBEAT_SECONDS = 15.0
TIMEOUT_SECONDS = 90.0  # six missed heartbeats: a run that stopped beating has stopped


@dataclass(frozen=True)
class Lease:
    run_id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float

    def age(self, now: float) -> float:
        return now - self.heartbeat_at

    def text(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))
        return (
            f"run {self.run_id} (host {self.host}, pid {self.pid}, started {started}, "
            f"last heartbeat {self.age(now):.0f} s ago)"
        )


def live_leases(table, run_id: str = "", timeout: float = TIMEOUT_SECONDS) -> list[Lease]:
    """Other runs' leases on `table` (a TagTable) with a heartbeat within `timeout`;
    stale ones are removed as they are found."""
    directory = table.join(LEASES_DIR)
    table.fs.invalidate_cache(directory)
    try:
        names = retry(lambda: table.fs.ls(directory, detail=False), what=directory)
    except FileNotFoundError:
        return []
    now, live = time.time(), []
    for path in sorted(names):
        lease = _read(table, path)
        if lease is None or lease.run_id == run_id:
            continue
        if lease.age(now) <= timeout and not _ended_here(lease):
            live.append(lease)
        else:
            _remove(table, path)
    return live


def warn_if_active(
    table, run_id: str = "", known: Collection[str] = (), timeout: float = TIMEOUT_SECONDS
) -> set[str]:
    """Warn about every other run active on the table that is not in `known` (warned of
    already); the run ids of all those active."""
    leases = live_leases(table, run_id, timeout)
    now = time.time()
    for lease in leases:
        if lease.run_id in known:
            continue
        log.warning(
            "%s: another run is working on this table: %s. Both runs do the work; only one commits "
            "(the other is refused, keeps its parts, and a rerun commits on top): wait for it, or let "
            "both finish",
            table.uri,
            lease.text(now),
        )
    return {lease.run_id for lease in leases}


@contextlib.contextmanager
def held(table, run_id: str, heartbeat: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """Hold a lease on `table` for `run_id` while the block runs: written now, rewritten
    every `heartbeat` seconds, removed at the end (a killed run's goes stale instead)."""
    relative = posixpath.join(LEASES_DIR, f"{run_id}.json")
    started = time.time()
    _beat(table, relative, run_id, started)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat):
            try:
                _beat(table, relative, run_id, started)
            except Exception as exc:  # a lease is advice: a failed beat never fails the run
                log.debug("lease heartbeat on %s failed: %s", table.uri, exc)

    thread = threading.Thread(target=beat, name=f"lease-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=heartbeat + 5)
        _remove(table, table.join(relative))


def _ended_here(lease: Lease) -> bool:
    """A lease of this machine whose process is gone: a killed run, stale at once (the
    usual rerun after a crash need not wait out the timeout)."""
    if lease.host != socket.gethostname():
        return False
    try:
        os.kill(lease.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, but another user's
        return False
    return False


def _beat(table, relative: str, run_id: str, started: float) -> None:
    record = {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": started,
        "heartbeat_at": time.time(),
    }
    write_atomic(table.full_uri(relative), json.dumps(record).encode(), storage_options=table.storage_options)


def _read(table, path: str) -> Lease | None:
    try:
        record = json.loads(retry(lambda: table.fs.cat_file(path), what=path))
        return Lease(**{k: record[k] for k in ("run_id", "host", "pid", "started_at", "heartbeat_at")})
    except FileNotFoundError:
        return None  # its run just ended
    except (ValueError, KeyError, TypeError):
        log.debug("%s: not a lease record; ignored", path)
        return None


def _remove(table, path: str) -> None:
    with contextlib.suppress(OSError):  # gone already, or not ours to remove: it goes stale
        table.fs.rm(path)
