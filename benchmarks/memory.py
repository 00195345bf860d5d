"""Driver memory for the benchmarks: the resident size now, and its peak while a block runs.

The process's lifetime peak (ru_maxrss) is often set earlier, by building a benchmark's
inputs, and hides what the measured step itself takes; PeakSampler samples the resident
size every 5 ms while the block runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path


def in_subprocess(script: str, *args: str) -> dict:
    """`python SCRIPT --one ARGS...` in a fresh process, so each case's peak is its own;
    the case prints its result as JSON on its last line."""
    out = subprocess.run([sys.executable, script, "--one", *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def arrow_mib() -> float:
    """What Arrow's memory pool has allocated now (its buffers; not numpy's or Python's)."""
    import pyarrow as pa

    return pa.total_allocated_bytes() / 2**20


class PeakSampler:
    """with PeakSampler() as s: ...; s.peak is the highest resident size (MiB) seen, and
    s.arrow_peak the most Arrow's pool held at once (what of the peak is Arrow buffers)."""

    def __enter__(self):
        self.peak, self._stop = rss_mib(), threading.Event()
        self.arrow_peak = arrow_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mib())
            self.arrow_peak = max(self.arrow_peak, arrow_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())
