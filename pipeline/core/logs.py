"""How tagpipe talks: a log level, text or JSON lines, and Ray's noise kept out.

Three levels: quiet (warnings and errors, and each command's result), the default
(tagpipe's own progress and steps), verbose (also Ray's and the libraries' INFO lines).
`--log-format json` makes every line one JSON object (time, level, logger, message),
and each command's result a JSON object too, for log pipelines.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


class Verbosity(enum.IntEnum):
    QUIET = -1
    NORMAL = 0
    VERBOSE = 1


# Ray loggers whose lines say nothing a tagpipe user can act on, and why each is quiet.
RAY_NOISE = {
    # "Token authentication is enabled for this Ray cluster": the local Ray tagpipe
    # starts keeps Ray's default (on); nothing to do about it.
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # "Progress bars disabled": tagpipe draws its own (pipeline/core/progress.py).
    "ray.data._internal.progress": logging.ERROR,
    # Ray Data's per-dataset "Starting execution"/"execution finished" lines.
    "ray.data._internal.execution.streaming_executor": logging.WARNING,
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


_state: dict[str, Any] = {"verbosity": Verbosity.NORMAL, "format": LogFormat.TEXT}


def configure(verbosity: Verbosity = Verbosity.NORMAL, fmt: LogFormat = LogFormat.TEXT) -> None:
    """Set up logging for one command run (replacing what an earlier call set)."""
    _state.update(verbosity=verbosity, format=fmt)
    handler = logging.StreamHandler(sys.stderr)
    if fmt is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root_level = logging.INFO if verbosity is Verbosity.VERBOSE else logging.WARNING
    logging.basicConfig(level=root_level, handlers=[handler], force=True)
    if fmt is LogFormat.JSON or not sys.stderr.isatty():
        # Ray wraps each line a worker prints (a traceback on Ctrl-C, a library's warning)
        # in colour codes; in a log file or a pipe those are raw escapes. Read at each line.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    logging.getLogger("pipeline").setLevel(logging.WARNING if verbosity is Verbosity.QUIET else logging.INFO)
    if verbosity is not Verbosity.VERBOSE:
        for name, level in RAY_NOISE.items():
            logging.getLogger(name).setLevel(level)


def ray_logging_level() -> int:
    """The level for ray.init: Ray's own INFO lines only when verbose."""
    verbosity = _state["verbosity"]
    levels = {Verbosity.VERBOSE: logging.INFO, Verbosity.QUIET: logging.ERROR}
    return levels.get(verbosity, logging.WARNING)


def json_output() -> bool:
    return _state["format"] is LogFormat.JSON
