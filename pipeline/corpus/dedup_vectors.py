"""Dedup's embedding signal, brought up to date from the index's last version.

Only rows that are new or changed since the index's version have their embeddings read;
their vectors are collapsed by digest (identical vectors share an entry, in this run and
with every earlier one), the new entries are coded into a new segment with the index's
trained codebooks, and only they are searched (against every live entry). Edges of the
earlier versions are kept while both ends live. A full build (`--full`, no usable index,
another model's table, an index outgrown 4x, or a threshold below the one searched at)
reads every row and searches every entry.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.arrays import unique_sorted
from pipeline.corpus import vector_index
from pipeline.corpus.corpus_rows import CorpusRows
from pipeline.corpus.duplicate_index import (
    ENTRIES_SCHEMA,
    INDEX_FORMAT,
    DuplicateIndex,
    IndexVersion,
    SegmentVectors,
)
from pipeline.corpus.embedding_evidence import decide, positives_found, sampled_recall
from pipeline.corpus.embedding_threshold import EmbeddingThreshold
from pipeline.corpus.index_partitions import PartitionedIndex, Placement
from pipeline.corpus.index_segments import DIGEST, Staged, discard, stage_rows, write_segments
from pipeline.corpus.vector_index import IndexLayout

log = logging.getLogger(__name__)
INCREMENTAL_PROBES = 4


@dataclass(frozen=True)
class VectorFacts:
    """What the embedding side of a dedup run read, searched and kept (dedup's summary
    keeps these flat in its `index`, beside the run's version and mode)."""

    rows: int = 0
    rows_read: int = 0  # embeddings read: new and changed rows (every row at a full build)
    new_entries: int = 0
    entries: int = 0  # live distinct vectors
    entries_searched: int = 0
    pairs_compared: int = 0
    reranked: int = 0
    edges_kept: int = 0  # the last version's edges kept (both ends live)
    edges_new: int = 0
    partitions: tuple[Placement, ...] = ()
    index_seconds: float = 0.0
    search_seconds: float = 0.0
    recall_check_seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "partitions": [asdict(p) for p in self.partitions]}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> VectorFacts:
        """From a summary's `index` (its other keys left out; one written before a field
        existed reads it as the default)."""
        given = {k: v for k, v in (record or {}).items() if k in cls.__dataclass_fields__}
        given["partitions"] = tuple(Placement(**p) for p in given.get("partitions") or ())
        return cls(**given)


@dataclass
class VectorUpdate:
    """Per row its entry (-1: none), the live entries' edges, and how they were found."""

    entry: np.ndarray
    pair_a: np.ndarray
    pair_b: np.ndarray
    cosine: np.ndarray
    decision: EmbeddingThreshold
    layout: IndexLayout | None = None
    trained: str = ""
    segments: list[str] = field(default_factory=list)
    entries: pa.Table | None = None
    next_entry: int = 0
    facts: VectorFacts = field(default_factory=VectorFacts)


def reuse_reason(base: IndexVersion | None, rows: CorpusRows, setting, full: bool) -> str:
    """Why the index's last version cannot be updated in place ("" when it can)."""
    if full:
        return "--full asked"
    if base is None:
        return "no index yet"
    if base.format != vector_index_format():
        return "an index of an older format"
    key = (rows.parts.snapshot.inference_key if rows.parts.snapshot else "") or ""
    if (base.table.inference_key or "") != key:
        return "the table's model or preprocessing changed"
    kept = base.threshold.threshold
    if kept is None:
        return "the last index has no embedding threshold"
    if setting != "auto" and setting < (base.threshold.floor or kept) - 1e-9:
        return f"--embedding-threshold {setting} is below the {kept:.4f} the index was searched at"
    if setting == "auto" and base.threshold.chosen_by == "given":
        return "auto asked of an index built with a given threshold"
    return ""


def vector_index_format() -> int:
    return INDEX_FORMAT


