"""Listing and planning at 1M and 10M objects, on a simulated object store.

    python benchmarks/listing_scale.py [--objects 1000000,10000000] [--latency 0.1]
                                       [--layouts flat,nested] [--names numbered]
                                       [--folder-walk 1000000]

The store (pipeline/storage/simulated.py, `simstore://`) serves N virtual keys and waits
--latency seconds per listing request of up to 1,000 keys, as S3's LIST round trip does
(50-300 ms). Each case runs in a fresh subprocess and goes through the code a run uses:
build_manifest (key ranges in parallel, skip rules, the manifest table), then classify()
+ plan_run() twice: as a first run (no table) and as a nightly run against a table of the
same N rows (1% changed). It prints the seconds and requests of the listing, the seconds
of each plan, and the peak RSS growth of the driver over the store's own key array.

--folder-walk N also times the old way on a flat prefix of N keys: one `ls` paging
through every key in a row (what the folder walk does with a flat prefix), as a baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa

from pipeline.job.incremental import classify
from pipeline.job.plan import empty_view, plan_run
from pipeline.storage.filesystem import filesystem_for
from pipeline.storage.manifest import build_manifest
from pipeline.table.tag_table import Snapshot

PART_ROWS = 4096


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _table_view(manifest: pa.Table) -> pa.Table:
    """The table's side of a nightly plan: the same rows, 1% with another size."""
    rows = manifest.num_rows
    changed = np.zeros(rows, bool)
    changed[::100] = True
    size = pa.array(np.where(changed, 999, manifest["source_size"].to_numpy()).astype(np.int64))
    return pa.table(
        {"uri": manifest["uri"], "source_size": size, "etag": manifest["etag"], "mtime": manifest["mtime"],
         "sha256": pa.nulls(rows, pa.string()), "error_kind": pa.nulls(rows, pa.string()),
         "_file": pa.array((np.arange(rows) // PART_ROWS).astype(np.int32))}
    ).cast(empty_view().schema)  # fmt: skip


def one_case(objects: int, layout: str, names: str, latency: float) -> dict:
    options = {"objects": objects, "layout": layout, "names": names, "page_latency": latency}
    fs, _ = filesystem_for("simstore://bucket/", options)
    assert len(fs.keys) == objects  # the store's own memory, before the measurement
    fs.requests = 0
    before = _peak_mib()
    started = time.perf_counter()
    manifest = build_manifest(["simstore://bucket/"], options).manifest
    listed_s, listed_peak, requests = time.perf_counter() - started, _peak_mib(), fs.requests
    started = time.perf_counter()
    first = plan_run(manifest, classify(manifest, empty_view()), None, ("i", "r"))
    first_s = time.perf_counter() - started
    parts = tuple(f"p{i}" for i in range(-(-objects // PART_ROWS)))
    base = Snapshot(1, parts, objects, "m", "i", "r", "run", "t")
    started = time.perf_counter()
    nightly = plan_run(manifest, classify(manifest, _table_view(manifest)), base, ("i", "r"))
    nightly_s = time.perf_counter() - started
    return {
        "objects": objects, "layout": layout, "names": names, "latency": latency,
        "rows": manifest.num_rows, "list_s": listed_s, "requests": requests,
        "list_peak_mib": listed_peak - before, "first_plan_s": first_s, "to_tag_first": first.to_tag.num_rows,
        "nightly_plan_s": nightly_s, "to_tag_nightly": nightly.to_tag.num_rows,
        "peak_mib": _peak_mib() - before,
    }  # fmt: skip


def folder_walk(objects: int, latency: float) -> dict:
    options = {"objects": objects, "layout": "flat", "names": "numbered", "page_latency": latency}
    fs, _ = filesystem_for("simstore://bucket/", options)
    assert len(fs.keys) == objects
    started = time.perf_counter()
    entries = fs.ls("bucket", detail=True)
    return {"objects": len(entries), "seconds": time.perf_counter() - started, "requests": fs.requests}


def _in_subprocess(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", default="1000000,10000000")
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--layouts", default="flat,nested")
    parser.add_argument("--names", default="numbered")
    parser.add_argument("--folder-walk", type=int, default=0)
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, *rest = args.one
        if kind == "walk":
            print(json.dumps(folder_walk(int(rest[0]), float(rest[1]))))
        else:
            print(json.dumps(one_case(int(rest[0]), rest[1], rest[2], float(rest[3]))))
        return
    print(f"simulated store, {args.latency * 1000:.0f} ms per listing request of up to 1,000 keys")
    if args.folder_walk:
        w = _in_subprocess("walk", str(args.folder_walk), str(args.latency))
        walk = f"flat {w['objects']:,}: {w['seconds']:.1f} s, {w['requests']:,} requests"
        print(f"  folder walk (one paged ls), {walk}")
    print("objects     layout  names     list s  requests  1st plan s  nightly plan s  "
          "to tag (nightly)  list MiB  peak MiB")  # fmt: skip
    results = []
    for objects in [int(n) for n in args.objects.split(",")]:
        for layout in args.layouts.split(","):
            for names in args.names.split(","):
                r = _in_subprocess("case", str(objects), layout, names, str(args.latency))
                results.append(r)
                print(f"{r['objects']:>10,}  {layout:6}  {names:8}  {r['list_s']:6.1f}  {r['requests']:8,}  "
                      f"{r['first_plan_s']:10.1f}  {r['nightly_plan_s']:14.1f}  {r['to_tag_nightly']:16,}  "
                      f"{r['list_peak_mib']:8,.0f}  {r['peak_mib']:8,.0f}", flush=True)  # fmt: skip
    flat = sorted((r["objects"], r["peak_mib"]) for r in results if r["layout"] == "flat")
    if len(flat) >= 2 and flat[-1][0] > flat[0][0]:
        (n1, m1), (n2, m2) = flat[0], flat[-1]
        at_100m = m2 + (m2 - m1) / (n2 - n1) * (100_000_000 - n2)
        print(f"driver peak extrapolated to 100,000,000 objects (linear, flat): {at_100m / 1024:,.1f} GiB")


if __name__ == "__main__":
    main()
