"""The audit's embedding signal from dedup's index, checking only what changed since last time.

A split is made from a dedup output, whose index (pipeline/corpus/duplicate_index.py)
already holds every row's vector. So a split's audit needs no index of its own: eval
vectors are searched in it with only train vectors allowed as candidates (FAISS scans
with an ID selector: no train-train and no eval-eval pair is scored).

Between runs the audit keeps, beside its leaks, what it found for each eval vector
(`_state/`). The next run searches only
- eval vectors it has not checked (new images, or images moved out of train), and those
  whose nearest train vector left train;
- and the new train vectors, against the eval vectors: an eval vector within the
  threshold of one is checked again.
Every other eval vector's answer stands: no train vector near it has arrived or left. A
rebuilt index (new entry ids), another threshold or another radius starts afresh.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.arrays import unique_sorted
from pipeline.corpus import vector_index
from pipeline.corpus.duplicate_index import DuplicateIndex, SegmentVectors
from pipeline.corpus.embedding_threshold import EmbeddingThreshold, IndexSearch
from pipeline.storage.filesystem import filesystem_for, write_atomic
from pipeline.storage.outputs import mark_output

STATE = "_state"
AUDIT_ENTRIES = ("leaks.parquet", "audit.json", STATE)  # what an audit output holds at its root


@dataclass
class IndexedLeaks:
    """Per eval row its nearest train row at the threshold (-1: none), and the work done."""

    eval_row: np.ndarray
    train_row: np.ndarray
    cosine: np.ndarray
    checked: np.ndarray  # eval rows the embedding checked (they have a vector)
    train_usable: int
    decision: EmbeddingThreshold  # given, with what the search in the index covered (its index)


def leaks_in_index(
    dedup: str,
    train_uris: pa.Array,
    eval_uris: pa.Array,
    threshold: float,
    output: str | None,
    storage_options: dict | None = None,
) -> IndexedLeaks | None:
    """Embedding leaks of these eval rows among these train rows, from dedup's index; None
    when the index has no vectors (the caller audits without it)."""
    index = DuplicateIndex(dedup, storage_options)
    version = index.current()
    if version is None or not version.trained or version.layout is None:
        return None
    state = index.read_table(version.state, ["uri", "entry"])
    t_entry, e_entry = (_entries(state, uris) for uris in (train_uris, eval_uris))
    train, evaluation = unique_sorted(t_entry[t_entry >= 0]), unique_sorted(e_entry[e_entry >= 0])
    layout = version.layout
    reader = SegmentVectors(index, list(version.segments), layout.dim)
    faiss_index = vector_index.open_index([index.read_bytes(f"segments/{s}.faiss") for s in version.segments])
    key = {"index": version.trained, "threshold": threshold}
    previous = _read_state(output, storage_options, key)
    nearest, searched = _update(faiss_index, layout, reader, train, evaluation, threshold, previous)
    if output:
        _write_state(output, storage_options, key, train, nearest)
    return _rows(nearest, t_entry, e_entry, threshold, searched)


def _entries(state: pa.Table, uris: pa.Array) -> np.ndarray:
    at = pc.index_in(uris, state.column("uri"))
    entry = state.column("entry").fill_null(-1).to_numpy()
    found = at.is_valid().to_numpy(zero_copy_only=False)
    return np.where(found, entry[at.fill_null(0).to_numpy().astype(np.int64)], -1)


@dataclass
class _Nearest:
    """For each eval entry (sorted), its nearest train entry at the threshold (-1: none)."""

    entry: np.ndarray
    train: np.ndarray
    cosine: np.ndarray

    def lookup(self, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(known mask, position) of entries among this record's eval entries."""
        at = np.minimum(np.searchsorted(self.entry, entries), max(len(self.entry) - 1, 0))
        known = (self.entry[at] == entries) if len(self.entry) else np.zeros(len(entries), bool)
        return known, at


