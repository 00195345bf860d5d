"""Dedup, split and audit at corpus scale: wall time, peak memory and planted truth.

    python benchmarks/corpus_scale.py dedup --rows 1000000 --kind random
    python benchmarks/corpus_scale.py dedup --rows 1000000 --kind clustered
    python benchmarks/corpus_scale.py nightly --rows 1000000 [--kind random]
    python benchmarks/corpus_scale.py identical --rows 30000 --identical 20000

Tables are written through the project's table API (pipeline/demo/planted_table.py):
1152-d float16 unit embeddings, 1% planted near-copies at cosine 0.95-0.99, half of them
sharing their source's phash to 3 bits (the other half findable only by the embedding);
`identical` adds rows that all carry one vector (blank images). A table is made once per
(rows, kind) under --workdir and reused. Every measured step runs in its own process, so
its peak RSS (ru_maxrss, read by wait4) is its own; the parent only orchestrates.

Reported against the planted truth:
  planted recall       planted pairs whose rows ended in one cluster / planted pairs
  embedding-only       the same, for the half phash cannot find
  search found         planted pairs returned by the embedding search as an edge
  false merges         clusters holding rows of two or more planted families
                       (a family: a row with its planted copies, or the identical rows)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from decode import cpu_name  # noqa: E402


def _child(*args: str) -> dict:
    """Run this script's hidden step in a fresh process; its JSON, wall time and peak RSS."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, __file__, "--step", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    _, status, usage = os.wait4(process.pid, 0)
    out, err = process.stdout.read().decode(), process.stderr.read().decode()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"step {args} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["peak_mib"] = round(usage.ru_maxrss / 1024)
    return result


# ---- steps (each in its own process) --------------------------------------------------
def step_make(table: str, rows: int, kind: str, identical: int) -> dict:
    from pipeline.demo.planted_table import PlantedSpec, write_planted_table

    truth = write_planted_table(table, PlantedSpec(rows=rows, kind=kind, identical=identical))
    _save_truth(table, truth)
    return {"rows": rows, "planted": len(truth.source)}


def _save_truth(table: str, truth) -> None:
    import pyarrow.parquet as pq

    pq.write_table(truth.table(), f"{table}.truth.parquet")
    Path(f"{table}.identical.json").write_text(json.dumps(truth.identical))


def _load_truth(table: str):
    import pyarrow.parquet as pq

    from pipeline.demo.planted_table import Truth

    t = pq.read_table(f"{table}.truth.parquet")
    return Truth(
        source=t.column("source").to_pylist(),
        copy=t.column("copy").to_pylist(),
        cosine=t.column("cosine").to_pylist(),
        phash_findable=t.column("phash_findable").to_pylist(),
        identical=json.loads(Path(f"{table}.identical.json").read_text()),
    )


def step_dedup(table: str, output: str, full: str) -> dict:
    from pipeline.corpus.dedup import run_dedup

    summary = run_dedup(table, output, full=full == "full")
    return {
        "seconds": summary.seconds,
        "threshold": summary.embedding.threshold,
        "budget_threshold": summary.embedding.budget_threshold,
        "expected_false_edges": summary.embedding.expected_false_edges,
        "search_recall": summary.embedding.search_recall,
        "index": {k: v for k, v in summary.index.items()},
        "clusters": summary.clusters,
        "edges": summary.edges,
    }


def step_increment(table: str, added: int, changed: int, deleted: int, kind: str, rows: int) -> dict:
    from pipeline.demo.planted_table import Increment, PlantedSpec, apply_increment

    truth = _load_truth(table)
    spec = PlantedSpec(rows=rows, kind=kind)
    done = apply_increment(table, spec, Increment(added=added, changed=changed, deleted=deleted), truth)
    _save_truth(table, truth)
    return done


def step_score(table: str, output: str) -> dict:
    """The dedup output against the planted truth."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    truth = _load_truth(table)
    clusters = pq.read_table(f"{output}/clusters.parquet", columns=["uri", "cluster_id"])
    uris = clusters.column("uri")
    label = pc.dictionary_encode(clusters.column("cluster_id")).combine_chunks().indices.to_numpy()

    def rows_of(names):
        return pc.index_in(pa_strings(names), uris).to_numpy(zero_copy_only=False).astype(np.int64)

    source, copy = rows_of(truth.source), rows_of(truth.copy)
    together = label[source] == label[copy]
    embedding_only = ~np.asarray(truth.phash_findable, bool)
    edges = pq.read_table(f"{output}/edges.parquet", columns=["uri_a", "uri_b", "signal"])
    emb = edges.filter(pc.equal(edges.column("signal"), "embedding"))
    a, b = rows_of(emb.column("uri_a").to_pylist()), rows_of(emb.column("uri_b").to_pylist())
    width = len(uris) + 1
    direct = np.isin(
        np.minimum(source, copy) * width + np.maximum(source, copy),
        np.minimum(a, b) * width + np.maximum(a, b),
    )
    family = _families(len(uris), source, copy, rows_of(truth.identical))
    return {
        "planted": int(len(source)),
        "planted_recall": round(float(together.mean()), 5),
        "embedding_only_recall": round(float(together[embedding_only].mean()), 5),
        "search_found": round(float(direct[embedding_only].mean()), 5),
        "false_merges": _false_merges(label, family),
        "false_edges": _false_edges(edges, rows_of, family),
    }


def pa_strings(values):
    import pyarrow as pa

    return pa.array(values, pa.string())


def _families(n, source, copy, identical):
    """Each row's planted family: a row with its planted copies, or the identical rows."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a = np.r_[source, identical[1:]] if len(identical) else source
    b = np.r_[copy, np.full(max(len(identical) - 1, 0), identical[0] if len(identical) else 0)]
    return connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)[1]


