"""What a path given as an input holds, told from the files tagpipe's own outputs carry,
so that the wrong kind of folder is one line naming what it is ("out/dedup is a dedup
output, not a tag table"), before any work, and never a KeyError from deep in a read or
a misleading "no such file".

Each output has files no other has: a tag table `_current.json`, dedup
`clusters.parquet`, split `splits.parquet`, audit `leaks.parquet`; a multi-model pass
writes one table per sub-folder. One listing of the folder's top level (and one check per
sub-folder) tells them apart: no walk of a folder of images.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from pipeline.core.errors import TagpipeError
from pipeline.storage.filesystem import filesystem_for, retry

MISSING, FILE, TAG_TABLE, TABLES = "missing", "file", "a tag table", "a folder of tag tables"
DEDUP, SPLIT, AUDIT = "a dedup output", "a split output", "an audit output"
IMAGES, PARQUET, OTHER = "a folder of images", "a folder of Parquet files", "a folder"
# The file only that output holds, at its top level (tag tables: tag_table.CURRENT).
MARKERS = {"_current.json": TAG_TABLE, "clusters.parquet": DEDUP, "splits.parquet": SPLIT}
MARKERS.update({"leaks.parquet": AUDIT, "audit.json": AUDIT})
IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif", "heic", "heif", "jxl", "jfif"}
)
SUBFOLDERS_CHECKED = 200  # sub-folders looked into for tables (a multi-model pass has a few)

# What each input takes, and how to make one.
WANTS = {
    "table": ({TAG_TABLE, PARQUET, FILE, OTHER}, "a tag table", "the folder `tagpipe tag -o` wrote"),
    "dedup": ({DEDUP, FILE}, "a dedup output", "the folder `tagpipe dedup -o` wrote (clusters.parquet)"),
    "split": ({SPLIT, FILE}, "a split output", "the folder `tagpipe split -o` wrote (splits.parquet)"),
    "side": ({TAG_TABLE, SPLIT, PARQUET, FILE, OTHER}, "a tag table or split output", "one of those"),
    "versioned": ({TAG_TABLE}, "a tag table", "the folder `tagpipe tag -o` wrote"),
}
NAMED_KINDS = (TAG_TABLE, DEDUP, SPLIT, AUDIT, TABLES, IMAGES)  # what tagpipe can name a folder as


@dataclass(frozen=True)
class Found:
    kind: str
    tables: tuple[str, ...] = ()  # TABLES: the sub-folders that are tag tables
    names: tuple[str, ...] = ()  # a folder's top-level names


def kind_of(uri: str, storage_options: dict | None = None) -> Found:
    """What uri holds, from its top level only."""
    fs, path = filesystem_for(uri, storage_options)
    path = path.rstrip("/") or path
    if not retry(lambda: fs.exists(path), what=uri):
        return Found(MISSING)
    if not retry(lambda: fs.isdir(path), what=uri):
        return Found(FILE)
    entries = retry(lambda: fs.ls(path, detail=True), what=uri)
    names = {posixpath.basename(e["name"].rstrip("/")): e for e in entries}
    listed = tuple(sorted(names))
    for marker, kind in MARKERS.items():
        if marker in names:
            return Found(kind, names=listed)
    folders = sorted(
        n for n, e in names.items() if e.get("type") == "directory" and not n.startswith(("_", "."))
    )[:SUBFOLDERS_CHECKED]
    tables = tuple(n for n in folders if fs.exists(posixpath.join(path, n, "_current.json")))
    if tables:
        return Found(TABLES, tables, listed)
    extensions = {posixpath.splitext(n)[1].lower().lstrip(".") for n in names}
    if "parquet" in extensions:
        return Found(PARQUET, names=listed)
    if extensions & IMAGE_EXTENSIONS:
        return Found(IMAGES, names=listed)
    return Found(OTHER, names=listed)


def expect(uri: str, want: str, option: str, storage_options: dict | None = None) -> Found:
    """Refuse (TagpipeError, one line) an input that is not what `option` takes:
    want is "table" (a tag table, or Parquet), "dedup", "split", or "side" (an audit side:
    a tag table, a split output, or Parquet/CSV)."""
    found = kind_of(uri, storage_options)
    accepted, wanted, how = WANTS[want]
    named = f"{option} {uri}".strip()
    if found.kind == OTHER and not found.names:
        raise TagpipeError(f"{named} is an empty folder, not {wanted}: give {how}")
    if found.kind == FILE and want in ("table", "side") and not _readable_file(uri, want):
        takes = "a Parquet file" if want == "table" else "a Parquet or CSV file"
        raise TagpipeError(f"{named} is not {takes}, nor a folder: give {how}")
    if found.kind in accepted:
        return found
    if found.kind == MISSING:
        raise TagpipeError(f"{named}: no such file or folder")
    if found.kind == TABLES:
        first = posixpath.join(uri.rstrip("/"), found.tables[0])
        raise TagpipeError(
            f"{named} holds tag tables {_names(found.tables)} (one per model): pass one of them, e.g. {first}"
        )
    if found.kind == IMAGES and want in ("table", "side"):
        raise TagpipeError(
            f"{named} is {IMAGES}, not {wanted}: tag it first (tagpipe tag -i {uri} -o TABLE) and pass TABLE"
        )
    if found.kind == TAG_TABLE and want == "dedup":
        raise TagpipeError(
            f"{named} is a tag table, not a dedup output: run tagpipe dedup --tags {uri} -o DIR"
        )
    raise TagpipeError(f"{named} is {found.kind}, not {wanted}: give {how}")


def _readable_file(uri: str, want: str) -> bool:
    """A file given where a table goes: Parquet (or CSV for an audit side), by its name;
    an HTML page, a JSONL export or a caption file read as a table gives an empty page."""
    suffixes = (".parquet",) if want == "table" else (".parquet", ".csv")
    return uri.lower().endswith(suffixes)


def require_tag_columns(uri: str, names: list[str], option: str = "") -> None:
    """Refuse, in one line, a tag input with no rows (an empty table, `--allow-empty`) or
    without a uri column (not a tag output), before any stage reads it."""
    named = f"{option} {uri}".strip()
    if not names:
        raise TagpipeError(f"{named} holds no rows (an empty tag table): nothing to do")
    if "uri" not in names:
        raise TagpipeError(f"{named}: not a tag output (no uri column; it has {names[:8]})")


def _names(tables: tuple[str, ...], suffix: str = "/") -> str:
    shown = [f"{t}{suffix}" for t in tables[:6]] + ([f"{len(tables) - 6} more"] if len(tables) > 6 else [])
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} and {shown[-1]}"


def expect_output(uri: str, own: str, option: str, storage_options: dict | None = None) -> Found:
    """Refuse (one line) an output folder that holds something other than this command's
    own earlier output (`own`, e.g. DEDUP: updated in place, as a nightly does): writing
    into a tag table, another command's output or a folder of images would mix their files.
    A missing or empty folder, or one holding only hidden or `_`-prefixed entries (an
    interrupted run's), is taken."""
    found = kind_of(uri, storage_options)
    if found.kind in (MISSING, own) or not [n for n in found.names if not n.startswith(("_", "."))]:
        return found
    if found.kind == FILE:
        raise TagpipeError(f"{option} {uri} is a file, not a folder: give a new folder")
    what = found.kind if found.kind != OTHER else f"a folder holding {_names(found.names, '')}"
    raise TagpipeError(f"{option} {uri} is {what}, not {own}: write to a new folder (nothing was written)")
