"""The vectors a dedup run adds to the index: read, collapsed by digest, coded into segments.

`stage_rows` reads the embeddings of the rows that need one (new or changed since the
index's version) into one local file of float16 unit rows, and gives each row its entry:
an earlier entry for a vector seen before (same blake2b-128 digest), else a new one shared
by the rows with its digest. `write_segments` codes the new entries with the index's
trained codebooks into new segments (pipeline/corpus/duplicate_index.py names the files):
one for an update, one per partition for a full build.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass

import numpy as np

from pipeline.corpus import vector_index
from pipeline.corpus.corpus_rows import CorpusRows
from pipeline.corpus.duplicate_index import DuplicateIndex, RowFile

DIGEST = np.dtype([("hi", "<u8"), ("lo", "<u8")])


@dataclass
class Staged:
    folder: str
    path: str  # every usable vector read, in read order (float16 unit rows)
    dim: int
    new_ids: np.ndarray  # new entries, ascending
    new_rows: np.ndarray  # the row of path holding each new entry's vector
    new_digests: np.ndarray  # DIGEST per new entry


def stage_rows(rows: CorpusRows, read: np.ndarray, previous, index: DuplicateIndex):
    """Each read row's entry (an earlier one for a vector seen before, else a new one shared by
    the rows with its digest), and the staged vectors."""
    folder = index.staging()
    path = os.path.join(folder, "vectors")
    row_parts, digest_parts, dim = [], [], 0
    with open(path, "wb") as out:
        for positions, matrix, valid in rows.embeddings(read):
            unit, usable = vector_index.unit_rows(matrix)
            usable &= valid
            dim = dim or unit.shape[1]
            out.write(np.ascontiguousarray(unit[usable]).tobytes())
            row_parts.append(positions[usable])
            digest_parts.append(digests_of(unit[usable]))
    read_rows = np.concatenate(row_parts) if row_parts else np.zeros(0, np.int64)
    digests = np.concatenate(digest_parts) if digest_parts else np.zeros(0, DIGEST)
    entry = previous.entry.copy()
    at = np.minimum(np.searchsorted(previous.digests, digests), max(len(previous.digests) - 1, 0))
    seen = (previous.digests[at] == digests) if len(previous.digests) else np.zeros(len(digests), bool)
    entry[read_rows[seen]] = previous.digest_entries[at[seen]]
    fresh, first, inverse = np.unique(digests[~seen], return_index=True, return_inverse=True)
    new_ids = previous.next_entry + np.arange(len(fresh), dtype=np.int64)
    entry[read_rows[~seen]] = new_ids[inverse.reshape(-1)]
    staged_rows = np.flatnonzero(~seen)[first]
    return entry, Staged(folder, path, dim, new_ids, staged_rows, fresh)


def digests_of(unit: np.ndarray) -> np.ndarray:
    """blake2b-128 of each float16 row's bytes, as sortable (hi, lo) pairs."""
    out = np.empty(len(unit), DIGEST)
    for i, vec in enumerate(unit):
        digest = hashlib.blake2b(vec.tobytes(), digest_size=16).digest()
        out[i] = (int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little"))
    return out


def write_segments(update, index, base, staged: Staged, alive: int, run_id: str, pieces: int = 1):
    """The layout after this run's new segments are added (update.trained and .segments set),
    and each new entry's segment number. pieces: a full build's entries are cut into this
    many segments (one per partition); an update adds one."""
    dim = staged.dim or (base.layout.dim if base and base.layout else 0)
    stored = RowFile(staged.path, dim) if dim and os.path.getsize(staged.path) else None
    if base is not None:
        update.layout = base.layout
        update.trained, update.segments = base.trained, list(base.segments)
    else:
        update.layout = vector_index.layout_for(alive, dim)
        update.trained = f"trained-{run_id}.faiss"
        sample = _sample_rows(
            stored, staged.new_rows, vector_index.TRAIN_PER_LIST * max(update.layout.lists, 1)
        )
        trained = vector_index.train(update.layout, sample)
        index.write_bytes(update.trained, trained)
    segment_of = np.zeros(len(staged.new_ids), np.int32)
    if stored is None or not len(staged.new_ids):
        discard(staged)
        return update.layout, segment_of
    if base is not None:  # a full build codes with the bytes it just trained, not a re-read
        trained = index.read_bytes(update.trained)
    if pieces < 2:
        _add_segment(
            update, index, trained, staged, stored, np.arange(len(staged.new_ids)), run_id, whole=True
        )
        segment_of[:] = len(update.segments) - 1
    else:  # consecutive rows of the staged file per segment: each piece's file is read in order
        by_row = np.argsort(staged.new_rows, kind="stable")
        for piece in np.array_split(by_row, pieces):
            if len(piece):
                _add_segment(update, index, trained, staged, stored, piece, run_id, whole=False)
                segment_of[piece] = len(update.segments) - 1
    discard(staged)
    return update.layout, segment_of


def _add_segment(update, index, trained, staged: Staged, stored, piece, run_id: str, whole: bool) -> None:
    """Code staged.new_ids[piece] into a new segment, with its vectors and id map. whole: the
    piece is every new entry, so the staged file itself becomes the segment's vectors."""
    name = f"seg-{run_id}-{uuid.uuid4().hex[:8]}"
    ids, rows = staged.new_ids[piece], staged.new_rows[piece]
    index.write_bytes(f"segments/{name}.faiss", vector_index.encode_rows(trained, ids, stored, rows))
    ids_path = os.path.join(staged.folder, "ids.npy")
    if whole:
        vectors_path, at = staged.path, rows.astype(np.int64)
    else:
        vectors_path, at = os.path.join(staged.folder, "piece.vectors"), np.arange(len(rows), dtype=np.int64)
        with open(vectors_path, "wb") as out:
            for start in range(0, len(rows), vector_index.PAIR_BLOCK):
                out.write(stored[rows[start : start + vector_index.PAIR_BLOCK]].tobytes())
    order = np.argsort(ids, kind="stable")  # SegmentVectors looks entries up by sorted id
    np.save(ids_path, np.stack([ids[order], at[order]], axis=1))
    index.put_file(vectors_path, f"segments/{name}.vectors")
    index.put_file(ids_path, f"segments/{name}.ids.npy")
    if not whole and os.path.exists(vectors_path):  # put_file moves a local file; a remote one is copied
        os.unlink(vectors_path)
    update.segments.append(name)


def _sample_rows(stored, rows: np.ndarray, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(rows, size=min(size, len(rows)), replace=False))
    return np.asarray(stored[pick], np.float32)


def discard(staged: Staged) -> None:
    if os.path.exists(staged.path):
        os.unlink(staged.path)
    if os.path.isdir(staged.folder) and not os.listdir(staged.folder):
        os.rmdir(staged.folder)
