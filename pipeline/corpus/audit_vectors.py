"""The audit's embedding signal: eval images searched against an index of train images only.

Only eval-to-train pairs are leaks, so only the train vectors are indexed (collapsed by
digest: identical train vectors are one entry) and only eval vectors are queries: no
train-train and no eval-eval pair is ever scored. Vectors come from the side's own
embedding column, or, for a split output, from the tag table part by part (`Pieces`),
and are staged in a local temporary file, so a million-row split holds its vectors on
disk, never as a column in memory.

auto: as dedup chooses it (pipeline/corpus/embedding_threshold.py), over the train set:
negatives are sampled train queries' candidates in the train index, so the leaks being
looked for cannot raise the bar; known copies are train pairs sha256 or phash joined and
the leaks they found.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.corpus import embedding_threshold as thresholds
from pipeline.corpus import vector_index
from pipeline.corpus.corpus_rows import matrix_of
from pipeline.corpus.duplicate_index import RowFile
from pipeline.corpus.embedding_evidence import hash_confirmed_pairs
from pipeline.corpus.embedding_threshold import EmbeddingThreshold
from pipeline.corpus.index_segments import DIGEST, digests_of
from pipeline.table.reading import Pieces

Batches = Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]  # row positions, vectors, valid


BLOCK = 20_000  # rows whose embeddings are widened to floats at a time


def column_batches(table: pa.Table, block: int = BLOCK) -> Batches:
    """A side's own embedding column, a block at a time."""
    column = table.column("embedding")
    for start in range(0, table.num_rows, block):
        part = column.slice(start, block).combine_chunks()
        valid = part.is_valid().to_numpy(zero_copy_only=False)
        yield np.arange(start, start + len(part)), matrix_of(part, valid), valid


def part_batches(parts: Pieces, uris: pa.Array) -> Batches:
    """The embeddings of these uris from a table's parts, one part at a time."""
    for _, table in parts.stream(["uri", "embedding"], ahead=2):
        at = pc.index_in(table.column("uri"), uris)
        mine = at.is_valid().to_numpy(zero_copy_only=False)
        if not mine.any():
            continue
        rows = at.to_numpy(zero_copy_only=False)[mine].astype(np.int64)
        column = table.column("embedding").combine_chunks().filter(pa.array(mine))
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        for start in range(0, len(rows), BLOCK):  # a large part's float copies a block at a time
            end = start + BLOCK
            yield rows[start:end], matrix_of(column.slice(start, BLOCK), valid[start:end]), valid[start:end]


@dataclass
class Staged:
    """One side's usable vectors in a local file, as entries: identical vectors share one
    (collapse), else every usable row is its own. entry: per row (-1: none); at: each
    entry's row in the file; first_row: each entry's first row of the side."""

    path: str
    dim: int
    entry: np.ndarray
    at: np.ndarray
    first_row: np.ndarray

    def vectors_of(self, entries: np.ndarray) -> np.ndarray:
        return RowFile(self.path, self.dim)[self.at[np.asarray(entries, np.int64)]]


def stage(batches: Batches, rows: int, folder: str, name: str, collapse: bool) -> Staged:
    path = os.path.join(folder, name)
    positions, digests, dim = [], [], 0
    with open(path, "wb") as out:
        for rows_at, matrix, valid in batches:
            unit, usable = vector_index.unit_rows(matrix)
            usable &= valid
            dim = dim or unit.shape[1]
            out.write(np.ascontiguousarray(unit[usable]).tobytes())
            positions.append(rows_at[usable])
            digests.append(digests_of(unit[usable]) if collapse else np.zeros(int(usable.sum()), DIGEST))
    row = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    digest = np.concatenate(digests) if digests else np.zeros(0, DIGEST)
    order = np.argsort(row, kind="stable")  # entries numbered in row order: first rows first
    row, digest, stored_at = row[order], digest[order], order
    if collapse:
        _, first, inverse = np.unique(digest, return_index=True, return_inverse=True)
        ranked = np.argsort(first, kind="stable")
        renumber = np.empty(len(ranked), np.int64)
        renumber[ranked] = np.arange(len(ranked))
        first, ids = first[ranked], renumber[inverse.reshape(-1)]
    else:
        first, ids = np.arange(len(row)), np.arange(len(row))
    entry = np.full(rows, -1, np.int64)
    entry[row] = ids
    return Staged(path, dim, entry, stored_at[first], row[first])


