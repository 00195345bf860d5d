"""`tagpipe dedup`: clusters of copies and near-duplicates from a tag output.

Edges come from three signals (pipeline/corpus/duplicate_signals.py): the same sha256; phash
within R bits between hashes that carry detail (low-detail hashes match nothing and
are counted by reason); and cosine similarity of the tagger's embedding at or above a
threshold, given or chosen from the data (--embedding-threshold auto). Connected
components of all edges are the clusters (scipy's C implementation); edges.parquet
records each edge with its signal. cluster_id is the smallest sha256 in the cluster,
stable as long as that file stays. The representative is the best copy: the most
pixels, then a lossless format, then the most bytes, then the smallest uri.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.core.errors import TagpipeError
from pipeline.core.schemas import CLUSTERS_SCHEMA, EDGES_SCHEMA, conform
from pipeline.corpus.duplicate_signals import (
    Edges,
    embedding_edges,
    embedding_matrix,
    hash_reliability,
    phash_edges,
    sha256_edges,
    table_hashes,
)
from pipeline.corpus.hamming_search import near_pairs
from pipeline.storage.filesystem import write_atomic
from pipeline.table.reading import read_parquet

log = logging.getLogger(__name__)
DEFAULT_MAX_DISTANCE = 6
GIANT_CLUSTER = 1000  # clusters this large are reported: chaining through near-duplicates
LOSSLESS_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".tga", ".qoi")


@dataclass
class DedupSummary:
    images: int = 0
    hashed: int = 0
    clusters: int = 0
    duplicates: int = 0  # images that are not their cluster's representative
    duplicate_rate: float = 0.0
    exact_duplicate_images: int = 0
    near_pairs: int = 0  # phash pairs between distinct reliable hashes
    largest_cluster: int = 0
    largest_cluster_id: str = ""
    giant_clusters: list = field(default_factory=list)  # {cluster_id, size, diameter_hops, spread_bits}
    max_distance: int = DEFAULT_MAX_DISTANCE
    unmatched_hashes: dict = field(default_factory=dict)  # reason -> rows whose phash matches nothing
    edges: dict = field(default_factory=dict)  # signal -> edges
    embedding: dict = field(
        default_factory=dict
    )  # threshold, chosen_by, recall and rate, search facts; {} if off
    seconds: float = 0.0

    def text(self) -> str:
        unmatched = ", ".join(f"{k} {v}" for k, v in self.unmatched_hashes.items() if v) or "none"
        emb_text = describe_embedding(self.embedding)
        return (
            f"dedup: {self.images} images in {self.clusters} clusters; {self.duplicates} duplicates "
            f"({self.duplicate_rate:.1%}; {self.exact_duplicate_images} exact copies), "
            f"largest cluster {self.largest_cluster}; "
            f"edges {', '.join(f'{k} {v}' for k, v in self.edges.items())}; phash R={self.max_distance}, "
            "hashes matching "
            f"nothing: {unmatched}; {emb_text}; {self.seconds:.1f} s"
        )


def describe_embedding(emb: dict) -> str:
    """The embedding entry of a dedup summary in words (the CLI line and the report)."""
    if emb.get("threshold") is None:
        return f"embedding not used ({emb.get('reason') or 'not asked'})"
    recall = "n/a" if emb.get("positive_recall") is None else f"{emb['positive_recall']:.3f}"
    rate = "n/a" if emb.get("negative_rate") is None else f"{emb['negative_rate']:.2g}"
    return (
        f"embedding cosine >= {emb['threshold']:.4f} ({emb['chosen_by']}; recall of hash-confirmed "
        f"pairs {recall}, random-pair rate {rate})"
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


def _hop_diameter(members: np.ndarray, phash: np.ndarray, max_distance: int) -> tuple[int, int]:
    """Double-sweep BFS estimate of a cluster's diameter in hops, and the Hamming
    distance between the two ends (how far chaining carried it)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order

    hashes, inverse = np.unique(phash[members], return_inverse=True)
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


