"""The tag table: immutable Parquet parts plus versioned snapshots naming the current ones.

A tag output directory holds

    data/<key>/part-*.parquet   immutable parts; <key> names the model + settings that made them
    _versions/<N>.json          snapshot N: the parts that make the table at version N
    _current.json               a copy of the newest snapshot, replaced atomically: the commit point
    _runs/, _manifests/         run manifests and input listings

A run writes new parts first (they are invisible: no snapshot names them) and then
commits once, by writing `_versions/<N+1>.json` and replacing `_current.json`. A run
killed at any point before that leaves the previous table exactly as it was; the parts
it wrote are found again and reused by the next run. Rows are never edited in place:
a part losing rows (deleted or changed images) is rewritten under a new name, so every
older snapshot stays readable until `vacuum` deletes the parts no kept version names.

Readers take the file list from `_current.json` (`read_current`, or two SQL statements
in DuckDB: see the README). Why not Delta Lake: docs/decisions.md.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import TagpipeError
from pipeline.storage import filesystem_for, is_local, retry, write_atomic

log = logging.getLogger(__name__)

DATA_DIR = "data"
VERSIONS_DIR = "_versions"
CURRENT = "_current.json"
RUNS_DIR = "_runs"
MANIFESTS_DIR = "_manifests"
TMP_MARK = ".tmp-"  # storage.write_atomic's temp files: <name>.tmp-<uuid>
READ_THREADS = 16  # parts are read concurrently (object stores are latency-bound)


@dataclass(frozen=True)
class Snapshot:
    """One committed version of the table. `files` are relative to the table root."""

    version: int
    files: tuple[str, ...]
    rows: int
    model_sha256: str
    inference_key: str  # model + everything that changes inference (profile, decode settings)
    rules_key: str  # calibration + threshold rules: a change here means rethreshold only
    run_id: str
    committed_at: str
    model_name: str = ""
    rules: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def to_json(self, root: str) -> bytes:
        record = asdict(self)
        record["files"] = list(self.files)
        record["paths"] = [posixpath.join(root, f) for f in self.files]  # for SQL readers
        return json.dumps(record, indent=1, sort_keys=True, default=json_value).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Snapshot":
        record = json.loads(data)
        record.pop("paths", None)
        record["files"] = tuple(record["files"])
        return cls(**record)


class TagTable:
    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.path = filesystem_for(self.uri, storage_options)
        self.local = is_local(self.fs)

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def full_uri(self, relative: str) -> str:
        return posixpath.join(self.uri, relative)

    # ---- snapshots -------------------------------------------------------------
    def current(self) -> Snapshot | None:
        """The committed table, or None before the first commit."""
        path = self.join(CURRENT)
        try:
            data = retry(lambda: self.fs.cat_file(path), what=path)
        except FileNotFoundError:
            if self._has_legacy_parts():
                raise TagpipeError(f"{self.uri}: part files at the top level and no {CURRENT}: an output in the layout before versioned tables; tag into a new directory") from None
            return None
        return Snapshot.from_json(data)

    def versions(self) -> list[int]:
        directory = self.join(VERSIONS_DIR)
        self.fs.invalidate_cache(directory)
        if not self.fs.exists(directory):
            return []
        return sorted(int(posixpath.basename(p).split(".")[0]) for p in self.fs.ls(directory, detail=False) if p.endswith(".json"))

    def snapshot(self, version: int | None = None) -> Snapshot:
        if version is None:
            current = self.current()
            if current is None:
                raise TagpipeError(f"{self.uri}: no committed table ({CURRENT} missing): has a tag run finished here?")
            return current
        path = self.join(VERSIONS_DIR, f"{version:012d}.json")
        try:
            return Snapshot.from_json(retry(lambda: self.fs.cat_file(path), what=path))
        except FileNotFoundError:
            raise TagpipeError(f"{self.uri}: no version {version} (have {self.versions()})") from None

    def commit(self, base: Snapshot | None, snapshot: Snapshot) -> Snapshot:
        """Make `snapshot` the current table. Refuses when another run committed since
        `base` was read (one writer per table; this catches a second one)."""
        now = self.current()
        if (now.version if now else 0) != (base.version if base else 0):
            raise TagpipeError(f"{self.uri}: version {now.version if now else 0} was committed by another run (run {now.run_id if now else '-'}) while this one worked from {base.version if base else 0}; rerun")
        data = snapshot.to_json(os.path.abspath(self.path) if self.local else self.uri)
        self._write_bytes(posixpath.join(VERSIONS_DIR, f"{snapshot.version:012d}.json"), data)
        self._write_bytes(CURRENT, data)  # the commit point
        return snapshot

    # ---- parts -----------------------------------------------------------------
    def paths(self, snapshot: Snapshot) -> list[str]:
        return [self.join(f) for f in snapshot.files]

    def read(self, snapshot: Snapshot | None = None, columns: list[str] | None = None, with_file: bool = False) -> pa.Table:
        """The table at a snapshot (default: current), optionally with `_file`, the index
        of each row's part in snapshot.files."""
        snapshot = snapshot or self.snapshot()

        def one(index_and_path):
            index, path = index_and_path
            table = retry(lambda: self._read_part(path, columns), what=path)
            return table.append_column("_file", pa.array([index] * table.num_rows, pa.int32())) if with_file else table

        with ThreadPoolExecutor(READ_THREADS) as pool:
            tables = list(pool.map(one, enumerate(self.paths(snapshot))))
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables, promote_options="default")

    def _read_part(self, path: str, columns: list[str] | None) -> pa.Table:
        with self.fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)

    def read_part(self, relative: str, columns: list[str] | None = None) -> pa.Table:
        path = self.join(relative)
        return retry(lambda: self._read_part(path, columns), what=path)

    def read_part_metadata(self, relative: str):
        with self.fs.open(self.join(relative), "rb") as handle:
            return pq.read_metadata(handle)

    def exists(self, relative: str) -> bool:
        path = self.join(relative)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return self.fs.exists(path)

    def list_parts(self, key: str) -> list[dict]:
        """Parts under data/<key>/ with their modification time (seconds since epoch)."""
        directory = self.join(DATA_DIR, key)
        self.fs.invalidate_cache(directory)
        if not self.fs.exists(directory):
            return []
        found = []
        for info in self.fs.ls(directory, detail=True):
            name = posixpath.basename(info["name"])
            if name.startswith("part-") and name.endswith(".parquet"):
                found.append({"file": posixpath.join(DATA_DIR, key, name), "mtime": _mtime(info)})
        return sorted(found, key=lambda f: f["file"])

    def write_part(self, relative: str, table: pa.Table) -> str:
        """Write one part atomically (storage.write_atomic). Returns the relative path."""
        write_atomic(self.full_uri(relative), table=table, storage_options=self.storage_options)
        return relative

    def _write_bytes(self, relative: str, data: bytes) -> None:
        write_atomic(self.full_uri(relative), data, storage_options=self.storage_options)

    def _has_legacy_parts(self) -> bool:
        return self.fs.exists(self.path) and any(posixpath.basename(p).startswith("part-") for p in self.fs.ls(self.path, detail=False))

    # ---- vacuum --------------------------------------------------------------------
    def vacuum(self, keep_versions: int = 2, grace_hours: float = 24.0, dry_run: bool = False) -> dict:
        """Delete parts no kept version names. Kept: the newest `keep_versions` versions
        (the current one always). Unnamed parts younger than `grace_hours` stay: they may
        belong to a run in progress, which will commit or reuse them. Version records of
        versions whose parts are gone are deleted too, so every listed version is readable."""
        if keep_versions < 1:
            raise TagpipeError("keep_versions must be >= 1 (the current version is always kept)")
        current = self.snapshot()
        versions = [v for v in self.versions() if v <= current.version]
        kept = versions[-keep_versions:]
        named = set(current.files)
        for version in kept:
            named |= set(self.snapshot(version).files)
        cutoff = datetime.now(timezone.utc).timestamp() - grace_hours * 3600
        data = self.join(DATA_DIR)
        doomed = []
        if self.fs.exists(data):
            self.fs.invalidate_cache(data)
            for key in self.fs.ls(data, detail=False):
                for part in self.list_parts(posixpath.basename(key)):
                    if part["file"] not in named and part["mtime"] < cutoff:
                        doomed.append(part["file"])
        old_versions = [v for v in versions if v not in kept]
        stale_tmp = []  # temp files of local writes a killed process left (object stores write in one PUT)
        if self.local:
            stale_tmp = [name for name, info in self.fs.find(self.path, detail=True).items() if TMP_MARK in posixpath.basename(name) and _mtime(info) < cutoff]
        if not dry_run:
            for file in doomed:
                self.fs.rm(self.join(file))
            for version in old_versions:
                self.fs.rm(self.join(VERSIONS_DIR, f"{version:012d}.json"))
            for path in stale_tmp:
                self.fs.rm(path)
        return {"parts_deleted": len(doomed), "versions_deleted": old_versions, "versions_kept": kept, "tmp_deleted": len(stale_tmp), "dry_run": dry_run}

    # ---- run records -------------------------------------------------------------
    def write_input_manifest(self, run_id: str, manifest: pa.Table) -> str:
        """The listing a run works from (uri, source_size, etag, mtime), written first."""
        relative = posixpath.join(MANIFESTS_DIR, f"{run_id}.parquet")
        write_atomic(self.full_uri(relative), table=manifest, storage_options=self.storage_options)
        return self.join(relative)

    def write_run_manifest(self, name: str, record: dict) -> str:
        relative = posixpath.join(RUNS_DIR, f"{name}.json")
        self._write_bytes(relative, json.dumps(record, indent=1, sort_keys=True, default=json_value).encode())
        return self.join(relative)


def json_value(value):
    """JSON for what records hold besides plain data: enums by value, sets sorted."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def _mtime(info: dict) -> float:
    mtime = info.get("mtime", info.get("LastModified"))
    return mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime or 0)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def is_tag_table(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem_for(uri, storage_options)
    return fs.exists(posixpath.join(path.rstrip("/"), CURRENT))


def read_current(uri: str, storage_options: dict | None = None, columns: list[str] | None = None, version: int | None = None) -> pa.Table:
    """The tag table at its current version (or at `version`): one row per image."""
    table = TagTable(uri, storage_options)
    return table.read(table.snapshot(version), columns)


def current_files(uri: str, storage_options: dict | None = None, version: int | None = None) -> list[str]:
    """Full URIs of the parts that make the table, for any Parquet reader."""
    table = TagTable(uri, storage_options)
    return [table.full_uri(f) for f in table.snapshot(version).files]
