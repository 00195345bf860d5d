"""What dedup writes: clusters.parquet (one row per image) and edges.parquet (one per edge).

The graph dedup solves has rows, sha256 groups, distinct hashes and distinct vectors as
nodes; users read rows. So each edge becomes a row-level edge here: a row to the first
row (in uri order) of its group, hash or vector, and joined hashes and vectors through
their first rows. cluster_id is the smallest sha256 in the cluster ("row:<uri>" of its
representative when none has one); the representative is the copy first seen in the tag
table (its earliest version, pipeline/corpus/first_seen.py), then the best copy: the most
pixels, then a lossless format, then the most bytes, then the smallest uri (`best-copy`:
the best copy alone). Giant clusters are reported with their phash diameter (chaining).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.arrays import unique_sorted
from pipeline.core.schemas import CLUSTERS_SCHEMA, conform
from pipeline.corpus.corpus_rows import CorpusRows
from pipeline.corpus.dedup_vectors import VectorUpdate
from pipeline.corpus.duplicate_signals import EMBEDDING, PHASH, SHA256, Edges, ExactSignals
from pipeline.corpus.first_seen import first_versions
from pipeline.corpus.hamming_search import near_pairs

log = logging.getLogger(__name__)
GIANT_CLUSTER = 1000  # clusters this large are reported: chaining through near-duplicates
LOSSLESS = r"\.(png|bmp|tif|tiff|gif|ppm|pgm|pbm|tga|qoi)$"


def _first_rows(node: np.ndarray, count: int) -> np.ndarray:
    """The first row (in uri order) of each node (index count: a slot for rows without one)."""
    first = np.full(count + 1, np.iinfo(np.int64).max, np.int64)
    have = np.flatnonzero(node >= 0)
    np.minimum.at(first, node[have], have)
    return first


def public_edges(rows: CorpusRows, exact: ExactSignals, vectors: VectorUpdate) -> Edges:
    """Row-level edges for edges.parquet: each row to its node's first row, and between the
    first rows of joined hashes and vectors."""
    edges = Edges()
    idx = np.arange(rows.count)
    first_sha = _first_rows(exact.sha_group, exact.groups)
    same = (exact.sha_group >= 0) & (first_sha[exact.sha_group] != idx)
    edges.add(idx[same], first_sha[exact.sha_group[same]], SHA256)
    first_hash = _first_rows(exact.hash_node, len(exact.hashes))
    same = (exact.hash_node >= 0) & (first_hash[exact.hash_node] != idx)
    edges.add(idx[same], first_hash[exact.hash_node[same]], PHASH, distance=np.zeros(int(same.sum())))
    edges.add(first_hash[exact.pair_a], first_hash[exact.pair_b], PHASH, distance=exact.distance)
    threshold = vectors.decision.threshold
    if threshold is not None and (vectors.entry >= 0).any():
        live, node = np.unique(vectors.entry[vectors.entry >= 0], return_inverse=True)
        entry_node = np.full(rows.count, -1, np.int64)
        entry_node[vectors.entry >= 0] = node.reshape(-1)
        first = _first_rows(entry_node, len(live))
        same = (entry_node >= 0) & (first[entry_node] != idx)
        edges.add(idx[same], first[entry_node[same]], EMBEDDING, cosine=np.ones(int(same.sum())))
        strong = vectors.cosine >= threshold
        a = first[np.searchsorted(live, vectors.pair_a[strong])]
        b = first[np.searchsorted(live, vectors.pair_b[strong])]
        edges.add(a, b, EMBEDDING, cosine=vectors.cosine[strong])
    return edges


@dataclass(frozen=True)
class Clusters:
    """clusters.parquet's rows, and the per-cluster order the giant check reuses: rows by
    cluster (representative first), each cluster's start, size and id (its smallest sha256)."""

    table: pa.Table
    order: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    min_sha: pa.Array


@dataclass(frozen=True)
class GiantCluster:
    """A cluster past GIANT_CLUSTER images: how far its phash chain reaches (chaining?)."""

    cluster_id: str
    size: int
    diameter_hops: int = 0  # 0: joined by sha256 or embedding alone
    spread_bits: int = 0  # bits between the chain's two ends


