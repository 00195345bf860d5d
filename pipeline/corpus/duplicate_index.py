"""The near-duplicate index: what dedup knows about a table, kept between runs, versioned.

A dedup output folder holds, beside clusters.parquet and edges.parquet,

    _index/versions/<N>.json   version N: the table version it indexes, the files below
    _index/_current.json       a copy of the newest version record (the commit point)
    _index/trained-<run>.faiss the cells and codebooks (pipeline/corpus/vector_index.py)
    _index/segments/seg-<run>.faiss / .vectors / .ids.npy
                               the vectors one run added: FAISS codes, float16 unit vectors
                               (for exact re-ranking), and [entry id, row in .vectors]
    _index/state-<run>.parquet one row per table row: uri, sha256, phash, phash_usable, entry
    _index/entries-<run>.parquet one row per distinct vector: entry id, digest, live rows
    _index/edges-<run>.parquet embedding edges between entries, phash pairs between hashes

Every file is written once under a name no other run uses, and becomes part of the
index only when a version record naming it is created, exclusively (one of two racing
runs wins, as a tag table's commit does: pipeline/table/tag_table.py). A run killed
before that leaves the previous version whole; its files are orphans that nothing reads.

Vectors are collapsed before they are indexed: rows whose float16 embeddings are
identical share one entry (its digest is the key), so K identical rows cost one search
and give K-1 edges, not K^2.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import TagpipeError
from pipeline.corpus.embedding_threshold import EmbeddingThreshold
from pipeline.corpus.vector_index import IndexLayout
from pipeline.storage.filesystem import create_exclusive, filesystem_for, is_local, retry, write_atomic
from pipeline.storage.outputs import mark_output

INDEX_DIR = "_index"
CURRENT = "_current.json"
INDEX_FORMAT = 1  # bumped when the files change meaning: an index of another format is rebuilt

STATE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        ("sha256", pa.string()),
        ("phash", pa.uint64()),  # null when the row has none
        ("phash_usable", pa.bool_()),  # a hash that carries detail (duplicate_signals.hash_reliability)
        ("entry", pa.int64()),  # its distinct vector; null without a usable embedding
    ]
)
ENTRIES_SCHEMA = pa.schema(
    [
        pa.field("entry", pa.int64(), nullable=False),
        ("digest_hi", pa.uint64()),  # blake2b-128 of the float16 unit vector's bytes
        ("digest_lo", pa.uint64()),
        ("rows", pa.int32()),  # live rows with this vector; 0: dead, skipped by searches
        ("segment", pa.int32()),  # index into the version's segments
    ]
)
INDEX_EDGES_SCHEMA = pa.schema(
    [
        ("signal", pa.string()),  # embedding: a, b are entries; phash: a, b are hash values
        ("a", pa.int64()),
        ("b", pa.int64()),
        ("cosine", pa.float32()),  # embedding edges
        ("distance", pa.int16()),  # phash pairs
    ]
)


@dataclass(frozen=True)
class IndexedTable:
    """What an index version says of the tag table it indexes (its `table`)."""

    uri: str = ""
    version: int = 0
    run_id: str = ""
    inference_key: str | None = ""  # None: the table's version recorded none

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> IndexedTable:
        return cls(**_known(cls, record))


@dataclass(frozen=True)
class IndexCounts:
    """What an index version holds: table rows, and live distinct vectors (its `counts`)."""

    rows: int = 0
    entries: int = 0

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> IndexCounts:
        return cls(**_known(cls, record))


def _known(cls, record: dict[str, Any] | None) -> dict[str, Any]:
    """The fields of a stored record this tagpipe knows (others, from a newer one, left out)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in (record or {}).items() if k in names}


