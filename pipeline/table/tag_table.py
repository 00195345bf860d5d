"""The tag table: immutable Parquet parts plus versioned snapshots naming the current ones.

A tag output directory holds

    data/<key>/part-*.parquet   immutable parts; <key> names the model + settings that made them
    _versions/<N>.json          snapshot N: the parts that make the table at version N
    _current.json               a copy of the newest snapshot, replaced atomically: the commit point
    _runs/, _manifests/         run manifests and input listings
    _leases/<run_id>.json       runs at work on the table, with a heartbeat: advisory (lease.py)
    _tagpipe_output.json        the mark that keeps listings off the table's files (storage/outputs.py)
    _calibration/<inference key>.parquet  how far the embedding moves under standard edits,
                                written once per inference key at tag time (never vacuumed)
    _labels/labels-*.parquet    the label sidecar: the source-tag check's columns, one
                                immutable file per labelled part, keyed by uri (labels.py)
    _summaries/<part>.<key>.json.gz  what `tagpipe report` found in a part, written by the
                                report (pipeline/corpus/report_scan.py); vacuum deletes a
                                part's summaries with it

A run writes new parts first (they are invisible: no snapshot names them) and then
commits once, by writing `_versions/<N+1>.json` and replacing `_current.json`. A run
killed at any point before that leaves the previous table exactly as it was; the parts
it wrote are found again and reused by the next run. Rows are never edited in place:
a part losing rows (deleted or changed images) is rewritten under a new name, so every
older snapshot stays readable until `vacuum` deletes the parts no kept version names.
A snapshot also names each labelled part's labels file (`labels`), written before the
commit in the same way; readers join them by uri (`read_rows`).

Readers take the file list from `_current.json` (`read_current`, or two SQL statements
in DuckDB: see the README). Why not Delta Lake: docs/decisions.md.

Why this module is long: the commit protocol (numbered versions created exclusively,
guard files, parts and the label files beside them, run manifests, vacuum) is one set of
invariants that has to be read together.
"""

from __future__ import annotations

import enum
import json
import logging
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.core.errors import TagpipeError
from pipeline.core.schemas import LABELS_SCHEMA
from pipeline.core.settings import KeyRole, Setting, SettingsModel, StorageOptions
from pipeline.core.words import counted
from pipeline.storage.filesystem import (
    create_exclusive,
    filesystem_for,
    is_local,
    retry,
    write_atomic,
)
from pipeline.storage.outputs import GUARD_FILE, TABLE_ENTRIES, mark_output
from pipeline.table.labels import (
    LABELS_DIR,
    is_labels_file,
    labels_from_record,
    labels_record,
    read_rows,
    row_schema,
)
from pipeline.table.version_fields import RulesRecord, VersionCounts

log = logging.getLogger(__name__)

DATA_DIR = "data"
VERSIONS_DIR = "_versions"
CURRENT = "_current.json"
RUNS_DIR = "_runs"
MANIFESTS_DIR = "_manifests"
CALIBRATION_DIR = "_calibration"  # edit calibration, one file per inference key
SUMMARIES_DIR = "_summaries"  # the report's per-part summaries: _summaries/<part, no .parquet>.<key>...
TMP_MARK = ".tmp-"  # storage.write_atomic's temp files: .tagpipe.tmp-<uuid> beside their target
# A file that is deliberately not Parquet, beside the parts: a plain read of the folder
# (pandas, pyarrow.dataset, polars, DuckDB globs), which would mix every version's
# parts, fails on it and names it instead (docs/decisions.md, "Plain reads").
GUARD_TEXT = (
    b"This folder is a tagpipe table: its part files belong to several versions, so reading them all\n"
    b"mixes old rows with new ones. Read the current version with pipeline.table.tag_table.read_current(),\n"
    b"or with the file list in _current.json (paths relative to this folder): see the README,\n"
    b"'Reading results'. This file is not Parquet on purpose, so that a plain read fails here.\n"
)
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
    rules: RulesRecord = field(default_factory=RulesRecord)
    counts: VersionCounts = field(default_factory=VersionCounts)
    labels: dict = field(default_factory=dict)  # part -> its labels file (labels.py), both relative

    def to_json(self) -> bytes:
        """The record, with `files` relative to the table root: a table copied or moved
        (another disk, another machine, local disk to S3) reads the same. `labels` only
        when there are some, so a table never checked keeps the record earlier versions read."""
        record = asdict(self)
        record["files"] = list(self.files)
        record["rules"], record["counts"] = self.rules.record(), self.counts.record()
        if self.labels:
            record["labels"] = labels_record(self.labels)
        else:
            record.pop("labels")
        return json.dumps(record, indent=1, sort_keys=True, default=json_value).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Snapshot:
        record = json.loads(data)
        record.pop("paths", None)  # absolute paths, written by tables before 0.2
        record["files"] = tuple(record["files"])
        record["labels"] = labels_from_record(record.get("labels"))
        record["rules"] = RulesRecord.from_record(record.get("rules"))
        record["counts"] = VersionCounts.from_record(record.get("counts"))
        return cls(**record)


