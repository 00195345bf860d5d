"""The driver's ceilings: rows/s it can route into parts, and the memory planning takes.

    python benchmarks/driver_ceiling.py [--rows 200000] [--plan-rows 1000000,2000000]

1. Routing and writing. Rows shaped like CL Tagger v2's come back from Ray in batches of
   32: a 108k-tag vocabulary stored sparse (300 logits a row, int32 + float16), 30 tags in 7
   categories, a 1152-d float16 embedding. They go through the real SliceWriter (buffer per
   slice, concatenate, sort, check, zstd Parquet part on local disk, 4,096 rows a part),
   side by side: written on the driver's one thread (as before issue 24), and written by
   Ray tasks (`in_tasks`, as a run does now) with the driver only routing. Prints wall
   rows/s, the driver thread's rows per CPU second (its ceiling: on a cluster the tasks
   run on other cores), and the peak RSS growth.
2. Planning: classify() and plan_run() of a listing of N objects against a table of N
   rows (1% changed), uris of 60 characters. Prints seconds and the peak resident size
   growth while planning (sampled every 5 ms) per N, and a linear extrapolation to 10M
   and 100M.
Each part runs in a fresh subprocess so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from memory import PeakSampler, in_subprocess, rss_mib  # benchmarks/memory.py, beside this script

TAGS, LOGITS, EMBEDDING, TAG_NAMES = 108_000, 300, 1152, 30
CATEGORIES = ["general", "character", "copyright", "artist", "meta", "rating", "quality"]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(rng: np.random.Generator, uris: list[str], slice_number: int, schema: pa.Schema) -> pa.Table:
    n = len(uris)
    names = [f"tag_{i}" for i in range(TAG_NAMES)]
    columns = {
        "uri": uris,
        "sha256": [f"{i:064x}" for i in range(n)],
        "size": np.full(n, 1_000_000, np.int64),
        "width": np.full(n, 2048, np.int32),
        "height": np.full(n, 1536, np.int32),
        "phash": rng.integers(0, 2**63, n, dtype=np.uint64),
        "phash_hex": ["0" * 16] * n,
        "phash_degenerate": np.zeros(n, bool),
        "error": [None] * n,
        "error_kind": [None] * n,
        "model_name": ["cl_tagger_v2"] * n,
        "model_sha256": ["0" * 64] * n,
        "calibration_sha256": ["0" * 64] * n,
        "tags": [names] * n,
        **{f"tags_{c}": [names[:4]] * n for c in CATEGORIES},
        "scores": [np.full(TAG_NAMES, 0.5, np.float32)] * n,
        "rating": ["general"] * n,
        "quality": ["best"] * n,
        "embedding": list(rng.standard_normal((n, EMBEDDING)).astype(np.float16)),
        "ood_distance": np.ones(n, np.float32),
        "ood": np.zeros(n, bool),
        "logit_indices": [
            np.sort(rng.choice(TAGS, LOGITS, replace=False)).astype(np.int32) for _ in range(n)
        ],
        "logit_values": list(rng.standard_normal((n, LOGITS)).astype(np.float16)),
        "run_id": ["bench"] * n,
        "tagged_at": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
    }
    table = pa.table({name: pa.array(columns[name], schema.field(name).type) for name in schema.names})
    from pipeline.job.slices import SLICE

    return table.append_column(SLICE, pa.array(np.full(n, slice_number, np.int64)))


def routing(rows: int, in_tasks: bool = False) -> dict:
    from pipeline.core.schemas import MANIFEST_SCHEMA, tag_row_schema
    from pipeline.job.slices import SliceWriter
    from pipeline.table.tag_table import TagTable

    rng = np.random.default_rng(0)
    schema = tag_row_schema(CATEGORIES, EMBEDDING)
    uris = [f"s3://bucket/images/{i:012d}/{'x' * 24}.jpg" for i in range(rows)]
    pending = pa.Table.from_pylist(
        [{"uri": u, "source_size": 1, "etag": "e", "mtime": 1.0} for u in uris], schema=MANIFEST_SCHEMA
    )
    # Ray's batches, built before the clock starts: the driver only routes and writes them
    batches = [_batch(rng, uris[i : i + 32], i // 4096, schema) for i in range(0, rows, 32)]
    if in_tasks:
        import ray

        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        ray.get(ray.remote(num_cpus=0)(lambda: None).remote())  # a worker up before the clock
    before = _peak_mib()
    with tempfile.TemporaryDirectory() as root:
        writer = SliceWriter(TagTable(root), pending, 4096, "bench", set(), "bench", in_tasks=in_tasks)
        started, driver_cpu = time.perf_counter(), time.thread_time()
        for batch in batches:
            writer.add(batch)
        parts = writer.finish()
        seconds, driver_cpu = time.perf_counter() - started, time.thread_time() - driver_cpu
        size = sum(p.stat().st_size for p in Path(root).rglob("*.parquet"))
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "parts": len(parts),
            "driver_rows_per_cpu_s": rows / driver_cpu,
            "bytes_per_row": size / rows, "peak_growth_mib": _peak_mib() - before}  # fmt: skip


def planning(rows: int) -> dict:
    from pipeline.job.changes import classify
    from pipeline.job.incremental import Keys
    from pipeline.job.plan import empty_view, plan_run
    from pipeline.table.tag_table import Snapshot

    uris = pa.array([f"s3://bucket/images/{i:012d}/{'x' * 24}.jpg" for i in range(rows)], pa.string())
    size = pa.array(np.full(rows, 1000, np.int64))
    etag = pa.array([f"{i:032x}" for i in range(rows)], pa.string())
    mtime = pa.array(np.ones(rows))
    changed = np.zeros(rows, bool)
    changed[::100] = True  # 1% changed since the table was written
    listing = pa.table({"uri": uris, "source_size": size, "etag": etag, "mtime": mtime})
    view_size = pa.array(np.where(changed, 999, 1000).astype(np.int64))
    files = pa.array((np.arange(rows) // 4096).astype(np.int32))
    view = pa.table({"uri": uris, "source_size": view_size, "etag": etag, "mtime": mtime,
                     "sha256": pa.nulls(rows, pa.string()), "error_kind": pa.nulls(rows, pa.string()),
                     "_file": files}).cast(empty_view().schema)  # fmt: skip
    base = Snapshot(1, tuple(f"p{i}" for i in range((rows + 4095) // 4096)), rows, "m", "i", "r", "run", "t")
    before, sampler = rss_mib(), PeakSampler()
    started = time.perf_counter()
    with sampler:
        plan = plan_run(classify(listing, view), base, Keys("i", "r"))
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": seconds, "to_tag": plan.to_tag.num_rows,
            "rewrites": len(plan.rewrites), "peak_growth_mib": sampler.peak - before}  # fmt: skip

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--plan-rows", default="1000000,2000000")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, rows = args.one
        if kind == "planning":
            print(json.dumps(planning(int(rows))))
        else:
            print(json.dumps(routing(int(rows), in_tasks=kind == "routing-tasks")))
        return
    print(f"routing + part writing, CL v2-sized rows ({TAGS:,} tags, {LOGITS} sparse logits, {EMBEDDING}-d):")
    for kind, where in (("routing", "on the driver"), ("routing-tasks", "in Ray tasks")):
        r = in_subprocess(__file__, kind, str(args.rows))
        rate = f"{r['rows']:,} rows in {r['seconds']:.1f} s = {r['rows_per_s']:,.0f} rows/s wall"
        ceiling = f"driver thread {r['driver_rows_per_cpu_s']:,.0f} rows per CPU second"
        shape = f"{r['parts']} parts, {r['bytes_per_row']:,.0f} bytes/row"
        peak = f"peak RSS +{r['peak_growth_mib']:,.0f} MiB"
        print(f"  parts written {where}: {rate}; {ceiling}; {shape}, {peak}")
    print("planning (classify + plan_run), 1% changed:")
    results = [in_subprocess(__file__, "planning", str(int(n))) for n in args.plan_rows.split(",")]
    for p in results:
        print(f"  {p['rows']:>11,} rows: {p['seconds']:6.1f} s, peak RSS +{p['peak_growth_mib']:,.0f} MiB, "
              f"{p['to_tag']:,} to tag, {p['rewrites']:,} parts to rewrite")  # fmt: skip
    if len(results) >= 2:
        (n1, m1), (n2, m2) = [(p["rows"], p["peak_growth_mib"]) for p in results[-2:]]
        slope = (m2 - m1) / (n2 - n1)
        for n in (10_000_000, 100_000_000):
            print(f"  extrapolated to {n:>11,} rows: {(m2 + slope * (n - n2)) / 1024:,.1f} GiB")


if __name__ == "__main__":
    main()
