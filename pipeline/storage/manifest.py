"""Inputs -> a manifest table (uri, size, etag, mtime), listed in parallel by prefix.

An input is a prefix on any fsspec filesystem, one image file, or a manifest file
(.parquet, .csv with a uri column, or .txt/.lst with one URI per line). Prefixes are
split at their first level and each part is listed by its own Ray task, so no single
driver-side call walks millions of keys.

Every file under a prefix is an input (one row each; what Pillow cannot read becomes
an `unsupported` or `not_an_image` row), except the files skipped here, which are
counted by reason so that files found = inputs + skipped, always:
- os_debris: hidden files and folders (`.*`), `@eaDir`, `__MACOSX`, `Thumbs.db`, `desktop.ini`;
- sidecar: a training set's text and metadata files beside its images (captions `.txt`
  and `.caption`, `.json`, `.npz` latents, `.toml`, `.yaml`), unless asked to list them
  (`--list-sidecars`): a captioned folder would otherwise become half error rows, and
  exporting captions into it would add more on every run;
- extension: not one of the extensions asked for (`--extension`; no sidecar rule then);
- tagpipe_output: the run's own table files (data/, _versions/, _runs/, _manifests/,
  _current.json, guard files) when the output lies inside an input, and whatever any
  tagpipe command wrote there, as its marker says (outputs.py): tables, dedup, split and
  audit folders, reports, review queues, exports;
Single files and manifest entries are inputs as named: nothing is skipped from them. A
manifest's relative uris are taken against its own folder (absolute, as a folder's files are).
An S3 Inventory report (its manifest.json) gives its current objects, these rules applied (inventory.py).

Why this module is long: files found = inputs + skipped holds only if every way of
listing (a local walk, folders on Ray tasks, key ranges on threads, an inventory) applies
the same rules and counts the same way, markers' reclassification included; they are read
together here.
"""

from __future__ import annotations

import collections
import logging
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.core.errors import ConfigError
from pipeline.core.progress import Progress, ProgressSettings
from pipeline.core.schemas import MANIFEST_SCHEMA
from pipeline.core.words import counted
from pipeline.storage.filesystem import filesystem_for, is_local, retry
from pipeline.storage.inventory import read_inventory
from pipeline.storage.key_ranges import KeyRangeSettings, UnorderedListing, key_pages_for, list_keys
from pipeline.storage.outputs import MARKER_NAMES, Owned, is_marker, listing_path_of, marked_rows, owned

log = logging.getLogger(__name__)

DEBRIS_NAMES = frozenset({"@eadir", "__macosx", "thumbs.db", "desktop.ini"})  # compared lower-cased
SIDECAR_EXTENSIONS = frozenset({"txt", "caption", "json", "npz", "toml", "yaml", "yml"})
OS_DEBRIS, SIDECAR, EXTENSION, TAGPIPE_OUTPUT = "os_debris", "sidecar", "extension", "tagpipe_output"
MANIFEST_EXTENSIONS = frozenset({"parquet", "csv", "txt", "lst"})


def _extension(path: str) -> str:
    return posixpath.splitext(path)[1].lower().lstrip(".")


def _join(protocol: str, path: str) -> str:
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _protocol(fs) -> str:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "file" if proto in ("file", "local") else proto


def _row(fs, info: dict) -> dict:
    mtime: Any = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    etag = info.get("ETag", info.get("etag"))
    return {
        "uri": _join(_protocol(fs), info["name"]),
        "source_size": int(info.get("size") or 0),
        "etag": str(etag).strip('"') if etag else None,
        "mtime": float(mtime) if mtime is not None else None,
    }


SKIPPED_EXAMPLES = 20  # paths kept per reason for the run record


@dataclass
class Listing:
    """The inputs (one row each) and the files left out of them, by reason."""

    manifest: pa.Table
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)  # the first few paths per reason

    @property
    def found(self) -> int:
        return self.manifest.num_rows + sum(self.skipped.values())


