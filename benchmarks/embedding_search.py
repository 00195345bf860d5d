"""The embedding near-duplicate search at scale: time, memory and recall against brute force.

    python benchmarks/embedding_search.py [--rows 1000000] [--dim 1152] [--threshold 0.9]

Data (seeded, made here, float16 as stored): rows drawn around 2,000 centres (so
neighbourhoods are crowded as real embeddings are, cosine within a centre ~0.5), and
1% of rows replaced by a planted near-copy of another row (cosine ~0.88-0.997, so many
sit near the threshold). The partitioned search (pipeline/corpus/embedding_search.py) runs
once; then:
  planted recall  planted pairs found / planted pairs at or above the threshold
  sample recall   for 2,000 random query rows, brute force against every row gives the
                  true pairs at or above the threshold; found / true
  peak memory     the process's peak RSS (ru_maxrss), data included
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import cpu_name  # noqa: E402

from pipeline.corpus.embedding_search import cosine_pairs, unit_rows  # noqa: E402


def planted_set(rows: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2000, dim)).astype(np.float32)
    data = np.empty((rows, dim), np.float16)
    labels = rng.integers(0, len(centres), rows)
    for start in range(0, rows, 20_000):
        stop = min(rows, start + 20_000)
        data[start:stop] = centres[labels[start:stop]] + rng.normal(size=(stop - start, dim)).astype(
            np.float32
        )
    copies = rows // 100
    chosen = rng.permutation(rows)[: 2 * copies]
    source, copy = chosen[:copies], chosen[copies:]
    for start in range(0, copies, 20_000):
        s, c = source[start : start + 20_000], copy[start : start + 20_000]
        noise = rng.uniform(0.1, 0.75, size=(len(s), 1)).astype(np.float32)  # cosine ~0.88-0.997
        data[c] = data[s].astype(np.float32) + noise * rng.normal(size=(len(s), dim)).astype(np.float32)
    return data, source, copy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    started = time.monotonic()
    data, source, copy = planted_set(args.rows, args.dim)
    made = time.monotonic() - started
    started = time.monotonic()
    found = cosine_pairs(data, args.threshold)
    seconds = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    pairs = set(zip(found.a.tolist(), found.b.tolist()))

    print(
        f"search {seconds:.1f} s ({found.method}, {found.partitions} partitions), {len(found.a)} pairs; "
        f"peak RSS {peak:.2f} GiB",
        flush=True,
    )
    unit, _ = unit_rows(data)
    planted_sims = np.einsum("ij,ij->i", unit[source].astype(np.float32), unit[copy].astype(np.float32))
    planted = [
        (min(s, c), max(s, c)) for s, c, sim in zip(source, copy, planted_sims) if sim >= args.threshold
    ]
    planted_found = sum(p in pairs for p in planted)
    queries = np.random.default_rng(1).choice(args.rows, args.queries, replace=False)
    true_pairs = set()
    query_vectors = unit[queries].astype(np.float32)
    for start in range(0, args.rows, 65_536):  # one pass over every row for all queries
        sims = unit[start : start + 65_536].astype(np.float32) @ query_vectors.T
        for row, q in zip(*np.nonzero(sims >= args.threshold)):
            other, query = start + int(row), int(queries[q])
            if other != query:
                true_pairs.add((min(query, other), max(query, other)))
    sample_found = sum(p in pairs for p in true_pairs)
    print(
        f"{cpu_name()}; {os.cpu_count()} cores; {args.rows} x {args.dim} float16, threshold {args.threshold}"
    )
    print(
        f"data made in {made:.0f} s; search {seconds:.1f} s ({found.method}, {found.partitions} partitions), "
        f"{len(found.a)} pairs; peak RSS {peak:.2f} GiB"
    )
    print(
        f"planted recall {planted_found}/{len(planted)} = {planted_found / max(1, len(planted)):.4f}; "
        f"sample recall ({args.queries} queries, brute force) {sample_found}/{len(true_pairs)} = "
        f"{sample_found / max(1, len(true_pairs)):.4f}"
    )


if __name__ == "__main__":
    main()
