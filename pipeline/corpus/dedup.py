"""`tagpipe dedup`: clusters of copies and near-duplicates from a tag output, kept up to date.

Three signals join images: the same sha256; phash within R bits between hashes that carry
detail (low-detail hashes match nothing and are counted by reason); and the tagger's
embedding at cosine >= a threshold, given or chosen per corpus (`auto`:
pipeline/corpus/embedding_threshold.py). The clusters are the connected components of a
graph whose nodes are the rows, their sha256 groups, their distinct hashes and their
distinct vectors, so K identical rows cost K edges, never K^2.

The output folder keeps a versioned index (pipeline/corpus/duplicate_index.py): the next
run reads only new and changed rows' embeddings and searches only their vectors and new
hashes (pipeline/corpus/dedup_vectors.py); the graph is then solved again over every
row (scipy, linear in rows and edges, seconds at 10M), so a deleted bridge splits its
cluster. `--full` rebuilds from scratch. cluster_id is the smallest sha256 in the
cluster, stable as long as that file stays; the representative is, by default
(`--representative first-seen`), the copy first seen in the tag table (its earliest
version: the original, not an edited copy made later), then the best copy: the most
pixels, then a lossless format, then the most bytes, then the smallest uri.

Why this module is long: the run and its report, a frozen record built once with its
`record()`/`from_record` pair (the _summary.json an older tagpipe wrote reads here), sit
together, so the summary's fields and the run that fills them are read in one place.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.arrays import unique_sorted
from pipeline.core.ray_session import new_run_id
from pipeline.core.schemas import EDGES_SCHEMA, conform
from pipeline.core.settings import build
from pipeline.core.words import counted
from pipeline.corpus.cluster_table import (
    Clusters,
    GiantCluster,
    cluster_table,
    first_seen,
    public_edges,
    report_giants,
)
from pipeline.corpus.corpus_rows import CorpusRows
from pipeline.corpus.dedup_settings import (
    DEFAULT_MAX_DISTANCE,
    DedupSettings,
    Representative,
    parse_embedding_threshold,  # noqa: F401  (importable here as before)
)
from pipeline.corpus.dedup_vectors import VectorFacts, VectorUpdate, reuse_reason, update_vectors
from pipeline.corpus.duplicate_index import (
    DEDUP_ENTRIES,
    ENTRIES_SCHEMA,
    INDEX_EDGES_SCHEMA,
    STATE_SCHEMA,
    DuplicateIndex,
    IndexCounts,
    IndexVersion,
    record_table,
)
from pipeline.corpus.duplicate_signals import (
    EMBEDDING,
    PHASH,
    SHA256,
    Edges,
    ExactSignals,
    exact_graph,
    exact_signals,
    hash_reliability,
    phash_edges,
    sha256_edges,
)
from pipeline.corpus.embedding_threshold import EmbeddingThreshold
from pipeline.storage.filesystem import write_atomic
from pipeline.storage.outputs import mark_output
from pipeline.storage.writable import check_writable
from pipeline.table.input_kinds import DEDUP, expect, expect_output
from pipeline.table.tag_table import now_iso

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexRun:
    """What a dedup run did with its index (the summary's `index`: these fields and the
    vectors' facts, flat): the version it committed, full or incremental and why."""

    version: int = 0  # 0: no index (a summary that recorded none)
    mode: str = ""  # full | incremental
    reason: str = ""  # why not incremental ("" when it was)
    hashes_searched: int = 0
    vectors: VectorFacts = field(default_factory=VectorFacts)
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds

    def record(self) -> dict[str, Any]:
        if not self.version:
            return {}
        own = {k: getattr(self, k) for k in ("version", "mode", "reason", "hashes_searched")}
        return {**own, **self.vectors.record(), "timings": dict(self.timings)}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> IndexRun:
        record = record or {}
        own = {
            k: record[k] for k in ("version", "mode", "reason", "hashes_searched", "timings") if k in record
        }
        return cls(**own, vectors=VectorFacts.from_record(record))

    def text(self) -> str:
        if not self.version:
            return "no index"
        v = self.vectors
        searched = f"{v.entries_searched} of {v.entries} vectors searched"
        why = f" ({self.reason})" if self.mode == "full" and self.reason else ""
        return (
            f"index version {self.version}: {self.mode}{why}, {v.rows_read} "
            f"embeddings read, {searched}, {self.hashes_searched} hashes searched"
        )


@dataclass(frozen=True)
class DedupSummary:
    """A dedup run's report (its _summary.json, the nightly's dedup), built once when the
    clusters are known; from_record reads a summary an older tagpipe wrote."""

    images: int = 0
    hashed: int = 0
    clusters: int = 0
    duplicates: int = 0  # images that are not their cluster's representative
    duplicate_rate: float = 0.0
    exact_duplicate_images: int = 0
    near_pairs: int = 0  # phash pairs between distinct reliable hashes
    largest_cluster: int = 0
    largest_cluster_id: str = ""
    giant_clusters: tuple[GiantCluster, ...] = ()
    max_distance: int = DEFAULT_MAX_DISTANCE
    unmatched_hashes: dict[str, int] = field(
        default_factory=dict
    )  # reason -> rows whose phash matches nothing
    edges: dict[str, int] = field(default_factory=dict)  # signal -> edges
    embedding: EmbeddingThreshold = field(default_factory=EmbeddingThreshold)  # how the cosine was set
    index: IndexRun = field(
        default_factory=IndexRun
    )  # version, full or incremental (and why), what was searched
    representative: str = "first-seen"  # how each cluster's kept copy was chosen (DedupOptions)
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """The _summary.json object (the field names and shapes it has always had)."""
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "giant_clusters": [asdict(g) for g in self.giant_clusters],
            "unmatched_hashes": dict(self.unmatched_hashes),
            "edges": dict(self.edges),
            "embedding": self.embedding.record(),
            "index": self.index.record(),
        }

    def json_record(self) -> dict[str, Any]:
        return self.record()

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> DedupSummary:
        """From a _summary.json ({}: a bare clusters file); unknown names left out."""
        given = {k: v for k, v in (record or {}).items() if k in cls.__dataclass_fields__}
        given["giant_clusters"] = tuple(GiantCluster(**g) for g in given.get("giant_clusters") or ())
        given["embedding"] = EmbeddingThreshold.from_record(given.get("embedding"))
        given["index"] = IndexRun.from_record(given.get("index"))
        return cls(**given)

    def text(self) -> str:
        unmatched = ", ".join(f"{k} {v}" for k, v in self.unmatched_hashes.items() if v) or "none"
        return (
            f"dedup: {counted(self.images, 'images')} in {counted(self.clusters, 'clusters')}; "
            f"{counted(self.duplicates, 'duplicates')} "
            f"({self.duplicate_rate:.1%}; {counted(self.exact_duplicate_images, 'exact copies')}), "
            f"largest cluster {self.largest_cluster}; "
            f"edges {', '.join(f'{k} {v}' for k, v in self.edges.items())}; phash R={self.max_distance}, "
            f"hashes matching nothing: {unmatched}; {self.embedding.text()}; "
            f"{self.index.text()}; {self.seconds:.1f} s"
        )