def update_vectors(
    rows: CorpusRows,
    index: DuplicateIndex,
    base: IndexVersion | None,
    setting: float | str | None,
    groups: np.ndarray,
    run_id: str,
    edits: dict[str, np.ndarray] | None = None,
    version: int = 1,
    partitions: int = 1,
    ray_address: str | None = None,
) -> VectorUpdate:
    """The embedding side of a dedup run. groups: each row's component by sha256 and phash
    (known copies: left out of the negatives, and the positives when no edits exist);
    version: the index version this run will commit (where a recall check was made);
    partitions: the index's segments are searched as this many partitions, Ray actors
    spread over the cluster when more than one (pipeline/corpus/index_partitions.py)."""
    if setting is None or not rows.has_embedding:
        reason = "--embedding-threshold off" if setting is None else "the table has no embedding column"
        empty = np.zeros(0, np.int64)
        off = EmbeddingThreshold(None, "off", reason=reason)
        return VectorUpdate(np.full(rows.count, -1, np.int64), empty, empty, np.zeros(0, np.float32), off)
    previous = _previous(index, base, rows)
    read = np.flatnonzero(previous.needs)
    entry, staged = stage_rows(rows, read, previous, index)
    new_ids = staged.new_ids
    alive = unique_sorted(entry[entry >= 0])
    update = VectorUpdate(entry, *_empty_pairs(), EmbeddingThreshold(None, "auto"))
    update.next_entry = previous.next_entry + len(new_ids)
    update.facts = VectorFacts(rows=rows.count, rows_read=int(len(read)), new_entries=int(len(new_ids)))
    if not len(alive):
        discard(staged)
        update.decision = EmbeddingThreshold(None, "off", reason="no row has a usable embedding")
        return update
    started = time.monotonic()
    pieces = 1 if previous.base_used else partitions
    base_used = base if previous.base_used else None
    layout, segment_of = write_segments(update, index, base_used, staged, len(alive), run_id, pieces)
    reader = SegmentVectors(index, update.segments, layout.dim)
    update.entries = _entries_table(entry, previous, segment_of, staged)
    sizes = np.bincount(update.entries.column("segment").to_numpy(), minlength=len(update.segments))
    searched = PartitionedIndex.open(
        index, update.segments, sizes.tolist(), layout.dim, partitions, ray_address
    )
    update.facts = replace(
        update.facts, index_seconds=round(time.monotonic() - started, 2), partitions=searched.placement()
    )
    try:
        if not previous.base_used:
            layout = update.layout = _screened(searched, layout, alive, reader)
        update.decision = decide(
            setting, base_used, searched, layout, alive, reader, entry, groups, rows.count, edits
        )
        queries = alive if not previous.base_used else np.intersect1d(new_ids, alive)
        if update.decision.threshold is None:
            return update
        if update.decision.floor is None:
            update.decision.floor = update.decision.threshold
        found = _search(update, searched, layout, queries, reader, alive, previous)
    finally:
        searched.close()
    started = time.monotonic()
    measured = dict(base.threshold.search_recall) if previous.base_used and base else {}
    if not measured.get("queries"):  # an exact check reads every vector: at full builds only
        floor = update.decision.floor
        measured = {**sampled_recall(layout, queries, alive, reader, found, floor), "index_version": version}
    if previous.base_used and measured.get("hash_confirmed_reaching") is not None:
        update.decision.search_recall = measured  # an update carries the full build's checks
    else:
        update.decision.search_recall = {**measured, **positives_found(update, entry, groups, reader)}
    update.facts = replace(update.facts, recall_check_seconds=round(time.monotonic() - started, 2))
    return update


def _search(update: VectorUpdate, searched, layout, queries, reader, alive, previous: _Previous):
    """The queries' neighbours at the floor; the update's edges, merged with the kept ones."""
    started = time.monotonic()
    is_live = _membership(alive)
    floor = float(update.decision.floor or 0.0)  # set by the caller before the search
    found = vector_index.search(
        searched, _searching(layout, previous.base_used), queries, reader, floor, is_live
    )
    update.facts = replace(
        update.facts,
        search_seconds=round(time.monotonic() - started, 2),
        entries=int(len(alive)),
        entries_searched=int(len(queries)),
        pairs_compared=int(found.compared),
        reranked=int(found.reranked),
    )
    _merge_pairs(update, previous, found, is_live, floor)
    return found


def _searching(layout: IndexLayout, incremental: bool) -> IndexLayout:
    """An update's few queries probe INCREMENTAL_PROBES x the cells: a full build finds a pair
    from either row's query, an update only from the new row's, so it looks wider."""
    if not incremental or layout.kind == "flat":
        return layout
    return replace(layout, probes=min(layout.lists, INCREMENTAL_PROBES * layout.probes))


# ---- the previous version -------------------------------------------------------------


@dataclass
class _Previous:
    needs: np.ndarray  # rows whose embedding must be read
    entry: np.ndarray  # rows' entries kept from the previous version (-1: none)
    digests: np.ndarray  # DIGEST of every earlier entry, sorted
    digest_entries: np.ndarray  # their entry ids, in that order
    entries: pa.Table | None
    pairs: tuple
    next_entry: int
    base_used: bool