def table_entries(uri: str) -> tuple[str, ...]:
    """What a table writes at its root, as URIs: a listing of a folder that holds the
    table leaves these out (and only these: an input may sit beside them)."""
    root = uri.rstrip("/")
    return tuple(f"{root}/{name}" for name in TABLE_ENTRIES)


class CommitConflict(TagpipeError):
    """Another run committed the version this run was about to commit."""


def version_record(version: int) -> str:
    return posixpath.join(VERSIONS_DIR, f"{version:012d}.json")


def summary_record(file: str, key: str) -> str:
    """Where the report keeps its summary of a part under a key (the figures' settings),
    relative to the root: _summaries/<the part's path without .parquet>.<key>.json.gz."""
    return posixpath.join(SUMMARIES_DIR, f"{posixpath.splitext(file)[0]}.{key}.json.gz")


def summarised_part(relative: str) -> str:
    """The part (its path without .parquet) of a summary path under _summaries/."""
    return relative.removesuffix(".json.gz").rsplit(".", 1)[0]


def calibration_record(inference_key: str) -> str:
    """The edit calibration of every version with this inference key, relative to the root."""
    return posixpath.join(CALIBRATION_DIR, f"{inference_key}.parquet")


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
        """The committed table, or None before the first commit: `_current.json`, or a
        newer version record when a commit stopped between writing its record (the
        commit itself) and copying it to `_current.json`."""
        snapshot = self._read_record(CURRENT)
        if snapshot is None and self._has_legacy_parts():
            raise TagpipeError(
                f"{self.uri}: part files at the top level and no {CURRENT}: "
                "an output in the layout before versioned tables; tag into a new directory"
            )
        while True:
            newer = self._read_record(version_record((snapshot.version if snapshot else 0) + 1), probe=True)
            if newer is None:
                return snapshot
            snapshot = newer

    def sync_current(self) -> Snapshot | None:
        """current(), after writing it to `_current.json` when that file is behind (a
        commit that stopped between its two writes). Writers call this; readers need not."""
        recorded = self._read_record(CURRENT)
        newest = self.current()
        if newest is not None and (recorded is None or recorded.version < newest.version):
            self._write_bytes(CURRENT, newest.to_json())
        return newest

    def _read_record(self, relative: str, probe: bool = False) -> Snapshot | None:
        """A version record, or None if there is none. probe: a look for a record that
        usually does not exist; a store that denies it (S3 answers 403 for a missing key
        to a reader who may not list the bucket) has none to show either."""
        path = self.join(relative)
        for attempt in range(5):
            try:
                return Snapshot.from_json(retry(lambda: self.fs.cat_file(path), what=path))
            except FileNotFoundError:
                return None
            except PermissionError:
                if probe:
                    return None
                raise
            except json.JSONDecodeError:  # a record being written where links are not to be had
                time.sleep(0.1 * (attempt + 1))
        raise TagpipeError(f"{self.uri}: {relative} does not parse")

    def versions(self) -> list[int]:
        directory = self.join(VERSIONS_DIR)
        self.fs.invalidate_cache(directory)
        if not self.fs.exists(directory):
            return []
        return sorted(
            int(posixpath.basename(p).split(".")[0])
            for p in self.fs.ls(directory, detail=False)
            if p.endswith(".json")
        )

    def not_a_table(self) -> TagpipeError:
        """Why there is no table here: what the folder is instead when tagpipe wrote it (a
        dedup output, a multi-model pass's folder of tables, ...), else no commit yet."""
        from pipeline.table.input_kinds import MISSING, NAMED_KINDS, expect, kind_of

        if kind_of(self.uri, self.storage_options).kind in (MISSING, *NAMED_KINDS):
            try:
                expect(self.uri, "versioned", "", self.storage_options)
            except TagpipeError as exc:
                return exc
        return TagpipeError(
            f"{self.uri}: no committed table ({CURRENT} missing): has a tag run finished here?"
        )

    def snapshot(self, version: int | None = None) -> Snapshot:
        if version is None:
            current = self.current()
            if current is None:
                raise self.not_a_table()
            return current
        snapshot = self._read_record(version_record(version))
        if snapshot is None:
            raise TagpipeError(f"{self.uri}: no version {version} (have {self.versions()})")
        return snapshot

    def commit(self, base: Snapshot | None, snapshot: Snapshot) -> Snapshot:
        """Make `snapshot` (version base + 1) the current table.

        Creating its version record is the commit, and it is exclusive (an O_EXCL-style
        link locally, a conditional PUT on S3): of two runs that worked from the same
        base, exactly one creates it and the other is refused with CommitConflict.
        `_current.json` is a copy written after it, for readers that read one file;
        `current()` also finds a record that `_current.json` does not show yet."""
        expected = (base.version if base else 0) + 1
        if snapshot.version != expected:
            raise ValueError(f"version {snapshot.version} cannot follow version {expected - 1}")
        data = snapshot.to_json()
        self.guard({posixpath.dirname(f) for f in (*snapshot.files, *snapshot.labels.values())})
        now = self.current()
        # a base older than the newest version lost already; checked first because vacuum
        # may have deleted old records, which would let an exclusive create succeed
        if (now.version if now else 0) >= snapshot.version or not create_exclusive(
            self.full_uri(version_record(snapshot.version)), data, self.storage_options
        ):
            raise CommitConflict(self._conflict_text(snapshot))
        self._write_bytes(CURRENT, data)
        self.sync_current()  # a slower writer's copy must not move _current.json back
        return snapshot

    def mark(self) -> None:
        """Mark the table's own entries at its root as tagpipe's output (storage/outputs.py),
        so that a listing of a folder holding it leaves them out (only them: an input may sit
        beside them). Before a run's first write, and again at each commit."""
        mark_output(self.uri, "tag table", self.storage_options, names=TABLE_ENTRIES)

    def guard(self, part_dirs: set[str]) -> None:
        """Put GUARD_FILE at the root, in data/ and in each folder holding parts."""
        self.mark()
        for relative in sorted({"", DATA_DIR, *part_dirs}):
            path = self.join(relative, GUARD_FILE)
            if not self.fs.exists(path):
                self._write_bytes(posixpath.join(relative, GUARD_FILE), GUARD_TEXT)

    def _conflict_text(self, snapshot: Snapshot) -> str:
        other = self._read_record(version_record(snapshot.version))
        who = f"run {other.run_id} (committed {other.committed_at})" if other else "another run"
        return (
            f"{self.uri}: version {snapshot.version} was committed by {who} "
            f"while run {snapshot.run_id} worked from version {snapshot.version - 1}; "
            "nothing of this run is lost: its parts are kept, and running the "
            f"same command again commits on top of version {snapshot.version} without tagging them again"
        )

    # ---- parts -----------------------------------------------------------------
    def paths(self, snapshot: Snapshot) -> list[str]:
        return [self.join(f) for f in snapshot.files]

    def read(
        self, snapshot: Snapshot | None = None, columns: list[str] | None = None, with_file: bool = False
    ) -> pa.Table:
        """The table at a snapshot (default: current), its label columns joined
        (`read_rows`), optionally with `_file`, the index of each row's part in snapshot.files."""
        snapshot = snapshot or self.snapshot()
        version = snapshot

        def one(index_and_file):
            index, relative = index_and_file
            table = self.read_rows(version, relative, columns)
            return (
                table.append_column("_file", pa.array([index] * table.num_rows, pa.int32()))
                if with_file
                else table
            )

        with ThreadPoolExecutor(READ_THREADS) as pool:
            tables = list(pool.map(one, enumerate(snapshot.files)))
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables, promote_options="default")

    def read_rows(self, snapshot: Snapshot, relative: str, columns: list[str] | None = None) -> pa.Table:
        """One part of a version as readers see it: its label columns joined by uri from
        the labels file the version names for it (labels.read_rows says the rest)."""
        return read_rows(self, snapshot.labels.get(relative), relative, columns)

    def row_schema(self, snapshot: Snapshot, relative: str, part: pa.Schema) -> pa.Schema:
        """A part's schema (`part`, from its footer) as `read_rows` gives its rows."""
        return row_schema(part, relative in snapshot.labels)

    def column_names(self, snapshot: Snapshot) -> list[str]:
        """A version's columns as read: its first part's, and the label columns when the
        version names labels files (a whole read may add those of other parts)."""
        if not snapshot.files:
            return []
        footer = self.read_part_metadata(snapshot.files[0]).schema.to_arrow_schema()
        labelled = [f.name for f in LABELS_SCHEMA][1:] if snapshot.labels else []
        return [n for n in footer.names if n not in labelled] + labelled

    def labels(self, version: int | Snapshot | None = None) -> pa.Table:
        """The label-check columns of every row of a version (default: current), by uri
        (LABELS_SCHEMA; nulls on rows never checked), from its labels files or, in a table
        labelled before the sidecar, its parts."""
        snapshot = version if isinstance(version, Snapshot) else self.snapshot(version)
        table = self.read(snapshot, list(LABELS_SCHEMA.names))
        return table.cast(LABELS_SCHEMA) if table.num_columns else LABELS_SCHEMA.empty_table()

    def _read_part(self, path: str, columns: list[str] | None) -> pa.Table:
        with self.fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)

    def read_part(self, relative: str, columns: list[str] | None = None) -> pa.Table:
        path = self.join(relative)
        return retry(lambda: self._read_part(path, columns), what=path)

    def uri_spans(self, snapshot: Snapshot) -> list[tuple[str, str] | None]:
        """Each part's least and greatest uri, from its footer's statistics (exact when
        present: Parquet drops, never truncates, statistics over its size limit); None
        where a footer has none, or the part has no rows."""

        def span(relative: str) -> tuple[str, str] | None:
            meta = retry(lambda: self.read_part_metadata(relative), what=relative)
            column = meta.schema.names.index("uri") if "uri" in meta.schema.names else -1
            stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
            if column < 0 or not stats or not all(s is not None and s.has_min_max for s in stats):
                return None
            return min(s.min for s in stats), max(s.max for s in stats)

        with ThreadPoolExecutor(READ_THREADS) as pool:
            return list(pool.map(span, snapshot.files))

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

    def list_label_files(self) -> list[dict]:
        """Files of the label sidecar (_labels/) with their modification time."""
        directory = self.join(LABELS_DIR)
        self.fs.invalidate_cache(directory)
        if not self.fs.exists(directory):
            return []
        return sorted(
            (
                {"file": posixpath.join(LABELS_DIR, posixpath.basename(info["name"])), "mtime": _mtime(info)}
                for info in self.fs.ls(directory, detail=True)
                if is_labels_file(info["name"])
            ),
            key=lambda f: f["file"],
        )

    def write_part(self, relative: str, table: pa.Table) -> str:
        """Write one part, whole, and never over another. Returns the relative path.

        A part's name comes from its settings and its rows' sources, so two runs at once
        on one table write parts of the same name for the same work. A part a version
        names is immutable: replacing it would give that version the other run's rows
        (its run id, with no run record), and on an object store fail every reader that
        opened the old one (s3fs checks the ETag). So the first part written stays,
        locally and on S3: created exclusively, and an existing one (the same rows, from
        the other run) is used as it is."""
        if not create_exclusive(self.full_uri(relative), storage_options=self.storage_options, table=table):
            log.info("%s was written by another run for the same rows: using it", relative)
        return relative

    def _write_bytes(self, relative: str, data: bytes) -> None:
        write_atomic(self.full_uri(relative), data, storage_options=self.storage_options)

    def _has_legacy_parts(self) -> bool:
        return self.fs.exists(self.path) and any(
            posixpath.basename(p).startswith("part-") for p in self.fs.ls(self.path, detail=False)
        )

    # ---- vacuum --------------------------------------------------------------------
    def vacuum(self, keep_versions: int = 2, grace_hours: float = 24.0, dry_run: bool = False) -> dict:
        """Delete parts no kept version names. Kept: the newest `keep_versions` versions
        (the current one always). Unnamed parts younger than `grace_hours` stay: they may
        belong to a run in progress, which will commit or reuse them. Version records of
        versions whose parts are gone are deleted too, so every listed version is readable,
        and the report's summaries of the deleted parts."""
        if keep_versions < 1:
            raise TagpipeError("keep_versions must be >= 1 (the current version is always kept)")
        current = self.sync_current() if not dry_run else self.current()
        if current is None:
            raise self.not_a_table()
        versions = [v for v in self.versions() if v <= current.version]
        kept = versions[-keep_versions:]
        named = {*current.files, *current.labels.values()}
        for version in kept:
            snapshot = self.snapshot(version)
            named |= {*snapshot.files, *snapshot.labels.values()}
        cutoff = datetime.now(UTC).timestamp() - grace_hours * 3600
        data = self.join(DATA_DIR)
        doomed = []
        if self.fs.exists(data):
            self.fs.invalidate_cache(data)
            for key in self.fs.ls(data, detail=False):
                for part in self.list_parts(posixpath.basename(key)):
                    if part["file"] not in named and part["mtime"] < cutoff:
                        doomed.append(part["file"])
        doomed_labels = [  # label files no kept version names, as parts
            f["file"] for f in self.list_label_files() if f["file"] not in named and f["mtime"] < cutoff
        ]
        old_versions = [v for v in versions if v not in kept]
        stale_tmp = []  # temp files of local writes a killed process left (object stores write in one PUT)
        if self.local:
            stale_tmp = [
                name
                for name, info in self.fs.find(self.path, detail=True).items()
                if TMP_MARK in posixpath.basename(name) and _mtime(info) < cutoff
            ]
        summaries = self._summaries_of(doomed)
        if not dry_run:
            for file in [*doomed, *doomed_labels]:
                self.fs.rm(self.join(file))
            for path in summaries:
                self.fs.rm(path)
            for version in old_versions:
                self.fs.rm(self.join(version_record(version)))
            for path in stale_tmp:
                self.fs.rm(path)
        return {
            "parts_deleted": len(doomed),
            "label_files_deleted": len(doomed_labels),
            "versions_deleted": old_versions,
            "versions_kept": kept,
            "tmp_deleted": len(stale_tmp),
            "summaries_deleted": len(summaries),
            "dry_run": dry_run,
        }

    def _summaries_of(self, parts: list[str]) -> list[str]:
        """The report's summaries (summary_record) of these parts, as paths."""
        root = self.join(SUMMARIES_DIR)
        if not parts or not self.fs.exists(root):
            return []
        self.fs.invalidate_cache(root)
        doomed = {posixpath.splitext(p)[0] for p in parts}
        return [path for path in self.fs.find(root) if summarised_part(path[len(root) + 1 :]) in doomed]

    # ---- edit calibration -----------------------------------------------------------
    def edit_calibration(self, snapshot: Snapshot) -> pa.Table | None:
        """The edit calibration for the snapshot's inference key (EDIT_CALIBRATION_SCHEMA,
        pipeline/core/schemas.py, with its metadata), or None when none was written."""
        path = self.join(calibration_record(snapshot.inference_key))
        try:
            return retry(lambda: self._read_part(path, None), what=path)
        except FileNotFoundError:
            return None

    def has_edit_calibration(self, inference_key: str) -> bool:
        return self.exists(calibration_record(inference_key))

    def write_edit_calibration(self, inference_key: str, table: pa.Table) -> str:
        """Write (atomically, replacing any) the calibration file of an inference key."""
        relative = calibration_record(inference_key)
        write_atomic(self.full_uri(relative), table=table, storage_options=self.storage_options)
        return relative

    # ---- run records -------------------------------------------------------------
    def write_input_manifest(self, run_id: str, manifest: pa.Table) -> str:
        """The listing a run works from (uri, source_size, etag, mtime), written first."""
        relative = posixpath.join(MANIFESTS_DIR, f"{run_id}.parquet")
        self.mark()
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
    mtime: Any = info.get("mtime", info.get("LastModified"))
    return mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime or 0)