def run_dedup(
    tags: str,
    output: str,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    storage_options: dict | None = None,
    ray_address: str | None = None,
    embedding_threshold: float | str | None = "auto",
) -> DedupSummary:
    """Clusters of a tag output into output/clusters.parquet, edges.parquet, _summary.json.

    embedding_threshold: a cosine, "auto" (chosen from the data), or None (phash and
    sha256 only). Rows without an embedding (errors, models without one) join by
    sha256 and phash only."""
    started = time.monotonic()
    if not 0 <= max_distance <= 32:
        raise TagpipeError(f"--max-distance must be 0-32 bits, got {max_distance}")
    table = _read_rows(tags, storage_options)
    n = table.num_rows
    if n >= 1_000_000:  # the searches run as Ray tasks
        from pipeline.core.ray_session import ensure_ray

        ensure_ray(ray_address)
    hashes = table_hashes(table, "phash_degenerate")
    edges, summary = _edges(table, hashes, max_distance, embedding_threshold)
    a, b, signal, distance, cosine = edges.arrays()
    labels = components(n, a, b)
    out, order, starts, sizes, min_sha = _clusters(table, labels)
    summary.images, summary.clusters = n, len(starts)
    summary.duplicates = n - len(starts)
    summary.duplicate_rate = round(summary.duplicates / n, 6) if n else 0.0
    if n:
        biggest = int(np.argmax(sizes))
        summary.largest_cluster, summary.largest_cluster_id = int(sizes[biggest]), min_sha[biggest]
    _report_giants(summary, hashes, order, starts, sizes, min_sha, max_distance)
    uris = table.column("uri").to_numpy(zero_copy_only=False)
    edge_table = conform(
        pa.table(
            {
                "uri_a": pa.array(uris[a], pa.string()),
                "uri_b": pa.array(uris[b], pa.string()),
                "signal": pa.array(signal, pa.string()),
                "phash_distance": pa.array(distance.astype(np.int32), mask=distance < 0),
                "cosine": pa.array(cosine, mask=np.isnan(cosine)),
            }
        ),
        EDGES_SCHEMA,
    )
    out_path = output.rstrip("/")
    write_atomic(f"{out_path}/clusters.parquet", table=out, storage_options=storage_options)
    write_atomic(f"{out_path}/edges.parquet", table=edge_table, storage_options=storage_options)
    summary.seconds = round(time.monotonic() - started, 3)
    write_atomic(
        f"{out_path}/_summary.json",
        json.dumps(asdict(summary), indent=1).encode(),
        storage_options=storage_options,
    )
    return summary


def parse_embedding_threshold(text: str | float | None) -> float | str | None:
    """--embedding-threshold: a cosine in (0, 1], "auto", or "off" (None)."""
    if text is None or text == "off":
        return None
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise TagpipeError(f"--embedding-threshold {text!r}: give a cosine in (0, 1], auto or off") from None
    if not 0 < value <= 1:
        raise TagpipeError(f"--embedding-threshold {text!r}: a cosine in (0, 1], auto or off")
    return value


def _read_rows(tags: str, storage_options: dict | None) -> pa.Table:
    columns = ["uri", "sha256", "phash", "phash_degenerate", "width", "height", "size", "error", "embedding"]
    table = read_parquet(tags, storage_options, columns, only_present=True).sort_by("uri")
    if len(set(table.column("uri").to_pylist())) != table.num_rows:
        raise TagpipeError(
            f"{tags}: a uri appears more than once (mixed model runs?); dedup one model's output"
        )
    return table


def _edges(
    table: pa.Table, hashes: tuple, max_distance: int, embedding_threshold
) -> tuple[Edges, DedupSummary]:
    """Every signal's edges over the table's rows, and the summary's figures about them."""
    summary = DedupSummary(max_distance=max_distance)
    edges = Edges()
    phash, has_hash, usable, summary.unmatched_hashes = hashes
    summary.hashed = int(has_hash.sum())
    summary.exact_duplicate_images = sha256_edges(table.column("sha256").to_pylist(), edges)
    summary.near_pairs = phash_edges(phash, usable, max_distance, edges)
    summary.embedding = _embedding(table, edges, embedding_threshold)
    summary.edges = dict(edges.counts)
    return edges, summary


