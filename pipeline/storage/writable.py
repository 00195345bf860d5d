"""Can a command write where it was told to? Asked before any work (before listing,
before Ray starts), so a read-only folder, a file where a folder should be, or a parent
that cannot be created is one `error:` line naming the path, not a traceback after the
work is done. Local paths only: an object store answers for itself, and its refusals
already become one line (filesystem.storage_error_text).

os.access answers for the user running tagpipe: root may write into a folder whose mode
says read-only, and then it really can, so that is not refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.core.errors import TagpipeError

FOLDER, FILE = "folder", "file"


def check_writable(uri: str, option: str, want: str = FOLDER) -> None:
    """Refuse (TagpipeError, one line) an output `uri` that cannot be written as `want`
    (a folder tagpipe writes files into, or one file it replaces atomically)."""
    if "://" in uri and not uri.startswith("file://"):
        return
    path = Path(uri.removeprefix("file://")).expanduser()
    named = f"{option} {uri}"
    if path.exists():
        _check_existing(path, named, want)
        return
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise TagpipeError(f"{named}: {parent} is a file, not a folder, so nothing can be created under it")
    if not _can_write(parent):
        raise TagpipeError(f"{named}: cannot create it: {parent} is read-only for this user")


def _check_existing(path: Path, named: str, want: str) -> None:
    if want == FOLDER and not path.is_dir():
        raise TagpipeError(f"{named} is a file, not a folder: give a folder (a new one, or its own output)")
    if want == FILE and path.is_dir():
        raise TagpipeError(f"{named} is a folder, not a file: give the file's name")
    if want == FOLDER and not _can_write(path):
        raise TagpipeError(f"{named} is a read-only folder for this user")
    if want == FILE and not _can_write(path.parent):  # replaced by a rename in its folder
        raise TagpipeError(f"{named}: its folder {path.parent} is read-only for this user")


def local_error_text(exc: BaseException) -> str | None:
    """One line for a local filesystem failure that names its path (permission denied, a
    file where a folder was expected, a full disk) that slipped past the checks made
    before the work; None for anything else. The last line of defence: each command checks
    its paths first, so this is for what changed under it while it ran."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.filename and seen.strerror:
            return f"{seen.filename}: {seen.strerror.lower()}"
        seen = seen.__cause__ or seen.__context__
    return None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _can_write(folder: Path) -> bool:
    """Files can be created (and renamed into place) in this folder."""
    return os.access(folder, os.W_OK | os.X_OK)