@dataclass(frozen=True)
class IndexVersion:
    """One committed state of the index. Files are relative to the index folder.

    Stored as JSON with the nested records as plain objects (`layout` {} when no row had
    an embedding); from_json reads a version an older tagpipe wrote, a field it lacks
    taking its default here, in one place."""

    version: int
    run_id: str
    committed_at: str
    table: IndexedTable
    layout: IndexLayout | None  # None when no row had an embedding
    trained: str  # "" when no vectors are indexed
    segments: tuple[str, ...]  # segment names (each has .faiss, .vectors, .ids.npy)
    state: str
    entries: str
    edges: str
    next_entry: int
    threshold: EmbeddingThreshold  # the embedding threshold's decision
    max_distance: int
    format: int = INDEX_FORMAT
    counts: IndexCounts = field(default_factory=IndexCounts)

    def record(self) -> dict[str, Any]:
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "table": asdict(self.table),
            "layout": self.layout.record() if self.layout else {},
            "segments": list(self.segments),
            "threshold": self.threshold.record(),
            "counts": asdict(self.counts),
        }

    def to_json(self) -> bytes:
        return json.dumps(self.record(), indent=1, sort_keys=True).encode()

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> IndexVersion:
        given = _known(cls, record)
        return cls(
            **{
                **given,
                "table": IndexedTable.from_record(record.get("table")),
                "layout": IndexLayout.from_record(record["layout"]) if record.get("layout") else None,
                "segments": tuple(record.get("segments") or ()),
                "threshold": EmbeddingThreshold.from_record(record.get("threshold")),
                "counts": IndexCounts.from_record(record.get("counts")),
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> IndexVersion:
        return cls.from_record(json.loads(data))


# what a dedup output holds at its root (dedup.py writes the first three)
DEDUP_ENTRIES = ("clusters.parquet", "edges.parquet", "_summary.json", INDEX_DIR)


class DuplicateIndex:
    """The `_index` folder of a dedup output: versions, and the files they name."""

    def __init__(self, output: str, storage_options: dict | None = None, cache: str | None = None):
        self.output = output
        self.uri = posixpath.join(output.rstrip("/"), INDEX_DIR)
        self.storage_options = storage_options or {}
        self.fs, self.path = filesystem_for(self.uri, storage_options)
        self.local = is_local(self.fs)
        self.cache = cache or os.environ.get("TAGPIPE_CACHE") or os.path.expanduser("~/.cache/tagpipe")
        self._marked = False

    def _mark(self) -> None:
        """The dedup output is tagpipe's, all of it: marked before its first file, so no
        listing of a folder holding it takes the index for images (storage/outputs.py)."""
        if not self._marked:
            mark_output(self.output, "dedup", self.storage_options, writes=DEDUP_ENTRIES)
            self._marked = True

    def join(self, relative: str) -> str:
        return posixpath.join(self.path, relative)

    def full_uri(self, relative: str) -> str:
        return posixpath.join(self.uri, relative)

    # ---- versions ------------------------------------------------------------------
    def current(self) -> IndexVersion | None:
        """The newest committed version (a record newer than _current.json included)."""
        found = self._read(CURRENT)
        while True:
            newer = self._read(_version_name((found.version if found else 0) + 1))
            if newer is None:
                return found
            found = newer

    def _read(self, relative: str) -> IndexVersion | None:
        try:
            data = retry(lambda: self.fs.cat_file(self.join(relative)), what=relative)
        except FileNotFoundError:
            return None
        return IndexVersion.from_json(data)

    def commit(self, base: IndexVersion | None, version: IndexVersion) -> IndexVersion:
        """Make version (base + 1) current; refused if another run committed it first."""
        expected = (base.version if base else 0) + 1
        if version.version != expected:
            raise ValueError(f"index version {version.version} cannot follow {expected - 1}")
        data = version.to_json()
        self._mark()
        if not create_exclusive(self.full_uri(_version_name(version.version)), data, self.storage_options):
            raise TagpipeError(
                f"{self.uri}: another dedup run committed index version {version.version} while this one "
                "worked; its outputs stand, and running this command again updates them"
            )
        write_atomic(self.full_uri(CURRENT), data, storage_options=self.storage_options)
        return version

    # ---- files ---------------------------------------------------------------------
    def write_table(self, relative: str, table: pa.Table) -> str:
        self._mark()
        write_atomic(self.full_uri(relative), table=table, storage_options=self.storage_options)
        return relative

    def read_table(self, relative: str, columns: list[str] | None = None) -> pa.Table:
        def read():
            with self.fs.open(self.join(relative), "rb") as handle:
                return pq.read_table(handle, columns=columns)

        return retry(read, what=relative)

    def write_bytes(self, relative: str, data: bytes) -> str:
        self._mark()
        write_atomic(self.full_uri(relative), data, storage_options=self.storage_options)
        return relative

    def read_bytes(self, relative: str) -> bytes:
        return retry(lambda: self.fs.cat_file(self.join(relative)), what=relative)

    def put_file(self, local_path: str, relative: str) -> str:
        """Move a finished local file into the index (uploaded to an object store)."""
        if self.local:
            target = self.join(relative)
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            os.replace(local_path, target)
        else:
            retry(lambda: self.fs.put_file(local_path, self.join(relative)), what=relative)
            os.unlink(local_path)
        return relative

    def local_path(self, relative: str) -> str:
        """A local path to read a file from: the file itself, or a cached download (index
        files never change under a name, so a cached copy is good until deleted)."""
        if self.local:
            return self.join(relative)
        cached = os.path.join(self.cache, "index", self.path.replace("/", "_"), relative.replace("/", "_"))
        if not os.path.exists(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            tmp = f"{cached}.tmp-{os.getpid()}"
            retry(lambda: self.fs.get_file(self.join(relative), tmp), what=relative)
            os.replace(tmp, cached)
        return cached

    def staging(self) -> str:
        """A local folder for files being written (inside the index when it is local, so
        the final move is a rename)."""
        if self.local:
            folder = self.join("segments")
            os.makedirs(folder, exist_ok=True)
            return tempfile.mkdtemp(prefix=".tagpipe.tmp-", dir=folder)
        return tempfile.mkdtemp(prefix="tagpipe-index-")


def _version_name(version: int) -> str:
    return posixpath.join("versions", f"{version:012d}.json")


def record_table(uri: str, snapshot) -> IndexedTable:
    """What an index version says of the table it indexes."""
    if snapshot is None:
        return IndexedTable(uri)
    return IndexedTable(uri, snapshot.version, snapshot.run_id, snapshot.inference_key)


class RowFile:
    """A raw file of float16 rows, read on demand with positioned reads: only the rows asked
    for enter memory (a memory map would count every page it touched as resident)."""

    def __init__(self, path: str, dim: int):
        self.path, self.dim = path, dim
        self.row_bytes = 2 * dim

    def __len__(self) -> int:
        return os.path.getsize(self.path) // self.row_bytes if self.dim else 0

    def __getitem__(self, positions) -> np.ndarray:
        positions = np.asarray(positions, np.int64).reshape(-1)
        out = np.empty((len(positions), self.dim), np.float16)
        if not len(positions):
            return out
        order = np.argsort(positions, kind="stable")
        ranked = positions[order]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1] + 1])  # runs of consecutive rows
        ends = np.r_[starts[1:], len(ranked)]
        with open(self.path, "rb", buffering=0) as handle:
            for first, last in zip(starts.tolist(), ends.tolist()):
                data = os.pread(
                    handle.fileno(), (last - first) * self.row_bytes, int(ranked[first]) * self.row_bytes
                )
                out[order[first:last]] = np.frombuffer(data, np.float16).reshape(last - first, self.dim)
        return out