def commit_version(
    table: TagTable,
    base: Snapshot | None,
    files: list[str] | tuple[str, ...],
    *,
    model_sha256: str,
    inference_key: str,
    rules_key: str,
    run_id: str,
    model_name: str,
    rules: RulesRecord = RulesRecord(),
    counts: VersionCounts = VersionCounts(),
    expected_rows: int | None = None,
    rows: int | None = None,
    labels: dict[str, str] | None = None,
) -> Snapshot:
    """The one way every writer (tag, rethreshold, compare-tags) commits a version on top
    of `base`, then creates its record exclusively. expected_rows: the rows are counted
    from the parts' footers and must be these (the tag job: one row per listed image);
    rows: the count the writer already knows (rethreshold's parts reported theirs);
    labels: each labelled part's labels file (labels.py), written already."""
    labels = labels or {}
    strays = sorted(set(labels) - set(files))
    if strays:
        raise ValueError(f"labels name parts the version does not have ({strays[0]}); nothing committed")
    if rows is None:
        with ThreadPoolExecutor(READ_THREADS) as pool:  # footers only; object stores are latency-bound
            rows = sum(pool.map(lambda file: table.read_part_metadata(file).num_rows, files))
    if expected_rows is not None and rows != expected_rows:
        raise RuntimeError(
            f"the new version would hold {counted(rows, 'rows')}, not {expected_rows}; nothing committed"
        )
    snapshot = Snapshot(
        version=(base.version if base else 0) + 1,
        files=tuple(sorted(files)),
        rows=rows,
        model_sha256=model_sha256,
        inference_key=inference_key,
        rules_key=rules_key,
        run_id=run_id,
        committed_at=now_iso(),
        model_name=model_name,
        rules=rules,
        counts=counts,
        labels=dict(labels),
    )
    return table.commit(base, snapshot)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def is_tag_table(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem_for(uri, storage_options)
    return fs.exists(posixpath.join(path.rstrip("/"), CURRENT))


def read_current(
    uri: str,
    storage_options: dict | None = None,
    columns: list[str] | None = None,
    version: int | None = None,
) -> pa.Table:
    """The tag table at its current version (or at `version`): one row per image."""
    table = TagTable(uri, storage_options)
    return table.read(table.snapshot(version), columns)


def current_files(uri: str, storage_options: dict | None = None, version: int | None = None) -> list[str]:
    """Full URIs of the parts that make the table, for any Parquet reader."""
    table = TagTable(uri, storage_options)
    return [table.full_uri(f) for f in table.snapshot(version).files]


class VacuumSettings(SettingsModel):
    """What `tagpipe vacuum` takes (its options come from these fields; TagTable.vacuum says why)."""

    tags: Annotated[
        str, Field(min_length=1, description="a tag table (local or `s3://`)"), Setting(KeyRole.NONE)
    ]
    keep_versions: Annotated[
        int,
        Field(ge=1, description="keep the parts of this many newest versions (the current one always)"),
        Setting(KeyRole.NONE),
    ] = 2
    grace_hours: Annotated[
        float,
        Field(
            ge=0,
            description="never delete unnamed parts younger than this: a running job may still commit them",
        ),
        Setting(KeyRole.NONE),
    ] = 24.0
    storage_options: StorageOptions