def cluster_rows(
    sha256: list | None,
    phash: np.ndarray,
    has_hash: np.ndarray,
    max_distance: int,
    flagged: np.ndarray | None = None,
) -> tuple[np.ndarray, int, int]:
    """Component label per row, phash near pairs (distinct hashes), exact copies, from
    sha256 and phash alone. sha256 None: hashes only (benchmarks)."""
    edges = Edges()
    exact = sha256_edges(sha256, edges) if sha256 is not None else 0
    usable, _ = hash_reliability(phash, has_hash, flagged)
    pairs = phash_edges(phash, usable, max_distance, edges)
    a, b, *_ = edges.arrays()
    return components(len(phash), a, b), pairs, exact


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def run_dedup(settings: DedupSettings | str, output: str | None = None, **values) -> DedupSummary:
    """Clusters of a tag output into output/clusters.parquet, edges.parquet, _summary.json,
    updating the index in output/_index from its last version (full: from scratch).
    `run_dedup(tags, output, max_distance=...)`: the settings from keywords.

    embedding_threshold: a cosine, "auto" (chosen from the data), or None (phash and
    sha256 only). Rows without an embedding join by sha256 and phash only. partitions:
    the index is searched as this many partitions, Ray actors on ray_address's cluster
    (default a local Ray) when more than one (pipeline/corpus/index_partitions.py)."""
    if not isinstance(settings, DedupSettings):
        settings = build(DedupSettings, {"tags": settings, "output": output, **values})
    tags, output, storage_options = settings.tags, settings.output, settings.storage_options
    max_distance, embedding_threshold = settings.max_distance, settings.embedding_threshold
    full = settings.full
    expect(tags, "table", "--tags", storage_options)  # before any work: one line, nothing written
    check_writable(output, "--output")
    if expect_output(output, DEDUP, "--output", storage_options).kind == DEDUP:
        log.info("updating the dedup output at %s: its clusters, edges and summary are replaced", output)
    started = time.monotonic()
    run_id = new_run_id()
    rows = CorpusRows.read(tags, storage_options)
    index = DuplicateIndex(output, storage_options)
    base = index.current()
    why = reuse_reason(base, rows, embedding_threshold, full)
    usable_base = base if not why else None
    timings: dict[str, float] = {}
    exact = _exact(rows, index, usable_base, max_distance)
    known = _graph(rows, exact, None, None)
    timings["exact"] = _lap(started)
    next_version = (base.version if base else 0) + 1
    vectors = update_vectors(
        rows,
        index,
        usable_base,
        embedding_threshold,
        known,
        run_id,
        _edits(rows),
        next_version,
        settings.partitions,
        settings.ray_address,
    )
    timings["embedding"] = _lap(started) - timings["exact"]
    labels = _graph(rows, exact, vectors, vectors.decision.threshold)
    version = _commit(index, base, tags, rows, exact, vectors, run_id, max_distance)
    index_run = IndexRun(
        version.version, "incremental" if usable_base else "full", why, exact.searched, vectors.facts, timings
    )
    first = first_seen(rows, labels) if settings.representative == Representative.FIRST_SEEN else None
    clusters = cluster_table(rows, labels, first)
    edges = public_edges(rows, exact, vectors)
    summary = _summary(rows, exact, vectors, clusters, edges, settings, index_run, started)
    _write_outputs(output, storage_options, rows, clusters.table, edges, summary)
    return summary