@dataclass(frozen=True)
class ListingRules:
    """What a prefix listing leaves out. extensions: lower-case, no dot; empty: keep all.
    excluded: filesystem paths (no protocol) whose files are never inputs."""

    extensions: frozenset[str] = frozenset()
    excluded: tuple[str, ...] = ()
    skip_sidecars: bool = True

    def skip_reason(self, root: str, path: str) -> str | None:
        relative = path[len(root) :].strip("/") if path.startswith(root) else posixpath.basename(path)
        if any(_is_debris(part) for part in relative.split("/")):
            return OS_DEBRIS
        if any(path == prefix or path.startswith(prefix.rstrip("/") + "/") for prefix in self.excluded):
            return TAGPIPE_OUTPUT
        if is_marker(path):  # what else of its folder is tagpipe's: build_manifest's last step
            return TAGPIPE_OUTPUT
        if self.extensions:
            return EXTENSION if _extension(path) not in self.extensions else None
        if self.skip_sidecars and _extension(path) in SIDECAR_EXTENSIONS:
            return SIDECAR
        return None

    def may_skip(self, paths: pa.Array) -> np.ndarray:
        """True where skip_reason may give a reason; False only where it gives none. A
        listing of millions asks skip_reason of these few only (tests/storage/test_key_ranges.py
        fuzzes that this never misses one)."""
        lower = pc.utf8_lower(paths)  # Arrow's lower-casing differs from Python's off ASCII:
        names = DEBRIS_NAMES | {name.lower() for name in MARKER_NAMES}
        debris = "|".join(re.escape(name) for name in sorted(names))
        maybe = pc.or_(
            pc.invert(pc.string_is_ascii(paths)), pc.match_substring_regex(lower, rf"(^|/)\.|{debris}")
        )
        for prefix in self.excluded:
            maybe = pc.or_(maybe, pc.starts_with(paths, prefix.rstrip("/")))
        if self.extensions:
            wanted = "|".join(re.escape(e) for e in sorted(self.extensions))
            maybe = pc.or_(maybe, pc.invert(pc.match_substring_regex(lower, rf"\.({wanted})$")))
        elif self.skip_sidecars:
            sidecars = "|".join(sorted(SIDECAR_EXTENSIONS))
            maybe = pc.or_(maybe, pc.match_substring_regex(lower, rf"\.({sidecars})$"))
        return maybe.to_numpy(zero_copy_only=False)


def _is_debris(name: str) -> bool:
    """A hidden file or folder (not the `.` and `..` that object keys may hold), or an
    OS or sync tool's own file."""
    return (name.startswith(".") and name not in (".", "..")) or name.lower() in DEBRIS_NAMES


class Skipped:
    """Files left out of a listing: counts and the first few paths, by reason; the tagpipe
    output markers found; and counts by (reason, folder, extension), so that files skipped
    for another reason before a marker was seen can be counted as tagpipe's after."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.markers: list[str] = []
        self.by_folder: collections.Counter = collections.Counter()

    def add(self, reason: str, path: str, count: int = 1) -> None:
        self.counts[reason] += count
        if len(self.examples[reason]) < SKIPPED_EXAMPLES:
            self.examples[reason].append(path)
        if reason == TAGPIPE_OUTPUT and is_marker(path):
            self.markers.append(path)
        elif reason != TAGPIPE_OUTPUT:
            folder, name = posixpath.split(listing_path_of(path))
            self.by_folder[reason, folder, _extension(name)] += count

    def update(self, other: Skipped) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] += count
            room = SKIPPED_EXAMPLES - len(self.examples[reason])
            self.examples[reason].extend(other.examples[reason][:room])
        self.markers.extend(other.markers)
        self.by_folder.update(other.by_folder)

    def count_as_output(self, marked: list[Owned]) -> None:
        """Files skipped for another reason in what the markers name: tagpipe's output."""
        for (reason, folder, extension), count in list(self.by_folder.items()):
            if any(mark.covers_skipped(folder, extension) for mark in marked):
                del self.by_folder[reason, folder, extension]
                self.counts[reason] -= count
                if not self.counts[reason]:
                    del self.counts[reason]
                self.examples[reason] = [p for p in self.examples[reason] if not _covered(p, marked)]
                self.add(TAGPIPE_OUTPUT, f"{folder}/*.{extension}" if extension else f"{folder}/*", count)


