"""The near-duplicate index searched over partitions, each where it is held.

A partition is a set of one index version's segments: their FAISS codes, held in memory
by the searcher that opened them, and their float16 vectors, read row by row for the
exact re-ranking. A block of queries goes to every partition; each returns its k nearest
by the codes' estimate, re-ranked exactly where they may reach the floor, and the caller
keeps each query's k best estimates of the union. The k best of a union are the k best of
the parts' k best, so P partitions find what one index over the same segments finds (up
to ties between equal 4-bit estimates), while the caller holds one handle per partition,
one query block and its candidates: never the codes or the vectors.

With one partition the searcher runs in this process and Ray is not started. With more,
each is a Ray actor (one CPU), spread over the cluster's nodes: it opens its segments on
the node it lands on (reading them from the index's storage) and every search of them
runs there. `placement()` says which node holds which segments.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from pipeline.corpus import vector_index
from pipeline.corpus.duplicate_index import DuplicateIndex, SegmentVectors
from pipeline.corpus.vector_index import IndexLayout


@dataclass(frozen=True)
class Partition:
    segments: tuple[str, ...]
    entries: int  # codes held (dead entries included: they stay in their segment)


def plan(segments: list[str], sizes: list[int], count: int) -> list[Partition]:
    """The segments dealt to at most `count` partitions: largest first, onto the lightest."""
    count = max(1, min(count, len(segments)))
    held: list[list[str]] = [[] for _ in range(count)]
    load = [0] * count
    for i in sorted(range(len(segments)), key=lambda i: -sizes[i]):
        lightest = load.index(min(load))
        held[lightest].append(segments[i])
        load[lightest] += int(sizes[i])
    return [Partition(tuple(h), n) for h, n in zip(held, load) if h]


class PartitionSearcher:
    """One partition opened: its codes in memory, its vectors on the local disk (a cached
    copy where the index is remote). A plain class: called in-process, or held by a Ray
    actor on the node that opened it."""

    def __init__(self, output: str, storage_options: dict | None, partition: Partition, dim: int, threads=0):
        index = DuplicateIndex(output, storage_options)
        self.partition = partition
        self.index = vector_index.open_index(
            [index.read_bytes(f"segments/{s}.faiss") for s in partition.segments]
        )
        self.vectors = SegmentVectors(index, list(partition.segments), dim)
        if threads:
            vector_index.set_threads(threads)

    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def candidates(self, layout: IndexLayout, q_ids: np.ndarray, q: np.ndarray, k: int):
        return vector_index.candidates(self.index, layout, q_ids, np.asarray(q, np.float32), k=k)

    def scored(self, layout: IndexLayout, q_ids: np.ndarray, q: np.ndarray, floor: float, k: int):
        q = np.ascontiguousarray(q, np.float32)
        return vector_index.scored_candidates(self.index, layout, q_ids, q, self.vectors, floor, k=k)

    def node(self) -> str:
        ray = sys.modules.get("ray")  # never imported here: not in a Ray worker (its import is slow)
        return ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else "local"


@dataclass(frozen=True)
class Placement:
    """Where one partition was searched (dedup's summary keeps them: index.partitions)."""

    segments: int = 0
    entries: int = 0
    node: str = "local"  # a Ray node id, or local


class PartitionedIndex:
    """What vector_index.search asks of an index (ntotal, candidates, scored), answered by
    every partition and merged: each query's k best estimates of the union."""

    def __init__(self, searchers: list, partitions: list[Partition], remote: bool):
        self.searchers, self.partitions, self.remote = searchers, partitions, remote
        self.ntotal = sum(p.entries for p in partitions)

    @classmethod
    def open(
        cls,
        index: DuplicateIndex,
        segments: list[str],
        sizes: list[int],
        dim: int,
        count: int = 1,
        ray_address: str | None = None,
    ) -> PartitionedIndex:
        partitions = plan(segments, sizes, count)
        args = (index.output, index.storage_options)
        if len(partitions) < 2:
            return cls([PartitionSearcher(*args, p, dim) for p in partitions], partitions, remote=False)
        import ray

        from pipeline.core.ray_session import ensure_ray

        ensure_ray(ray_address)
        actor = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(PartitionSearcher)
        searchers = [actor.remote(*args, p, dim, threads=1) for p in partitions]
        opened = [s.ntotal.remote() for s in searchers]  # type: ignore[attr-defined]
        ray.get(opened)  # a partition that cannot open fails here, not mid-search
        return cls(searchers, partitions, remote=True)

    def _each(self, method: str, *args) -> list:
        if not self.remote:
            return [getattr(s, method)(*args) for s in self.searchers]
        import ray

        args = tuple(ray.put(a) if isinstance(a, np.ndarray) and a.nbytes > 1 << 20 else a for a in args)
        return ray.get([getattr(s, method).remote(*args) for s in self.searchers])

    def candidates(self, layout: IndexLayout, q_ids, q, k: int):
        return _best(self._each("candidates", layout, q_ids, _wire(q), k), k)

    def scored(self, layout: IndexLayout, q_ids, q, floor: float, k: int):
        return _best(self._each("scored", layout, q_ids, _wire(q), floor, k), k)

    def placement(self) -> tuple[Placement, ...]:
        nodes = self._each("node")
        return tuple(Placement(len(p.segments), p.entries, node) for p, node in zip(self.partitions, nodes))

    def close(self) -> None:
        if self.remote:
            import ray

            for searcher in self.searchers:
                ray.kill(searcher)
        self.searchers = []


def _wire(q: np.ndarray) -> np.ndarray:
    """Queries as float16: what the index stores, so nothing is lost, at half the bytes."""
    return np.ascontiguousarray(q, np.float16)


def _best(parts: list[tuple], k: int) -> tuple:
    """Each query's k best estimates among the partitions' answers (arrays of equal length:
    query id, found id, estimate, then exact cosines where scored)."""
    columns = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
    order = np.lexsort((-columns[2], columns[0]))
    columns = [c[order] for c in columns]
    query = columns[0]
    rank = np.arange(len(query)) - np.searchsorted(query, query, "left")
    keep = rank < k
    return tuple(c[keep] for c in columns)
