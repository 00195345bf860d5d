"""`tagpipe dedup`: exact and near-duplicate clusters from a tag output.

Edges: rows with the same sha256 (exact copies); rows with the same phash; rows whose
distinct phashes are within Hamming distance R (pipeline/hamming_search.py, exact and
sub-quadratic). Degenerate hashes (blank images: solid colour, all black) join only by
sha256. Connected components of those edges are the clusters (scipy's C
implementation). cluster_id is the smallest sha256 in the cluster, so it is stable as
long as that file stays; the representative is the largest image (ties: smallest uri).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.errors import TagpipeError
from pipeline.hamming_search import near_pairs
from pipeline.phash import BLACK_HASH, SOLID_HASH
from pipeline.storage import read_parquet, write_atomic

log = logging.getLogger(__name__)
DEFAULT_MAX_DISTANCE = 6
GIANT_CLUSTER = 1000  # clusters this large are reported: chaining through near-duplicates


@dataclass
class DedupSummary:
    images: int = 0
    hashed: int = 0
    clusters: int = 0
    duplicates: int = 0  # images that are not their cluster's representative
    duplicate_rate: float = 0.0
    exact_duplicate_images: int = 0
    near_pairs: int = 0
    largest_cluster: int = 0
    largest_cluster_id: str = ""
    giant_clusters: list = field(default_factory=list)  # {cluster_id, size, diameter_hops, spread_bits}
    max_distance: int = DEFAULT_MAX_DISTANCE
    seconds: float = 0.0

    def text(self) -> str:
        return (
            f"dedup: {self.images} images in {self.clusters} clusters; {self.duplicates} duplicates "
            f"({self.duplicate_rate:.1%}; {self.exact_duplicate_images} exact copies), largest cluster {self.largest_cluster}, "
            f"R={self.max_distance}, {self.seconds:.1f} s"
        )


def cluster_rows(sha256: list | None, phash: np.ndarray, has_hash: np.ndarray, max_distance: int) -> tuple[np.ndarray, int, int]:
    """Component label per row, number of near pairs (distinct hashes), exact copies.
    sha256 None: hashes only (benchmarks)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(phash)
    edges_a, edges_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    exact_copies = 0
    if sha256 is not None:
        sha = np.asarray([s if s is not None else f"\0row{i}" for i, s in enumerate(sha256)], object)
        _, sha_first, sha_inverse = np.unique(sha, return_index=True, return_inverse=True)
        edges_a.append(np.arange(n))
        edges_b.append(sha_first[sha_inverse])  # every row to the first row with its sha256
        exact_copies = int(n - len(sha_first))

    usable = np.flatnonzero(has_hash & (phash != np.uint64(SOLID_HASH)) & (phash != np.uint64(BLACK_HASH)))
    pairs = 0
    if len(usable):
        hashes, first, inverse = np.unique(phash[usable], return_index=True, return_inverse=True)
        rep = usable[first]  # a row per distinct hash
        edges_a.append(usable)
        edges_b.append(rep[inverse])  # same phash
        a, b = near_pairs(hashes, max_distance)
        pairs = len(a)
        edges_a.append(rep[a])
        edges_b.append(rep[b])
    a = np.concatenate(edges_a)
    b = np.concatenate(edges_b)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels, pairs, exact_copies


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


def run_dedup(tags: str, output: str, max_distance: int = DEFAULT_MAX_DISTANCE, storage_options: dict | None = None, ray_address: str | None = None) -> DedupSummary:
    started = time.monotonic()
    if not 0 <= max_distance <= 32:
        raise TagpipeError(f"--max-distance must be 0-32 bits, got {max_distance}")
    columns = ["uri", "sha256", "phash", "phash_degenerate", "width", "height", "error"]
    table = read_parquet(tags, storage_options, columns).sort_by("uri")
    if len(set(table.column("uri").to_pylist())) != table.num_rows:
        raise TagpipeError(f"{tags}: a uri appears more than once (mixed model runs?); dedup one model's output")
    n = table.num_rows
    phash_col = table.column("phash")
    has_hash = phash_col.is_valid().to_numpy(zero_copy_only=False)
    phash = phash_col.fill_null(0).to_numpy().astype(np.uint64)
    sha = table.column("sha256").to_pylist()
    if n >= 1_000_000:  # the table search runs as Ray tasks
        from pipeline.tag_job import ensure_ray

        ensure_ray(ray_address)
    labels, pairs, exact = cluster_rows(sha, phash, has_hash, max_distance)

    # stable ids and representatives, vectorised by sorting rows by cluster
    sha_sort = np.asarray([s or "~" for s in sha], object)
    area = (table.column("width").fill_null(0).to_numpy().astype(np.int64) * table.column("height").fill_null(0).to_numpy().astype(np.int64))
    order = np.lexsort((np.arange(n), -area, labels))  # per cluster: largest first, then by uri (rows are uri-sorted)
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    sizes = np.diff(np.r_[starts, n])
    cluster_of_sorted = np.repeat(np.arange(len(starts)), sizes)
    representative = np.zeros(n, bool)
    representative[order[starts]] = True
    cluster_index = np.empty(n, np.int64)
    cluster_index[order] = cluster_of_sorted
    sha_values, sha_rank = np.unique(sha_sort, return_inverse=True)
    smallest = np.full(len(starts), len(sha_values) - 1, np.int64)
    np.minimum.at(smallest, cluster_index, sha_rank)
    min_sha = sha_values[smallest]  # per cluster; "~" sorts after every hex digest
    uris = table.column("uri").to_pylist()
    ids = np.asarray([m if m != "~" else f"row:{uris[int(order[starts[c]])]}" for c, m in enumerate(min_sha)], object)
    cluster_id = ids[cluster_index].tolist()
    cluster_size = sizes[cluster_index]

    out = pa.table(
        {
            "uri": table.column("uri"),
            "sha256": table.column("sha256"),
            "phash": phash_col,
            "cluster_id": pa.array(cluster_id, pa.string()),
            "cluster_size": pa.array(cluster_size.astype(np.int64)),
            "is_representative": pa.array(representative),
        }
    )
    summary = DedupSummary(images=n, hashed=int(has_hash.sum()), clusters=len(starts), near_pairs=pairs, exact_duplicate_images=exact, max_distance=max_distance)
    summary.duplicates = n - len(starts)
    summary.duplicate_rate = round(summary.duplicates / n, 6) if n else 0.0
    if n:
        biggest = int(np.argmax(sizes))
        summary.largest_cluster = int(sizes[biggest])
        summary.largest_cluster_id = min_sha[biggest]
    for c in np.flatnonzero(sizes >= GIANT_CLUSTER):
        members = order[starts[c] : starts[c] + sizes[c]]
        members = members[has_hash[members]]
        hops, spread = _hop_diameter(members, phash, max_distance) if len(members) > 1 else (0, 0)
        summary.giant_clusters.append({"cluster_id": min_sha[c], "size": int(sizes[c]), "diameter_hops": hops, "spread_bits": spread})
        log.warning("giant cluster %s: %d images, diameter %d hops, ends %d bits apart (chaining?)", min_sha[c], sizes[c], hops, spread)

    out_path = output.rstrip("/")
    write_atomic(f"{out_path}/clusters.parquet", table=out, storage_options=storage_options)
    summary.seconds = round(time.monotonic() - started, 3)
    write_atomic(f"{out_path}/_summary.json", json.dumps(asdict(summary), indent=1).encode(), storage_options=storage_options)
    return summary