def _false_merges(label, family) -> int:
    """Clusters holding rows of two or more planted families."""
    import numpy as np

    pairs = np.unique(np.stack([label, family], axis=1), axis=0)
    return int((np.bincount(pairs[:, 0]) > 1).sum())


def _false_edges(edges, rows_of, family) -> dict:
    """Edges between rows of different planted families, by signal (random 64-bit hashes
    fall within 6 bits of each other about 4 times among a million: phash's own rate)."""
    out = {}
    for signal in ("sha256", "phash", "embedding"):
        import pyarrow.compute as pc

        chosen = edges.filter(pc.equal(edges.column("signal"), signal))
        a, b = rows_of(chosen.column("uri_a").to_pylist()), rows_of(chosen.column("uri_b").to_pylist())
        out[signal] = int((family[a] != family[b]).sum())
    return out


# ---- commands ----------------------------------------------------------------------------
def _table(args) -> str:
    name = f"planted-{args.kind}-{args.rows}" + (f"-identical{args.identical}" if args.identical else "")
    table = str(Path(args.workdir) / name)
    if not Path(table, "_current.json").exists():
        shutil.rmtree(table, ignore_errors=True)
        made = _child("make", table, str(args.rows), args.kind, str(args.identical))
        print(f"made {table}: {made['wall_seconds']} s, {made['planted']} planted pairs", flush=True)
    return table


def _print_dedup(name: str, r: dict, score: dict) -> None:
    idx = r["index"]
    print(
        f"{name}: {r['wall_seconds']} s wall, peak {r['peak_mib']} MiB; threshold {r['threshold']:.4f} "
        f"(budget edge {r['budget_threshold']}); planted recall {score['planted_recall']}, embedding-only "
        f"{score['embedding_only_recall']}, search found {score['search_found']}, false merges "
        f"{score['false_merges']} (false edges by signal {score['false_edges']}); {idx['mode']}: "
        f"{idx.get('rows_read')} embeddings read, "
        f"{idx.get('entries_searched')} of {idx.get('entries')} vectors searched; "
        f"timings {idx.get('timings')}",
        flush=True,
    )
    print(f"  search recall (sampled): {r['search_recall']}; index facts: {json.dumps(idx)}", flush=True)


def command_dedup(args) -> None:
    table = _table(args)
    output = str(Path(args.workdir) / f"dedup-{Path(table).name}")
    shutil.rmtree(output, ignore_errors=True)
    r = _child("dedup", table, output, "full")
    _print_dedup(f"dedup {args.rows} {args.kind}", r, _child("score", table, output))


def command_identical(args) -> None:
    import pyarrow.parquet as pq

    table = _table(args)
    output = str(Path(args.workdir) / f"dedup-{Path(table).name}")
    shutil.rmtree(output, ignore_errors=True)
    r = _child("dedup", table, output, "full")
    _print_dedup(
        f"identical {args.identical} among {args.rows + args.identical}", r, _child("score", table, output)
    )
    edges = pq.read_metadata(f"{output}/edges.parquet").num_rows
    rows = args.rows + args.identical
    print(f"  edges {edges} for {rows} rows ({edges / rows:.3f} a row)")


def _chain(work: Path, tags: str, name: str, mode: str, previous: str | None) -> dict:
    """dedup, split, audit as a nightly runs them (each in its own process), into work/name."""
    dedup, splits = str(work / name / "dedup"), str(work / name / "splits")
    d = _child("dedup", tags, dedup, mode)
    _print_dedup(f"{name}: dedup ({mode})", d, _child("score", tags, dedup))
    s = _child("split", tags, dedup, splits, previous or "")
    a = _child("audit", splits, tags, dedup, str(d["threshold"]))
    print(
        f"{name}: split {s['wall_seconds']} s, peak {s['peak_mib']} MiB; audit {a['wall_seconds']} s, "
        f"peak {a['peak_mib']} MiB, {a['leaks']} leaks, {a['embedding']}",
        flush=True,
    )
    return {"seconds": d["wall_seconds"] + s["wall_seconds"] + a["wall_seconds"]}


