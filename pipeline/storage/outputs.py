"""The mark on every folder tagpipe writes into, so that no listing takes tagpipe's own
outputs for inputs.

An output that lies inside an input (a nightly's dedup and split folders under the images
it tags, `report -o photos/report.html`) would otherwise come back the next run as
`not_an_image` rows. Every writer marks what it writes with `mark_output`: a small JSON
file, OUTPUT_MARKER, in the output's folder, saying what of that folder is tagpipe's:

- the whole folder (dedup, split and audit outputs: folders of tagpipe's own files);
- named entries (a tag table's data/, _versions/, ... at a root that may hold images too;
  a report or a JSONL export, one file in a folder of the user's);
- files of an extension under the folder (caption files exported beside the images).

The listing (manifest.py) finds markers as it lists, and leaves out what they name,
counted as `tagpipe_output`. The table's guard file marks its table the same way, for
tables written before the marker existed. Markers are merged, never narrowed: a second
output in a marked folder adds its own names.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.storage.filesystem import filesystem_for, read_bytes, write_atomic

log = logging.getLogger(__name__)

OUTPUT_MARKER = "_tagpipe_output.json"
# A tag table's guard (pipeline/table/tag_table.py): not Parquet, so plain folder reads fail
GUARD_FILE = "NOT_DATA-read_this_table_through__current.json.parquet"
# What a tag table writes at its root (the names of pipeline/table/tag_table.py and labels.py)
TABLE_ENTRIES = (
    "data",
    "_versions",
    "_runs",
    "_manifests",
    "_calibration",
    "_labels",
    "_summaries",
    "_leases",
    "_current.json",
    GUARD_FILE,
)
MARKER_NAMES = frozenset({OUTPUT_MARKER, GUARD_FILE})


@dataclass(frozen=True)
class Owned:
    """What one marker says is tagpipe's, as paths like the listing's (no protocol).
    whole: the marker's folder and everything under it; names: entries of the folder
    (a file, or a folder and all under it); extensions: files of these extensions under it."""

    folder: str
    whole: bool = False
    names: frozenset[str] = frozenset()
    extensions: frozenset[str] = frozenset()

    def covers(self, path: str) -> bool:
        """Whether a file (its listing path) is tagpipe's by this marker."""
        if not path.startswith(self.folder + "/"):
            return False
        relative = path[len(self.folder) + 1 :]
        if self.whole or relative.split("/", 1)[0] in self.names:
            return True
        return posixpath.splitext(relative)[1].lower().lstrip(".") in self.extensions

    def covers_skipped(self, folder: str, extension: str) -> bool:
        """Whether every file of this extension directly in `folder` is tagpipe's by this
        marker (skipped files are counted by folder and extension, not kept one by one)."""
        inside = folder.startswith(self.folder + "/")
        if not inside and folder != self.folder:
            return False
        if self.whole or extension in self.extensions:
            return True
        return inside and folder[len(self.folder) + 1 :].split("/", 1)[0] in self.names


def listing_path_of(uri: str) -> str:
    """A listed uri as the listing's paths name it (no protocol)."""
    return uri.split("://", 1)[1] if "://" in uri else uri


def marked_rows(uris: pa.ChunkedArray, marked: list[Owned]) -> pa.Array:
    """True where a listed uri is tagpipe's by one of the markers (Owned.covers, on
    Arrow arrays: a listing may hold millions of rows and few markers)."""
    paths = pc.replace_substring_regex(uris, r"^[A-Za-z][A-Za-z0-9+.-]*://", "")
    lower = pc.utf8_lower(paths)
    none = pa.array(np.zeros(len(uris), dtype=bool))
    out = none
    for mark in marked:
        inside = pc.starts_with(paths, mark.folder + "/")
        hit = inside if mark.whole else none
        for name in sorted(mark.names):
            entry = f"{mark.folder}/{name}"
            hit = pc.or_(hit, pc.or_(pc.equal(paths, entry), pc.starts_with(paths, entry + "/")))
        if mark.extensions:
            wanted = "|".join(re.escape(e) for e in sorted(mark.extensions))
            hit = pc.or_(hit, pc.and_(inside, pc.match_substring_regex(lower, rf"\.({wanted})$")))
        out = pc.or_(out, hit)
    return out