def cluster_table(rows: CorpusRows, labels: np.ndarray, first_seen: np.ndarray | None = None) -> Clusters:
    """clusters.parquet rows, and the per-cluster order the giant check reuses. first_seen:
    each row's first table version (earlier first), before the best-copy rules; None: those alone."""
    n = rows.count
    lossless = pc.match_substring_regex(pc.utf8_lower(rows.uri), LOSSLESS).to_numpy(zero_copy_only=False)
    keys = [rows.pixels, lossless.astype(np.int64), rows.size]  # larger first
    if first_seen is not None:
        keys.insert(0, -first_seen)  # earlier first
    order = np.lexsort((np.arange(n), *[-k for k in keys][::-1], labels))
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]]) if n else np.zeros(0, int)
    sizes = np.diff(np.r_[starts, n])
    cluster_index = np.empty(n, np.int64)
    cluster_index[order] = np.repeat(np.arange(len(starts)), sizes)
    representative = np.zeros(n, bool)
    representative[order[starts]] = True
    min_sha = _cluster_ids(rows, order[starts], cluster_index, len(starts))
    out = conform(
        pa.table(
            {
                "uri": rows.uri,
                "sha256": rows.sha256,
                "phash": pa.array(rows.phash, pa.uint64(), mask=~rows.has_hash),
                "cluster_id": min_sha.take(pa.array(cluster_index)),
                "cluster_size": pa.array(sizes[cluster_index].astype(np.int64)),
                "is_representative": pa.array(representative),
            }
        ),
        CLUSTERS_SCHEMA,
    )
    return Clusters(out, order, starts, sizes, min_sha)


def _cluster_ids(rows: CorpusRows, first_rows: np.ndarray, cluster_index: np.ndarray, count: int) -> pa.Array:
    """Per cluster the smallest sha256 of its rows ("row:<uri>" of its representative when none
    has one), as an Arrow array: ten million clusters stay ten million strings in one buffer."""
    n = rows.count
    rank = pc.rank(rows.sha256, sort_keys="ascending", tiebreaker="dense").to_numpy().astype(np.int64)
    rank[~rows.sha256.is_valid().to_numpy(zero_copy_only=False)] = n + 1  # after every digest
    smallest = np.full(count, n + 1, np.int64)
    np.minimum.at(smallest, cluster_index, rank)
    holder = np.zeros(n + 2, np.int64)  # a row holding each rank
    holder[rank] = np.arange(n)
    has_sha = smallest <= n
    row = np.where(has_sha, holder[np.minimum(smallest, n + 1)], first_rows)
    sha = rows.sha256.take(pa.array(row))
    fallback = pc.binary_join_element_wise("row:", rows.uri.take(pa.array(row)), "")
    return pc.if_else(pa.array(has_sha), sha, fallback)


def _hop_diameter(members: np.ndarray, phash: np.ndarray, max_distance: int) -> tuple[int, int]:
    """Double-sweep BFS estimate of a cluster's diameter in hops, and the Hamming
    distance between the two ends (how far chaining carried it)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order

    hashes = unique_sorted(phash[members])
    a, b = near_pairs(hashes, max_distance, parallel=False)
    m = len(hashes)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(m, m)).tocsr()

    def farthest(start: int) -> tuple[int, int]:
        order, pred = breadth_first_order(graph, start, directed=False, return_predecessors=True)
        depth = np.zeros(m, np.int64)
        for node in order[1:]:
            depth[node] = depth[pred[node]] + 1
        end = int(order[np.argmax(depth[order])])
        return end, int(depth[end])

    end1, _ = farthest(0)
    end2, hops = farthest(end1)
    return hops, int(np.bitwise_count(hashes[end1] ^ hashes[end2]))


def report_giants(rows: CorpusRows, clusters: Clusters, max_distance: int) -> tuple[GiantCluster, ...]:
    """Every giant cluster, each warned of: a long phash chain, or one joined otherwise."""
    order, starts, sizes, min_sha = clusters.order, clusters.starts, clusters.sizes, clusters.min_sha
    giants = []
    for c in np.flatnonzero(sizes >= GIANT_CLUSTER):
        members = order[starts[c] : starts[c] + sizes[c]]
        members = members[rows.has_hash[members]]
        hops, spread = _hop_diameter(members, rows.phash, max_distance) if len(members) > 1 else (0, 0)
        giants.append(GiantCluster(min_sha[int(c)].as_py(), int(sizes[c]), hops, spread))
        if hops:
            log.warning(
                "giant cluster %s: %d images, phash diameter %d hops, ends %d bits apart (chaining?)",
                min_sha[int(c)].as_py(),
                sizes[c],
                hops,
                spread,
            )
        else:
            log.warning(
                "giant cluster %s: %d images joined by sha256 or embedding (one picture, or an embedding "
                "threshold too low for this model?)",
                min_sha[int(c)].as_py(),
                sizes[c],
            )
    return tuple(giants)


def first_seen(rows: CorpusRows, labels: np.ndarray) -> np.ndarray | None:
    """Each row's first version in its tag table, looked up only for rows that share a
    cluster; None when the input is not a tag table (plain Parquet has no history)."""
    table, snapshot = rows.parts.table, rows.parts.snapshot
    if table is None or snapshot is None:
        return None
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    return first_versions(table, snapshot.version, rows.uri, sizes[labels] > 1)