def _covered(uri: str, marked: list[Owned]) -> bool:
    return any(mark.covers(listing_path_of(uri)) for mark in marked)


def _leave_out_marked(listed: pa.Table, skipped: Skipped, storage_options: dict | None) -> pa.Table:
    """What tagpipe's output markers name, out of the listed rows and counted as
    tagpipe_output (a marker may be listed after the files it names: key ranges in
    parallel, folders in any order, so this runs once the whole listing is in)."""
    if not skipped.markers:
        return listed
    marked = [owned(uri, storage_options) for uri in sorted(set(skipped.markers))]
    skipped.count_as_output(marked)
    out = marked_rows(listed.column("uri"), marked)
    dropped = listed.column("uri").filter(out)
    for uri in dropped.slice(0, SKIPPED_EXAMPLES).to_pylist():
        skipped.add(TAGPIPE_OUTPUT, uri)
    skipped.counts[TAGPIPE_OUTPUT] += max(0, len(dropped) - SKIPPED_EXAMPLES)
    return listed.filter(pc.invert(out))


def _keep(fs, root: str, infos, rules: ListingRules, skipped: Skipped) -> list[dict]:
    rows = []
    for info in infos:
        if info.get("type") == "directory":
            continue
        reason = rules.skip_reason(root, info["name"])
        if reason:
            skipped.add(reason, _join(_protocol(fs), info["name"]))
        else:
            rows.append(_row(fs, info))
    return rows


def list_prefix(
    uri: str, storage_options: dict | None, rules: ListingRules, root: str
) -> tuple[pa.Table, Skipped]:
    """Every file under one prefix, recursively (one Ray task's share of a listing),
    and those skipped, by reason. root: the input prefix it belongs to."""
    fs, path = filesystem_for(uri, storage_options)
    fs.invalidate_cache(path)  # a listing is tonight's truth, never a cached one
    found = retry(lambda: fs.find(path, detail=True, withdirs=False), what=uri)
    skipped = Skipped()
    rows = _keep(fs, root, found.values(), rules, skipped)
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), skipped


def _read_manifest_file(uri: str, storage_options: dict | None) -> pa.Table:
    fs, path = filesystem_for(uri, storage_options)
    ext = _extension(path)
    with fs.open(path, "rb") as handle:
        if ext == "parquet":
            table = pq.read_table(handle)
        elif ext == "csv":
            table = pacsv.read_csv(handle)
        else:
            lines = [line.strip() for line in handle.read().decode("utf-8").splitlines()]
            table = pa.table({"uri": [line for line in lines if line and not line.startswith("#")]})
    if "uri" not in table.column_names:
        raise ConfigError(f"manifest {uri}: no 'uri' column (columns: {table.column_names})")
    if table.column("uri").null_count:
        raise ConfigError(f"manifest {uri}: {table.column('uri').null_count} row(s) with no uri")
    out = {"uri": _absolute_uris(table.column("uri").cast(pa.string()), fs, path)}
    for name in ("source_size", "etag", "mtime"):
        out[name] = (
            table.column(name).cast(MANIFEST_SCHEMA.field(name).type)
            if name in table.column_names
            else pa.nulls(len(table), MANIFEST_SCHEMA.field(name).type)
        )
    return pa.table(out, schema=MANIFEST_SCHEMA)


def _absolute_uris(uris: pa.ChunkedArray, fs, manifest_path: str) -> pa.ChunkedArray:
    """A manifest's relative uris, taken against the manifest's own folder, as a folder
    input's files are named absolutely: the same image gets one uri whoever lists it, and
    a run from another working directory finds the same files. A uri with a protocol
    (`s3://...`, `file://...`) or an absolute path is kept as written."""
    relative = pc.invert(pc.match_substring_regex(uris, r"^(/|[A-Za-z][A-Za-z0-9+.-]*://)"))
    if not pc.any(relative).as_py():
        return uris
    local = is_local(fs)
    folder = posixpath.dirname(manifest_path)
    folder = os.path.abspath(folder) if local else folder

    def absolute(uri: str) -> str:
        joined = posixpath.normpath(posixpath.join(folder, uri))
        return joined if local else _join(_protocol(fs), joined)

    pairs = zip(uris.to_pylist(), relative.to_pylist())
    return pa.chunked_array([pa.array([absolute(u) if rel else u for u, rel in pairs], pa.string())])


