"""Which near-duplicate search: the hand-written one against FAISS and usearch, side by side.

    python benchmarks/vector_search.py [--rows 100000 1000000] [--kinds random clustered]
                                       [--methods handwritten faiss-ivfpq faiss-ivfsq8 usearch]

The same planted vectors for every method (seeded, made in each run's own process):
unit float16 vectors, 1152-d, random directions (`random`: nothing is near anything,
the hardest case for a partitioned search) or around 2,000 centres (`clustered`), 1% of
the rows near-copies of another row at cosine 0.95-0.99. Each (method, size, kind) runs
in a fresh process, so its peak RSS (ru_maxrss) is its own; the vectors themselves take
rows x 2.3 KB of it. Every method is asked for the pairs at cosine >= 0.9:

  handwritten   tagpipe's search before issue 31 (git aa3723e): spherical k-means on a
                sample, each row in its 3 nearest partitions, exact cosines inside
  faiss-ivfpq   the index dedup uses now (pipeline/corpus/vector_index.py): IVF cells,
                4-bit fast-scan PQ codes, 16 nearest per query, exact re-ranking
  faiss-ivfsq8  the same cells with 8-bit scalar codes (1 byte a dimension)
  usearch       HNSW (connectivity 16), int8 vectors, 16 nearest per query, exact re-ranking

planted recall: planted pairs the search returned (either row's query) / planted pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from decode import cpu_name  # noqa: E402

THRESHOLD = 0.9
HANDWRITTEN_COMMIT = "aa3723e"


def planted(rows: int, kind: str, dim: int = 1152, seed: int = 0):
    from pipeline.demo.planted_table import near_copy

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, dim), dtype=np.float32) if kind == "clustered" else None
    out = np.empty((rows, dim), np.float16)
    for start in range(0, rows, 50_000):
        block = rng.standard_normal((min(50_000, rows - start), dim), dtype=np.float32)
        if centres is not None:
            block += centres[rng.integers(0, len(centres), len(block))]
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    copies = rows // 100
    chosen = rng.permutation(rows)[: 2 * copies]
    source, copy = chosen[:copies], chosen[copies:]
    cosine = rng.uniform(0.95, 0.99, copies).astype(np.float32)
    out[copy] = near_copy(rng, out[source].astype(np.float32), cosine)
    return out, source, copy


def _handwritten():
    """The search tagpipe had before issue 31, from git history (reproducible, not shipped)."""
    code = subprocess.run(
        ["git", "show", f"{HANDWRITTEN_COMMIT}:pipeline/corpus/embedding_search.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    folder = tempfile.mkdtemp()
    Path(folder, "old_embedding_search.py").write_text(code)
    sys.path.insert(0, folder)
    import old_embedding_search

    return old_embedding_search


def _rerank(vectors, a, b):
    keep = (b >= 0) & (a != b)
    a, b = a[keep], b[keep].astype(np.int64)
    cos = np.einsum("ij,ij->i", vectors[a].astype(np.float32), vectors[b].astype(np.float32))
    ok = cos >= THRESHOLD
    return np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok])


def run_method(method: str, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    n = len(vectors)
    if method == "handwritten":
        old = _handwritten()
        found = old.cosine_pairs_of_units(vectors, np.ones(n, bool), THRESHOLD, parallel=False)
        return found.a, found.b, {"partitions": found.partitions}
    if method == "faiss-ivfpq":
        from pipeline.corpus import vector_index

        layout = vector_index.layout_for(n, vectors.shape[1])
        ids = np.arange(n, dtype=np.int64)
        sample = np.random.default_rng(0).choice(n, min(n, 40 * max(layout.lists, 1)), replace=False)
        trained = vector_index.train(layout, vectors[np.sort(sample)].astype(np.float32))
        index = vector_index.open_index([vector_index.encode_rows(trained, ids, vectors, ids)])
        reader = lambda i: vectors[i]  # noqa: E731
        layout = vector_index.calibrate_screen(index, layout, ids[::1000], reader)
        found = vector_index.search(index, layout, ids, reader, THRESHOLD)
        a, b = np.minimum(found.query, found.found), np.maximum(found.query, found.found)
        return a, b, {"lists": layout.lists, "probes": layout.probes, "reranked": found.reranked}
    if method == "faiss-ivfsq8":
        return _faiss_sq8(vectors)
    if method == "usearch":
        return _usearch(vectors)
    raise SystemExit(f"unknown method {method}")


def _faiss_sq8(vectors):
    import faiss

    from pipeline.corpus import vector_index

    n, d = vectors.shape
    lists = vector_index.layout_for(n, d).lists or 64
    index = faiss.index_factory(d, f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, 40 * lists), replace=False))
    index.train(vectors[sample].astype(np.float32))
    for start in range(0, n, 50_000):
        index.add(vectors[start : start + 50_000].astype(np.float32))
    faiss.extract_index_ivf(index).nprobe = vector_index.PROBES
    parts = []
    for start in range(0, n, 20_000):
        _, found = index.search(vectors[start : start + 20_000].astype(np.float32), 17)
        queries = np.repeat(np.arange(start, start + len(found)), found.shape[1])
        parts.append(_rerank(vectors, queries, found.reshape(-1)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), {"lists": lists}


def _usearch(vectors):
    from usearch.index import Index

    n, d = vectors.shape
    index = Index(ndim=d, metric="cos", dtype="i8", connectivity=16)
    index.add(np.arange(n), vectors, threads=os.cpu_count() or 1)
    parts = []
    for start in range(0, n, 20_000):
        result = index.search(vectors[start : start + 20_000], 17, threads=os.cpu_count() or 1)
        queries = np.repeat(np.arange(start, start + len(result.keys)), result.keys.shape[1])
        parts.append(_rerank(vectors, queries, result.keys.reshape(-1).astype(np.int64)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), {}


def one(method: str, rows: int, kind: str) -> dict:
    vectors, source, copy = planted(rows, kind)
    started = time.perf_counter()
    a, b, facts = run_method(method, vectors)
    seconds = time.perf_counter() - started
    low, high = np.minimum(source, copy), np.maximum(source, copy)
    width = rows + 1
    found = np.isin(low.astype(np.int64) * width + high, a.astype(np.int64) * width + b)
    return {
        "method": method,
        "rows": rows,
        "kind": kind,
        "seconds": round(seconds, 1),
        "planted_recall": round(float(found.mean()), 4),
        "pairs": int(len(np.unique(a.astype(np.int64) * width + b))),
        "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "vectors_mib": round(vectors.nbytes / 2**20),
        **facts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["random", "clustered"])
    parser.add_argument(
        "--methods", nargs="+", default=["handwritten", "faiss-ivfpq", "faiss-ivfsq8", "usearch"]
    )
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.one[2])))
        return
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; threshold {THRESHOLD}")
    print(
        f"{'rows':>9} {'kind':>9} {'method':>13} {'seconds':>8} {'recall':>7} {'peak MiB':>9} {'vectors':>8}"
    )
    for rows in args.rows:
        for kind in args.kinds:
            for method in args.methods:
                command = [sys.executable, __file__, "--one", method, str(rows), kind]
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    print(f"{rows:>9} {kind:>9} {method:>13} failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"{rows:>9} {kind:>9} {method:>13} {r['seconds']:>8} {r['planted_recall']:>7} "
                    f"{r['peak_mib']:>9} {r['vectors_mib']:>8}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
