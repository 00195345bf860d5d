"""Progress a person can watch: a bar with rate and ETA on a terminal, a log line every
`interval` seconds elsewhere (a Ray job log, a pod log, a file).

Progress is a plain object the job code updates (done, errors); it decides how to show
itself. The bar is rich's (typer already depends on rich), redrawn twice a second by
rich's own thread, so it moves while the job waits for its first batch. Off a terminal,
a daemon thread writes one line every `interval` seconds to the `pipeline.core.progress`
logger, so --quiet and --log-format json apply to it like to any other line.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline.core.words import counted

log = logging.getLogger("pipeline.core.progress")
DEFAULT_INTERVAL = 30.0  # seconds between progress lines off a terminal


@dataclass(frozen=True)
class ProgressSettings:
    enabled: bool = True
    interval: float = DEFAULT_INTERVAL  # seconds between lines off a terminal
    terminal: bool | None = None  # None: ask stderr


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """`what` done out of `total` `unit`s, with errors so far. Use as a context manager."""

    def __init__(
        self, what: str, total: int, unit: str = "images", settings: ProgressSettings = ProgressSettings()
    ):
        self.what, self.total, self.unit, self.settings = what, total, unit, settings
        self.done = 0
        self.errors = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar: Any = None  # rich's Progress, on a terminal
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if not self.settings.enabled or self.total <= 0:
            return self
        terminal = self.settings.terminal if self.settings.terminal is not None else sys.stderr.isatty()
        if terminal:
            self._start_bar()
        else:
            self._thread = threading.Thread(
                target=self._log_every_interval, name=f"progress-{self.what}", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._bar is not None:  # the last frame shows the final figures
            self._bar.update(
                self._task,
                completed=self.done,
                errors=counted(self.errors, "errors"),
                rate=f"{self.rate():.1f} {self.unit}/s",
            )
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            if exc_info[0] is None:
                log.info("%s", self.line())
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def update(self, done: int = 0, errors: int = 0) -> None:
        with self._lock:
            self.done += done
            self.errors += errors
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=self.done,
                errors=counted(self.errors, "errors"),
                rate=f"{self.rate():.1f} {self.unit}/s",
            )

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def eta(self) -> float | None:
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 and self.done else None

    def line(self) -> str:
        share = 100.0 * self.done / self.total if self.total else 100.0
        errors = f", {counted(self.errors, 'errors')}" if self.errors else ""
        return (
            f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({share:.1f}%){errors}, "
            f"{self.rate():.1f} {self.unit}/s, ETA {eta_text(self.eta())}"
        )

    def _log_every_interval(self) -> None:
        while not self._stop.wait(self.settings.interval):
            log.info("%s", self.line())

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[errors]}"),
        )
        self._bar = Bar(*columns, console=Console(stderr=True), refresh_per_second=2, transient=False)
        self._task = self._bar.add_task(self.what, total=self.total, errors=counted(0, "errors"), rate="")
        self._bar.start()
        self._ticker = threading.Thread(target=self._refresh_rate, name=f"progress-{self.what}", daemon=True)
        self._ticker.start()

    def _refresh_rate(self) -> None:
        while not self._stop.wait(0.5):
            bar = self._bar
            if bar is not None:
                bar.update(self._task, rate=f"{self.rate():.1f} {self.unit}/s")