def lists_without_ray(inputs: list[str], storage_options: dict | None = None) -> bool:
    """Whether listing these inputs starts no Ray task: local paths, and object stores
    listed by key ranges (threads). Other stores' folders are walked by Ray tasks."""
    for uri in inputs:
        fs, path = filesystem_for(uri, storage_options)
        if not is_local(fs) and key_pages_for(fs, fs._strip_protocol(path)) is None:
            return False
    return True


def _probe_one(rows: pa.Table, storage_options: dict | None) -> None:
    """An inventory lists its bucket without reading it: ask for one object, so missing
    credentials or a wrong endpoint stop the run here with one line (as a listing would),
    not as one read_error row per image. An object deleted since the report is fine."""
    if not rows.num_rows:
        return
    uri = rows.column("uri")[0].as_py()
    fs, path = filesystem_for(uri, storage_options)
    try:
        retry(lambda: fs.info(path), what=uri)
    except FileNotFoundError:
        return


def listing_path(uri: str, storage_options: dict | None = None) -> str:
    """A URI as the names a listing gives (no protocol; absolute for local paths)."""
    fs, _path = filesystem_for(uri, storage_options)
    return fs._strip_protocol(uri).rstrip("/")


def build_manifest(
    inputs: list[str],
    storage_options: dict | None = None,
    rules: ListingRules = ListingRules(),
    parallel: bool = True,
    progress: ProgressSettings = ProgressSettings(),
    key_ranges: KeyRangeSettings = KeyRangeSettings(),
) -> Listing:
    """All inputs as one manifest, sorted by uri, without duplicates; and what was skipped."""
    tables, listed, prefixes = [], [], []  # named files and manifests; what listings found
    skipped = Skipped()
    for uri in inputs:
        fs, path = filesystem_for(uri, storage_options)
        if not retry(lambda fs=fs, path=path: fs.exists(path), what=uri):
            raise ConfigError(f"input not found: {uri}")
        if retry(lambda fs=fs, path=path: fs.isdir(path), what=uri):
            prefixes.append((fs, path))
        elif posixpath.basename(path) == "manifest.json":  # an S3 Inventory report
            listed.append(read_inventory(uri, storage_options, rules, skipped.add))
            _probe_one(listed[-1], storage_options)
        elif _extension(path) in MANIFEST_EXTENSIONS:
            tables.append(_read_manifest_file(uri, storage_options))
        else:
            tables.append(pa.Table.from_pylist([_row(fs, fs.info(path))], schema=MANIFEST_SCHEMA))
    for fs, path in prefixes:
        for table, left_out in _list_in_parallel(
            fs, path, storage_options, rules, parallel, progress, key_ranges
        ):
            listed.append(table)
            skipped.update(left_out)
    if listed:
        tables.append(_leave_out_marked(pa.concat_tables(listed), skipped, storage_options))
    manifest = pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()
    manifest = manifest.sort_by("uri")
    if manifest.num_rows > 1:  # drop repeats (overlapping inputs), with no Python string a row
        uris = manifest.column("uri")
        differs = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1))
        keep = np.concatenate([[True], differs.to_numpy(zero_copy_only=False)])
        if not keep.all():
            manifest = manifest.filter(pa.array(keep))
    if skipped.counts:
        log.info(
            "listing skipped %s", ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.counts.items()))
        )
    return Listing(manifest, dict(skipped.counts), {k: v for k, v in skipped.examples.items() if v})