def _lap(started: float) -> float:
    return round(time.monotonic() - started, 3)


def _edits(rows: CorpusRows) -> dict[str, np.ndarray] | None:
    """The table's planted-edit cosines by edit kind (tagged at tag time), if it has them."""
    snapshot = rows.parts.snapshot
    if snapshot is None:
        return None
    from pipeline.table.tag_table import TagTable

    table = TagTable(rows.parts.uri, rows.parts.storage_options)
    reader = getattr(table, "edit_calibration", None)
    calibration = reader(snapshot) if reader else None
    if calibration is None or not calibration.num_rows:
        return None
    out: dict[str, list] = {}
    for edit, cosine in zip(calibration.column("edit").to_pylist(), calibration.column("cosine").to_pylist()):
        if cosine is not None:
            out.setdefault(edit, []).append(cosine)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _exact(
    rows: CorpusRows, index: DuplicateIndex, base: IndexVersion | None, max_distance: int
) -> ExactSignals:
    previous = None
    if base is not None and base.max_distance == max_distance:
        state = index.read_table(base.state, ["phash", "phash_usable"])
        usable = state.column("phash_usable").fill_null(False).to_numpy(zero_copy_only=False)
        old = unique_sorted(state.column("phash").fill_null(0).to_numpy().astype(np.uint64)[usable])
        edges = index.read_table(base.edges)
        pairs = edges.filter(pc.equal(edges.column("signal"), PHASH))
        a, b = (pairs.column(c).to_numpy().astype(np.int64).view(np.uint64) for c in ("a", "b"))
        previous = (old, a, b, pairs.column("distance").to_numpy())
    return exact_signals(rows.sha256, rows.phash, rows.has_hash, rows.degenerate, max_distance, previous)


def _graph(rows: CorpusRows, exact: ExactSignals, vectors: VectorUpdate | None, threshold) -> np.ndarray:
    """Each row's component: rows, sha256 groups, distinct hashes and distinct vectors are
    nodes; a row joins its group, its hash and its vector; hashes within R and vectors at or
    above the threshold join each other."""
    a, b, nodes = exact_graph(exact)
    parts_a, parts_b = [a], [b]
    if vectors is not None and threshold is not None:
        idx = np.arange(rows.count)
        live, entry_node = np.unique(vectors.entry[vectors.entry >= 0], return_inverse=True)
        strong = vectors.cosine >= threshold
        parts_a += [idx[vectors.entry >= 0], nodes + np.searchsorted(live, vectors.pair_a[strong])]
        parts_b += [nodes + entry_node.reshape(-1), nodes + np.searchsorted(live, vectors.pair_b[strong])]
        nodes += len(live)
    labels = components(nodes, np.concatenate(parts_a), np.concatenate(parts_b))
    return labels[: rows.count]