class SegmentVectors:
    """Reads the float16 unit vectors of any entries from the version's segment files,
    row by row (only the rows asked for enter memory)."""

    def __init__(self, index: DuplicateIndex, segments: list[str], dim: int):
        self.dim = dim
        self.paths = [index.local_path(f"segments/{s}.vectors") for s in segments]
        self.maps = [np.load(index.local_path(f"segments/{s}.ids.npy")) for s in segments]

    def __call__(self, entries: np.ndarray) -> np.ndarray:
        entries = np.asarray(entries, np.int64)
        out = np.zeros((len(entries), self.dim), np.float16)
        remaining = np.ones(len(entries), bool)
        for path, mapping in zip(self.paths, self.maps):
            ids, rows_at = mapping[:, 0], mapping[:, 1]
            if not len(ids) or not remaining.any():
                continue
            position = np.minimum(np.searchsorted(ids, entries), len(ids) - 1)
            inside = remaining & (ids[position] == entries)
            if inside.any():
                out[inside] = RowFile(path, self.dim)[rows_at[position[inside]]]
                remaining &= ~inside
        if remaining.any():
            raise RuntimeError(f"{int(remaining.sum())} index entries have no stored vector")
        return out

    def scan(self, wanted: np.ndarray, block: int = 50_000):
        """(ids, vectors) of the wanted entries (sorted ids), reading each segment's file
        in order, a block of rows at a time: every vector once, no random reads."""
        for path, mapping in zip(self.paths, self.maps):
            file = RowFile(path, self.dim)
            row_to_id = np.full(len(file), -1, np.int64)
            row_to_id[mapping[:, 1]] = mapping[:, 0]
            at = np.minimum(np.searchsorted(wanted, row_to_id), max(len(wanted) - 1, 0))
            keep = (row_to_id >= 0) & (wanted[at] == row_to_id) if len(wanted) else row_to_id < -1
            for start in range(0, len(file), block):
                mine = np.flatnonzero(keep[start : start + block]) + start
                if len(mine):
                    yield row_to_id[mine], file[mine]