def _list_in_parallel(
    fs,
    path: str,
    storage_options,
    rules: ListingRules,
    parallel: bool,
    progress: ProgressSettings,
    key_ranges: KeyRangeSettings,
) -> list[tuple[pa.Table, Skipped]]:
    protocol = _protocol(fs)
    path = fs._strip_protocol(path)  # absolute, as the names the listing gives
    root = path.rstrip("/") + "/"
    ranged = key_pages_for(fs, path)
    if ranged is not None:  # an object store: every key under the prefix, by key ranges
        try:
            return [_list_by_key_ranges(protocol, root, ranged, rules, progress, key_ranges)]
        except UnorderedListing as exc:
            log.warning("%s: %s; listing it folder by folder instead", path, exc)
    fs.invalidate_cache(path)
    top = retry(lambda: fs.ls(path, detail=True), what=path)
    skipped = Skipped()
    files = pa.Table.from_pylist(_keep(fs, root, top, rules, skipped), schema=MANIFEST_SCHEMA)
    listed = [(files, skipped)]
    subdirs = []
    for info in top:
        if info.get("type") != "directory":
            continue
        reason = rules.skip_reason(root, info["name"] + "/")
        if reason in (None, EXTENSION, SIDECAR):  # a folder's name says nothing of its files' types
            subdirs.append(_join(protocol, info["name"]))
        else:  # a debris folder (or the output) is walked only to count what it holds
            listed.append(_count_skipped(fs, info["name"], reason))
    if not subdirs:
        return listed
    import ray

    with Progress(f"listing {path}", len(subdirs), "folders", progress) as shown:
        if (
            parallel and ray.is_initialized() and len(subdirs) > 1 and not is_local(fs)
        ):  # local disks list fast
            task = ray.remote(num_cpus=0.25, max_retries=3)(list_prefix)
            pending = [task.remote(sub, storage_options, rules, root) for sub in subdirs]
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                listed.append(ray.get(ready[0]))
                shown.update(1)
        else:
            for sub in subdirs:
                listed.append(list_prefix(sub, storage_options, rules, root))
                shown.update(1)
    files = sum(t.num_rows for t, _ in listed)
    where = counted(len(subdirs), "top-level subfolders")
    log.info("listed %s: %s, at its top level and in %s", path, counted(files, "files"), where)
    return listed


def _list_by_key_ranges(
    protocol: str,
    root: str,
    ranged,
    rules: ListingRules,
    progress: ProgressSettings,
    settings: KeyRangeSettings,
) -> tuple[pa.Table, Skipped]:
    pages, bucket, prefix = ranged
    skipped = Skipped()

    def as_manifest(keys: pa.Table) -> pa.Table:  # each range as it arrives: one copy at a time
        return _manifest_rows(keys, protocol, bucket, root, rules, skipped)

    with Progress(f"listing {root}", 0, "keys", progress) as shown:
        listed = list_keys(pages, prefix, settings, on_keys=lambda n: shown.update(n), transform=as_manifest)
    log.info("listed %s: %d keys, %d requests, %d ranges", root, listed.keys, listed.requests, listed.ranges)
    return listed.table, skipped


def _manifest_rows(
    keys: pa.Table, protocol: str, bucket: str, root: str, rules: ListingRules, skipped: Skipped
) -> pa.Table:
    """One range's keys as manifest rows; folder markers dropped, skipped files counted."""
    key = keys.column("key").combine_chunks()
    names = pc.binary_join_element_wise(bucket, key, "/") if bucket else key
    keep = pc.invert(pc.ends_with(names, "/")).to_numpy(zero_copy_only=False)  # folder markers: no object
    for i in np.flatnonzero(keep & rules.may_skip(names)).tolist():
        reason = rules.skip_reason(root, names[i].as_py())
        if reason:
            skipped.add(reason, _join(protocol, names[i].as_py()))
            keep[i] = False
    kept, uris = keys.filter(pa.array(keep)), names.filter(pa.array(keep))
    if protocol != "file":
        uris = pc.binary_join_element_wise(f"{protocol}:/", uris, "/")
    return pa.table(
        {"uri": uris, "source_size": kept["size"], "etag": kept["etag"], "mtime": kept["mtime"]},
        schema=MANIFEST_SCHEMA,
    )


def _count_skipped(fs, path: str, reason: str) -> tuple[pa.Table, Skipped]:
    files = retry(lambda: fs.find(path, withdirs=False), what=path)
    skipped = Skipped()
    for name in files:
        skipped.add(reason, _join(_protocol(fs), name))
    return MANIFEST_SCHEMA.empty_table(), skipped
