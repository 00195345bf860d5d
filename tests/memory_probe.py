"""Peak RSS of this process over a block of code, from the kernel's own high-water mark.

Writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS (Linux 4.0+), so
each block is measured on its own, in a process that lives on (a Ray worker)."""

from __future__ import annotations

import contextlib


def status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakGrowth:
    """bytes: the block's peak RSS less the RSS it started at."""

    bytes: int = 0


@contextlib.contextmanager
def peak_rss_growth():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    start = status_bytes("VmRSS")
    result = PeakGrowth()
    try:
        yield result
    finally:
        result.bytes = max(0, status_bytes("VmHWM") - start)