def _previous(index: DuplicateIndex, base: IndexVersion | None, rows: CorpusRows) -> _Previous:
    n = rows.count
    if base is None or not base.trained:
        nothing = np.zeros(0, DIGEST)
        return _Previous(
            np.ones(n, bool),
            np.full(n, -1, np.int64),
            nothing,
            np.zeros(0, np.int64),
            None,
            _empty_pairs(),
            0,
            False,
        )
    state = index.read_table(base.state, ["uri", "sha256", "entry"])
    at = pc.index_in(rows.uri, state.column("uri"))
    known = at.is_valid().to_numpy(zero_copy_only=False)
    position = at.fill_null(0).to_numpy().astype(np.int64)
    old_sha = state.column("sha256").take(pa.array(position))
    same = known & pc.fill_null(pc.equal(old_sha, rows.sha256), False).to_numpy(zero_copy_only=False)
    old_entry = state.column("entry").fill_null(-1).to_numpy()[position]
    entry = np.where(same, old_entry, -1)
    needs = ~same | ((entry < 0) & rows.ok)
    entries = index.read_table(base.entries)
    digests = np.empty(entries.num_rows, DIGEST)
    digests["hi"] = entries.column("digest_hi").to_numpy()
    digests["lo"] = entries.column("digest_lo").to_numpy()
    order = np.argsort(digests, order=("hi", "lo"))
    edges = index.read_table(base.edges)
    emb = edges.filter(pc.equal(edges.column("signal"), "embedding"))
    pairs = tuple(emb.column(c).to_numpy(zero_copy_only=False) for c in ("a", "b", "cosine"))
    return _Previous(
        needs,
        entry,
        digests[order],
        entries.column("entry").to_numpy()[order],
        entries,
        pairs,
        base.next_entry,
        True,
    )


def _empty_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)


def _membership(alive: np.ndarray):
    def is_live(ids: np.ndarray) -> np.ndarray:
        at = np.searchsorted(alive, ids)
        return (at < len(alive)) & (alive[np.minimum(at, len(alive) - 1)] == ids)

    return is_live


def _screened(faiss_index, layout: IndexLayout, alive: np.ndarray, reader) -> IndexLayout:
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(alive, size=min(len(alive), 1_000), replace=False))
    return vector_index.calibrate_screen(faiss_index, layout, sample, reader)


# ---- edges --------------------------------------------------------------------------------
def _merge_pairs(update: VectorUpdate, previous: _Previous, found, is_live, floor: float) -> None:
    a0, b0, c0 = previous.pairs
    keep = is_live(a0) & is_live(b0) & (c0 >= floor) if len(a0) else np.zeros(0, bool)
    low, high = np.minimum(found.query, found.found), np.maximum(found.query, found.found)
    a = np.r_[a0[keep], low]
    b = np.r_[b0[keep], high]
    c = np.r_[c0[keep], np.minimum(found.cosine, 1.0)].astype(np.float32)
    if len(a):
        _, first = np.unique(a * (int(b.max()) + 1) + b, return_index=True)
        a, b, c = a[first], b[first], c[first]
    update.pair_a, update.pair_b, update.cosine = a, b, c
    update.facts = replace(update.facts, edges_kept=int(keep.sum()), edges_new=int(len(a) - keep.sum()))


def _entries_table(entry, previous: _Previous, segment_of: np.ndarray, staged: Staged) -> pa.Table:
    """Every entry ever indexed (dead ones with 0 rows stay: their codes are in a segment)."""
    new_ids = staged.new_ids
    live = np.bincount(entry[entry >= 0], minlength=previous.next_entry + len(new_ids))
    old = previous.entries

    def old_column(name, dtype):
        return old.column(name).to_numpy() if old is not None else np.zeros(0, dtype)

    ids = np.r_[old_column("entry", np.int64), new_ids]
    return pa.table(
        {
            "entry": pa.array(ids, pa.int64()),
            "digest_hi": pa.array(np.r_[old_column("digest_hi", np.uint64), staged.new_digests["hi"]]),
            "digest_lo": pa.array(np.r_[old_column("digest_lo", np.uint64), staged.new_digests["lo"]]),
            "rows": pa.array(live[ids].astype(np.int32)),
            "segment": pa.array(np.r_[old_column("segment", np.int32), segment_of].astype(np.int32)),
        },
        schema=ENTRIES_SCHEMA,
    )