def _update(faiss_index, layout, reader, train, evaluation, threshold, previous):
    """The nearest train entry of every eval entry, searching only those whose answer may
    have changed; and counts of what was searched."""
    old_train, old = previous if previous else (np.zeros(0, np.int64), _empty())
    known, at = old.lookup(evaluation)
    partner = np.where(known, old.train[at] if len(old.entry) else -1, -1)
    lost = known & np.isin(partner, np.setdiff1d(old_train, train, assume_unique=True))
    fresh_train = np.setdiff1d(train, old_train, assume_unique=True)
    near_new = np.zeros(0, np.int64)
    if len(fresh_train) and previous:  # eval vectors a new train vector reaches
        found = vector_index.search(faiss_index, layout, fresh_train, reader, threshold, allowed=evaluation)
        near_new = unique_sorted(found.found)
    redo = ~known | lost | np.isin(evaluation, near_new)
    queries = evaluation[redo]
    result = _Nearest(
        evaluation.copy(),
        np.where(redo, -1, partner),
        np.where(redo, 0.0, old.cosine[at] if len(old.entry) else 0.0),
    )
    shared = np.isin(evaluation, train)  # one vector on both sides: its own nearest, cosine 1
    result.train[shared], result.cosine[shared] = evaluation[shared], 1.0
    if len(queries) and len(train):
        found = vector_index.search(faiss_index, layout, queries, reader, threshold, allowed=train)
        order = np.lexsort((-found.cosine, found.query))
        query, other, cosine = found.query[order], found.found[order], found.cosine[order]
        first = np.r_[True, query[1:] != query[:-1]] if len(query) else np.zeros(0, bool)
        position = np.searchsorted(evaluation, query[first])
        take = ~shared[position]
        result.train[position[take]] = other[first][take]
        result.cosine[position[take]] = cosine[first][take]
    searched = IndexSearch(
        mode="incremental" if previous else "full",
        eval_vectors=int(len(evaluation)),
        train_vectors=int(len(train)),
        eval_searched=int(len(queries)),
        train_searched=int(len(fresh_train)) if previous else 0,
    )
    return result, searched


def _empty() -> _Nearest:
    return _Nearest(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def _rows(nearest: _Nearest, t_entry, e_entry, threshold, searched: IndexSearch) -> IndexedLeaks:
    train_rows = np.flatnonzero(t_entry >= 0)
    vectors, first = np.unique(t_entry[train_rows], return_index=True)  # each vector's first train row
    eval_rows = np.flatnonzero(e_entry >= 0)
    known, at = nearest.lookup(e_entry[eval_rows])
    partner = np.where(known, nearest.train[at], -1)
    slot = np.minimum(np.searchsorted(vectors, partner), max(len(vectors) - 1, 0))
    leak = (partner >= 0) & (vectors[slot] == partner) if len(vectors) else np.zeros(len(partner), bool)
    return IndexedLeaks(
        eval_rows[leak],
        train_rows[first[slot[leak]]],
        nearest.cosine[at[leak]].astype(np.float32),
        e_entry >= 0,
        int(len(train_rows)),
        EmbeddingThreshold(threshold, "given", index=searched),
    )


def _read_state(output: str | None, storage_options, key: dict):
    if not output:
        return None
    import pyarrow.parquet as pq

    root = posixpath.join(output.rstrip("/"), STATE)
    fs, path = filesystem_for(posixpath.join(root, "audit.json"), storage_options)
    if not fs.exists(path):
        return None
    record = json.loads(fs.cat_file(path))
    if record.get("key") != key:
        return None
    fs, table_path = filesystem_for(posixpath.join(root, record["file"]), storage_options)
    with fs.open(table_path, "rb") as handle:
        table = pq.read_table(handle)
    is_train = pc.equal(table.column("kind"), "train")
    train = table.filter(is_train).column("entry").to_numpy()
    evals = table.filter(pc.invert(is_train))
    order = np.argsort(evals.column("entry").to_numpy())
    nearest = _Nearest(*(evals.column(n).to_numpy()[order] for n in ("entry", "train", "cosine")))
    return np.sort(train), nearest


def _write_state(output: str, storage_options, key: dict, train: np.ndarray, nearest: _Nearest) -> None:
    import uuid

    n, m = len(train), len(nearest.entry)
    table = pa.table(
        {
            "kind": pa.array(["train"] * n + ["eval"] * m),
            "entry": pa.array(np.r_[train, nearest.entry], pa.int64()),
            "train": pa.array(np.r_[np.full(n, -1), nearest.train].astype(np.int64)),
            "cosine": pa.array(np.r_[np.zeros(n), nearest.cosine].astype(np.float32)),
        }
    )
    name = f"state-{uuid.uuid4().hex[:12]}.parquet"
    root = posixpath.join(output.rstrip("/"), STATE)
    fs, record_path = filesystem_for(posixpath.join(root, "audit.json"), storage_options)
    before = json.loads(fs.cat_file(record_path)).get("file") if fs.exists(record_path) else None
    mark_output(output, "audit", storage_options, writes=AUDIT_ENTRIES)  # before its first file
    write_atomic(posixpath.join(root, name), table=table, storage_options=storage_options)
    record = json.dumps({"key": key, "file": name}).encode()
    write_atomic(posixpath.join(root, "audit.json"), record, storage_options=storage_options)
    if before and before != name:  # the record no longer names it
        fs.rm(filesystem_for(posixpath.join(root, before), storage_options)[1])