def _embedding(table: pa.Table, edges: Edges, threshold) -> dict:
    """Embedding edges into edges; the summary's embedding entry."""
    if threshold is None:
        return {"threshold": None, "reason": "--embedding-threshold off"}
    if "embedding" not in table.column_names:
        return {"threshold": None, "reason": "the table has no embedding column"}
    rows, vectors = embedding_matrix(table.column("embedding"))
    if len(rows) < 2:
        return {"threshold": None, "reason": f"{len(rows)} rows carry an embedding"}
    a, b, *_ = edges.arrays()
    groups = components(table.num_rows, a, b)  # what sha256 and phash joined
    local = np.full(table.num_rows, -1, np.int64)
    local[rows] = np.arange(len(rows))
    both = (local[a] >= 0) & (local[b] >= 0)
    choice, facts = embedding_edges(
        vectors, rows, threshold, groups[rows], (local[a][both], local[b][both]), edges
    )
    facts.pop("usable")
    if choice.threshold is None:
        log.warning("dedup: no embedding threshold: %s", choice.reason)
    return {**asdict(choice), **facts}


def _clusters(table: pa.Table, labels: np.ndarray) -> tuple:
    """clusters.parquet rows, and the per-cluster order the giant check reuses."""
    n = table.num_rows
    sha = table.column("sha256").to_pylist()
    uris = table.column("uri").to_pylist()
    order = np.lexsort((np.arange(n), *[-key for key in _best_copy_keys(table)][::-1], labels))
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    sizes = np.diff(np.r_[starts, n])
    cluster_index = np.empty(n, np.int64)
    cluster_index[order] = np.repeat(np.arange(len(starts)), sizes)
    representative = np.zeros(n, bool)
    representative[order[starts]] = True
    sha_values, sha_rank = np.unique(np.asarray([s or "~" for s in sha], object), return_inverse=True)
    smallest = np.full(len(starts), len(sha_values) - 1, np.int64)
    np.minimum.at(smallest, cluster_index, sha_rank)
    min_sha = sha_values[smallest]  # per cluster; "~" sorts after every hex digest
    ids = np.asarray(
        [m if m != "~" else f"row:{uris[int(order[starts[c]])]}" for c, m in enumerate(min_sha)], object
    )
    out = conform(
        pa.table(
            {
                "uri": table.column("uri"),
                "sha256": table.column("sha256"),
                "phash": table.column("phash"),
                "cluster_id": pa.array(ids[cluster_index].tolist(), pa.string()),
                "cluster_size": pa.array(sizes[cluster_index].astype(np.int64)),
                "is_representative": pa.array(representative),
            }
        ),
        CLUSTERS_SCHEMA,
    )
    return out, order, starts, sizes, min_sha


def _best_copy_keys(table: pa.Table) -> list[np.ndarray]:
    """Larger is better, in order: pixels, a lossless format, bytes (rows are uri-sorted,
    so the smallest uri wins what is left)."""

    def ints(name):
        if name not in table.column_names:
            return np.zeros(table.num_rows, np.int64)
        return table.column(name).fill_null(0).to_numpy().astype(np.int64)

    lossless = np.asarray(
        [str(u).lower().endswith(LOSSLESS_EXTENSIONS) for u in table.column("uri").to_pylist()], np.int64
    )
    return [ints("width") * ints("height"), lossless, ints("size")]


def _report_giants(summary, hashes, order, starts, sizes, min_sha, max_distance) -> None:
    phash, has_hash = hashes[0], hashes[1]
    for c in np.flatnonzero(sizes >= GIANT_CLUSTER):
        members = order[starts[c] : starts[c] + sizes[c]]
        members = members[has_hash[members]]
        hops, spread = _hop_diameter(members, phash, max_distance) if len(members) > 1 else (0, 0)
        summary.giant_clusters.append(
            {"cluster_id": min_sha[c], "size": int(sizes[c]), "diameter_hops": hops, "spread_bits": spread}
        )
        if hops:
            log.warning(
                "giant cluster %s: %d images, phash diameter %d hops, ends %d bits apart (chaining?)",
                min_sha[c],
                sizes[c],
                hops,
                spread,
            )
        else:
            log.warning(
                "giant cluster %s: %d images joined by sha256 or embedding (one picture, or an embedding "
                "threshold too low for this model?)",
                min_sha[c],
                sizes[c],
            )