def _summary(
    rows,
    exact: ExactSignals,
    vectors: VectorUpdate,
    clusters: Clusters,
    edges: Edges,
    settings,
    index_run,
    started,
) -> DedupSummary:
    with_sha = int((exact.sha_group >= 0).sum())
    sizes, count = clusters.sizes, len(clusters.sizes)
    biggest = int(np.argmax(sizes)) if rows.count else 0
    signal = edges.arrays()[2]
    return DedupSummary(
        images=rows.count,
        hashed=int(rows.has_hash.sum()),
        clusters=count,
        duplicates=rows.count - count,
        duplicate_rate=round((rows.count - count) / rows.count, 6) if rows.count else 0.0,
        exact_duplicate_images=with_sha - len(unique_sorted(exact.sha_group[exact.sha_group >= 0])),
        near_pairs=int(len(exact.pair_a)),
        largest_cluster=int(sizes[biggest]) if rows.count else 0,
        largest_cluster_id=clusters.min_sha[biggest].as_py() if rows.count else "",
        giant_clusters=report_giants(rows, clusters, settings.max_distance),
        max_distance=settings.max_distance,
        unmatched_hashes=exact.unmatched,
        edges={s: int((signal == s).sum()) for s in (SHA256, PHASH, EMBEDDING)},
        embedding=vectors.decision,
        index=index_run,
        representative=Representative(settings.representative).value,
        seconds=round(time.monotonic() - started, 3),
    )


def _commit(index, base, tags, rows, exact, vectors: VectorUpdate, run_id, max_distance):
    """The index's next version: this run's state, entries and edges, then the record."""
    state = pa.table(
        {
            "uri": rows.uri,
            "sha256": rows.sha256,
            "phash": pa.array(rows.phash, pa.uint64(), mask=~rows.has_hash),
            "phash_usable": pa.array(exact.usable),
            "entry": pa.array(vectors.entry, pa.int64(), mask=vectors.entry < 0),
        },
        schema=STATE_SCHEMA,
    )
    hashes = exact.hashes.view(np.int64)
    edges = pa.table(
        {
            "signal": pa.array([EMBEDDING] * len(vectors.pair_a) + [PHASH] * len(exact.pair_a), pa.string()),
            "a": pa.array(np.r_[vectors.pair_a, hashes[exact.pair_a]], pa.int64()),
            "b": pa.array(np.r_[vectors.pair_b, hashes[exact.pair_b]], pa.int64()),
            "cosine": pa.array(np.r_[vectors.cosine, np.full(len(exact.pair_a), np.nan, np.float32)]),
            "distance": pa.array(np.r_[np.full(len(vectors.pair_a), -1), exact.distance].astype(np.int16)),
        },
        schema=INDEX_EDGES_SCHEMA,
    )
    entries = vectors.entries if vectors.entries is not None else ENTRIES_SCHEMA.empty_table()
    version = IndexVersion(
        version=(base.version if base else 0) + 1,
        run_id=run_id,
        committed_at=now_iso(),
        table=record_table(tags, rows.parts.snapshot),
        layout=vectors.layout,
        trained=vectors.trained,
        segments=tuple(vectors.segments),
        state=index.write_table(f"state-{run_id}.parquet", state),
        entries=index.write_table(f"entries-{run_id}.parquet", entries),
        edges=index.write_table(f"edges-{run_id}.parquet", edges),
        next_entry=vectors.next_entry,
        threshold=vectors.decision,
        max_distance=max_distance,
        counts=IndexCounts(rows.count, int(len(unique_sorted(vectors.entry[vectors.entry >= 0])))),
    )
    return index.commit(base, version)


def _write_outputs(
    output, storage_options, rows, clusters: pa.Table, edges: Edges, summary: DedupSummary
) -> None:
    a, b, signal, distance, cosine = edges.arrays()
    edge_table = conform(
        pa.table(
            {
                "uri_a": rows.uri.take(pa.array(a)),
                "uri_b": rows.uri.take(pa.array(b)),
                "signal": pa.array(signal, pa.string()),
                "phash_distance": pa.array(distance.astype(np.int32), mask=distance < 0),
                "cosine": pa.array(cosine, mask=np.isnan(cosine)),
            }
        ),
        EDGES_SCHEMA,
    )
    path = output.rstrip("/")
    mark_output(path, "dedup", storage_options, writes=DEDUP_ENTRIES)  # the index marked it, if it wrote
    write_atomic(f"{path}/clusters.parquet", table=clusters, storage_options=storage_options)
    write_atomic(f"{path}/edges.parquet", table=edge_table, storage_options=storage_options)
    write_atomic(
        f"{path}/_summary.json",
        json.dumps(summary.record(), indent=1).encode(),
        storage_options=storage_options,
    )