def is_marker(path: str) -> bool:
    return posixpath.basename(path) in MARKER_NAMES


def mark_output(
    folder: str,
    kind: str,
    storage_options: dict | None = None,
    names: tuple[str, ...] | None = None,
    extensions: tuple[str, ...] = (),
    writes: tuple[str, ...] = (),
) -> None:
    """Mark `folder` as holding tagpipe's output `kind`: all of it (names None and no
    extensions), or only these entries, or files of these extensions under it. Written
    once; a folder marked already keeps what it had and gains what this adds.
    writes: the entries a whole-folder output writes at its root; a folder that holds
    anything else when first marked (an output pointed at a folder of images) is marked
    for those entries only, so its other files stay inputs."""
    uri = posixpath.join(folder.rstrip("/"), OUTPUT_MARKER)
    record = _read_record(uri, storage_options)
    if names is None and not extensions and not record and _holds_others(folder, writes, storage_options):
        names = writes
    wanted = {
        "tagpipe_output": sorted({*record.get("tagpipe_output", []), kind}),
        "whole": bool(record.get("whole")) or (names is None and not extensions),
        "names": sorted({*record.get("names", []), *(names or ()), OUTPUT_MARKER}),
        "extensions": sorted({*record.get("extensions", []), *(e.lower().lstrip(".") for e in extensions)}),
    }
    if wanted != record:
        write_atomic(
            uri, json.dumps(wanted, indent=1).encode(), storage_options=_options(uri, storage_options)
        )


def mark_file(uri: str, kind: str, storage_options: dict | None = None) -> None:
    """Mark one output file (a report, a JSONL export) in its folder, unless the marker
    one folder up names it already (a nightly's report in its table's _runs/)."""
    folder, name = posixpath.split(uri.rstrip("/"))
    if "://" not in uri:
        folder = posixpath.dirname(_absolute(uri))
    above = posixpath.dirname(folder)
    record = _read_record(posixpath.join(above, OUTPUT_MARKER), storage_options)
    fs = filesystem_for(folder, _options(folder, storage_options))[0]
    if record and _owned(fs._strip_protocol(above), record).covers(f"{fs._strip_protocol(folder)}/{name}"):
        return
    mark_output(folder, kind, storage_options, names=(name,))


def _holds_others(folder: str, writes: tuple[str, ...], storage_options: dict | None) -> bool:
    """Whether `folder` holds an entry other than `writes`, the marker and hidden files."""
    fs, path = filesystem_for(folder, _options(folder, storage_options))
    try:
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    mine = {*writes, OUTPUT_MARKER}
    return any(
        not (n := posixpath.basename(e.rstrip("/"))).startswith(".") and n not in mine for e in entries
    )


def owned(marker: str, storage_options: dict | None = None) -> Owned:
    """What the marker at `marker` (a listed file's uri) says is tagpipe's."""
    fs, _path = filesystem_for(marker, storage_options)
    folder = posixpath.dirname(fs._strip_protocol(marker))
    if posixpath.basename(marker) == GUARD_FILE:  # a tag table, guarded before the marker existed
        return Owned(folder, names=frozenset(TABLE_ENTRIES))
    record = _read_record(marker, storage_options)
    if not record:
        log.warning("%s: not a tagpipe output marker that can be read; only it is left out", marker)
    return _owned(folder, record)


def _owned(folder: str, record: dict) -> Owned:
    return Owned(
        folder,
        whole=bool(record.get("whole")),
        names=frozenset({*record.get("names", []), OUTPUT_MARKER}),
        extensions=frozenset(record.get("extensions", [])),
    )


def _read_record(uri: str, storage_options: dict | None) -> dict:
    try:
        record = json.loads(read_bytes(uri, _options(uri, storage_options)))
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as exc:
        log.debug("%s: unreadable marker (%s)", uri, exc)
        return {}
    return record if isinstance(record, dict) else {}


def _options(uri: str, storage_options: dict | None) -> dict | None:
    return storage_options if "://" in uri else None


def _absolute(path: str) -> str:
    import os

    return os.path.abspath(path)