@dataclass
class EmbeddingLeaks:
    eval_row: np.ndarray
    train_row: np.ndarray
    cosine: np.ndarray
    checked: np.ndarray  # eval rows the embedding could check
    train_usable: int
    decision: EmbeddingThreshold


def embedding_leaks(
    train: Batches,
    train_rows: int,
    evaluation: Batches,
    eval_rows: int,
    threshold: float | str,
    train_groups: np.ndarray,
) -> EmbeddingLeaks:
    """Per eval row its nearest train row at cosine >= the threshold. train_groups: each
    train row's sha256/phash component (known copies: not negatives, and the positives)."""
    with tempfile.TemporaryDirectory(prefix="tagpipe-audit-") as folder:
        t = stage(train, train_rows, folder, "train", collapse=True)
        e = stage(evaluation, eval_rows, folder, "eval", collapse=False)
        nothing = np.zeros(0, np.int64)
        if not len(t.first_row) or not len(e.first_row) or t.dim != e.dim:
            off = EmbeddingThreshold(None, "off", reason="no comparable embeddings on both sides")
            return EmbeddingLeaks(
                nothing, nothing, np.zeros(0, np.float32), np.zeros(eval_rows, bool), 0, off
            )
        layout = vector_index.layout_for(len(t.first_row), t.dim)
        ids = np.arange(len(t.first_row), dtype=np.int64)
        stored = RowFile(t.path, t.dim)
        sample = np.sort(
            np.random.default_rng(0).choice(ids, min(len(ids), 40 * max(layout.lists, 1)), False)
        )
        trained = vector_index.train(layout, np.asarray(stored[t.at[sample]], np.float32))
        index = vector_index.open_index([vector_index.encode_rows(trained, ids, stored, t.at)])
        layout = vector_index.calibrate_screen(index, layout, sample[:1000], t.vectors_of)
        decision = _decide(threshold, index, layout, t, train_groups, eval_rows)
        if decision.threshold is None:
            return EmbeddingLeaks(
                nothing, nothing, np.zeros(0, np.float32), np.zeros(eval_rows, bool), 0, decision
            )
        queries = np.arange(len(e.first_row), dtype=np.int64) + len(ids)  # apart from the train ids

        def eval_vectors(q: np.ndarray) -> np.ndarray:
            return e.vectors_of(q - len(ids))

        found = vector_index.search(
            index, layout, queries, t.vectors_of, decision.threshold, queries_of=eval_vectors
        )
        order = np.lexsort((-found.cosine, found.query))
        first = np.r_[True, found.query[order][1:] != found.query[order][:-1]] if len(order) else order
        best = order[first.astype(bool)] if len(order) else order
        checked = e.entry >= 0
        return EmbeddingLeaks(
            e.first_row[found.query[best] - len(ids)],
            t.first_row[found.found[best]],
            found.cosine[best],
            checked,
            int((t.entry >= 0).sum()),
            decision,
        )


def _decide(threshold, index, layout, t: Staged, groups: np.ndarray, eval_rows: int) -> EmbeddingThreshold:
    pairs = int(eval_rows * vector_index.compared_per_query(layout, index.ntotal))
    if threshold != "auto":
        decision = EmbeddingThreshold(
            min(float(threshold), thresholds.MAX_THRESHOLD), "given", pairs_compared=pairs
        )
        return decision
    ids = np.arange(index.ntotal, dtype=np.int64)
    sample = np.sort(np.random.default_rng(1).choice(ids, min(len(ids), thresholds.SAMPLE_QUERIES), False))
    from dataclasses import replace

    wide = replace(layout, neighbours=min(thresholds.SAMPLE_NEIGHBOURS, max(len(ids) - 1, 1)))
    found = vector_index.search(index, wide, sample, t.vectors_of, -1.0)
    group_of = np.full(len(ids), -1, np.int64)
    have = t.entry >= 0
    group_of[t.entry[have]] = groups[have]
    negatives = found.cosine[group_of[found.query] != group_of[found.found]]
    denominator = len(sample) * vector_index.compared_per_query(layout, len(ids))
    a, b = _group_pairs(t.entry, groups)
    positives = np.einsum("ij,ij->i", t.vectors_of(a).astype(np.float32), t.vectors_of(b).astype(np.float32))
    return thresholds.choose(negatives, denominator, pairs, eval_rows, positives, "hash-confirmed pairs")


def _group_pairs(entry: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct train entries in one sha256/phash group: each to its group's first entry."""
    return hash_confirmed_pairs(entry, groups)