def command_nightly(args) -> None:
    """A full build, a nightly's change (1% of rows: half new, a quarter changed, a quarter
    deleted), the incremental dedup + split + audit, and a rebuild of all three after it."""
    table = _table(args)
    work = Path(args.workdir) / f"nightly-{Path(table).name}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(table, work / "tags")
    for suffix in (".truth.parquet", ".identical.json"):
        shutil.copy(f"{table}{suffix}", f"{work / 'tags'}{suffix}")
    tags = str(work / "tags")
    _chain(work, tags, "run", "full", None)
    change = max(1, args.rows // 100)
    step = (str(change // 2), str(change // 4), str(change // 4))
    print(f"nightly change: {_child('increment', tags, *step, args.kind, str(args.rows))}", flush=True)
    previous = str(work / "previous-splits.parquet")
    shutil.copy(work / "run" / "splits" / "splits.parquet", previous)
    nightly = _chain(work, tags, "run", "incremental", previous)
    rebuilt = _chain(work, tags, "rebuilt", "full", previous)
    same = _child("compare", str(work / "run"), str(work / "rebuilt"))
    alone = _child("audit", str(work / "rebuilt" / "splits"), tags, "", "auto")  # `audit --tags`, no --dedup
    print(
        f"audit of the split with --tags alone (a train-only index of its own): {alone['wall_seconds']} s, "
        f"peak {alone['peak_mib']} MiB, {alone['leaks']} leaks",
        flush=True,
    )
    floor = sum(_child("imports", stage)["wall_seconds"] for stage in ("dedup", "split", "audit"))
    print(f"the three processes' start and imports alone (no work): {floor:.1f} s", flush=True)
    ratio = nightly["seconds"] / rebuilt["seconds"]
    print(
        f"nightly / rebuild (dedup + split + audit): {nightly['seconds']:.1f} / {rebuilt['seconds']:.1f} s "
        f"= {ratio:.3f}; equal: {same}",
        flush=True,
    )


def step_split(tags: str, dedup: str, output: str, previous: str) -> dict:
    from pipeline.corpus.split import run_split

    report = run_split(tags, dedup, output, previous=previous or None)
    return {"sizes": report.sizes}


def step_audit(splits: str, tags: str, dedup: str, threshold: str) -> dict:
    from pipeline.corpus.audit import run_audit

    cosine = threshold if threshold == "auto" else float(threshold)
    output = f"{splits}/audit" if dedup else f"{splits}/audit-alone"
    _, report = run_audit(
        splits, splits, output=output, tags=tags, embedding_threshold=cosine, dedup=dedup or None
    )
    return {"leaks": report.leaks, "embedding": report.embedding.index}


def step_imports(stage: str) -> dict:
    """What a stage's process costs before any work: the modules its run imports."""
    import importlib

    for name in {
        "dedup": ["pipeline.corpus.dedup", "faiss", "scipy.stats"],
        "split": ["pipeline.corpus.split"],
    }.get(stage, ["pipeline.corpus.audit", "faiss"]):
        importlib.import_module(name)
    return {"stage": stage}


def step_compare(a: str, b: str) -> dict:
    import pyarrow.parquet as pq

    def partition(folder):
        t = pq.read_table(f"{folder}/dedup/clusters.parquet", columns=["uri", "cluster_id"])
        groups: dict = {}
        for uri, cluster in zip(t.column("uri").to_pylist(), t.column("cluster_id").to_pylist()):
            groups.setdefault(cluster, []).append(uri)
        return {frozenset(g) for g in groups.values()}

    def table(folder, name, columns):
        t = pq.read_table(f"{folder}/{name}", columns=columns)
        return t.sort_by([(c, "ascending") for c in columns])

    left, right = partition(a), partition(b)
    splits = table(a, "splits/splits.parquet", ["uri", "split"]).equals(
        table(b, "splits/splits.parquet", ["uri", "split"])
    )
    leaks = table(a, "splits/audit/leaks.parquet", ["eval_uri", "train_uri", "signal"]).equals(
        table(b, "splits/audit/leaks.parquet", ["eval_uri", "train_uri", "signal"])
    )
    return {
        "clusters": left == right,
        "clusters_differing": len(left ^ right),
        "splits": splits,
        "leaks": leaks,
    }


STEPS = {
    "make": lambda a: step_make(a[0], int(a[1]), a[2], int(a[3])),
    "dedup": lambda a: step_dedup(*a),
    "score": lambda a: step_score(*a),
    "increment": lambda a: step_increment(a[0], int(a[1]), int(a[2]), int(a[3]), a[4], int(a[5])),
    "compare": lambda a: step_compare(*a),
    "split": lambda a: step_split(*a),
    "audit": lambda a: step_audit(*a),
    "imports": lambda a: step_imports(*a),
}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--step":
        import logging

        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(STEPS[sys.argv[2]](sys.argv[3:]), default=str))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["dedup", "nightly", "identical"])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--kind", default="random", choices=["random", "clustered"])
    parser.add_argument("--identical", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/tagpipe-scale")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores", flush=True)
    {"dedup": command_dedup, "nightly": command_nightly, "identical": command_identical}[args.command](args)


if __name__ == "__main__":
    main()
