"""Listing and planning at 1M and 10M objects, on a simulated object store.

    python benchmarks/listing_scale.py [--objects 1000000,10000000] [--latency 0.1]
                                       [--layouts flat,nested] [--names numbered]
                                       [--folder-walk 1000000]

The store (pipeline/storage/simulated.py, `simstore://`) serves N virtual keys and waits
--latency seconds per listing request of up to 1,000 keys, as S3's LIST round trip does
(50-300 ms). Each case runs in a fresh subprocess and goes through the code a run uses:
build_manifest (key ranges in parallel, skip rules, the manifest table), then classify()
+ plan_run() twice: as a first run (no table) and as a nightly run against a real table of
the same N rows on local disk (1% changed; parts of 4,096 rows with a 64-character sha256
each, written by a subprocess before), read part by part as a run reads it. It prints the
seconds and requests of the listing, the seconds of each plan, and the driver's memory
over the store's own key array: peak RSS growth after listing ("list"), resident size
held before the nightly plan ("held": the manifest, and what the allocator kept), and
the peak while the nightly plan runs, sampled every 5 ms ("nightly plan"). The 100M
line extrapolates the larger of the two peaks linearly from the smallest and largest N.

--folder-walk N also times the old way on a flat prefix of N keys: one `ls` paging
through every key in a row (what the folder walk does with a flat prefix), as a baseline.
"""

from __future__ import annotations

import argparse
import binascii
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from memory import PeakSampler, arrow_mib, in_subprocess, rss_mib  # benchmarks/memory.py, beside this script

from pipeline.job.changes import StoredSources, classify
from pipeline.job.incremental import Keys
from pipeline.job.plan import empty_view, plan_run
from pipeline.storage.filesystem import filesystem_for
from pipeline.storage.manifest import build_manifest
from pipeline.storage.simulated import MTIME, virtual_keys
from pipeline.table.tag_table import Snapshot, TagTable

PART_ROWS = 4096


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_table(objects: int, layout: str, names: str, root: str) -> dict:
    """The table a nightly run plans against, on local disk: one row per object, sorted
    parts of 4,096 rows with the columns planning reads (a 64-character sha256 each), 1%
    of rows with another size (changed since). Written in its own process, before."""
    keys = virtual_keys(objects, layout, names)
    rows = len(keys)
    uris = pc.binary_join_element_wise("simstore://bucket", pa.array(keys.astype(object), pa.string()), "/")
    digests = np.random.default_rng(0).integers(0, 256, (rows, 32), dtype=np.uint8)
    hexes = np.frombuffer(binascii.hexlify(digests.tobytes()), dtype="S64")
    size = np.full(rows, 1000, np.int64)
    size[::100] = 999
    view = pa.table({"uri": uris, "source_size": size, "etag": pa.nulls(rows, pa.string()),
                     "mtime": np.full(rows, MTIME), "sha256": pa.array(hexes.astype(object), pa.string()),
                     "error_kind": pa.nulls(rows, pa.string())})  # fmt: skip
    table, files = TagTable(root), []
    for start in range(0, rows, PART_ROWS):
        files.append(table.write_part(f"data/bench/part-{start:09d}.parquet", view.slice(start, PART_ROWS)))
    Path(root, "files.json").write_text(json.dumps(files))
    return {"rows": rows, "parts": len(files)}


def one_case(objects: int, layout: str, names: str, latency: float, table_root: str) -> dict:
    options = {"objects": objects, "layout": layout, "names": names, "page_latency": latency}
    fs, _ = filesystem_for("simstore://bucket/", options)
    assert len(fs.keys) == objects  # the store's own memory, before the measurement
    fs.requests = 0
    before, rss_before = _peak_mib(), rss_mib()
    started = time.perf_counter()
    manifest = build_manifest(["simstore://bucket/"], options).manifest
    listed_s, listed_peak, requests = time.perf_counter() - started, _peak_mib(), fs.requests
    started = time.perf_counter()
    first = plan_run(classify(manifest, empty_view()), None, Keys("i", "r"))
    first_s, to_tag_first = time.perf_counter() - started, first.to_tag.num_rows
    del first  # a run makes one plan: the first run's copy of every row is not the nightly's
    pa.default_memory_pool().release_unused()  # and what Arrow's allocator kept of it goes back
    before_nightly = rss_mib() - rss_before
    files = tuple(json.loads(Path(table_root, "files.json").read_text()))
    base = Snapshot(1, files, objects, "m", "i", "r", "run", "t")
    started, arrow_before = time.perf_counter(), arrow_mib()
    with PeakSampler() as sampler:  # the table's side read part by part, as a run reads it
        with PeakSampler() as classifying:
            status = classify(manifest, StoredSources.of_table(TagTable(table_root), base))
        status_mib = status.nbytes / 2**20
        nightly = plan_run(status, base, Keys("i", "r"))
    nightly_s = time.perf_counter() - started
    return {
        "objects": objects, "layout": layout, "names": names, "latency": latency,
        "rows": manifest.num_rows, "list_s": listed_s, "requests": requests,
        "list_peak_mib": listed_peak - before, "first_plan_s": first_s, "to_tag_first": to_tag_first,
        "nightly_plan_s": nightly_s, "to_tag_nightly": nightly.to_tag.num_rows,
        "nightly_peak_mib": sampler.peak - rss_before, "peak_mib": _peak_mib() - before,
        "before_nightly_mib": before_nightly, "manifest_mib": manifest.nbytes / 2**20,
        "status_mib": status_mib, "classify_peak_mib": classifying.peak - rss_before,
        "arrow_held_mib": arrow_before, "arrow_peak_mib": sampler.arrow_peak,
        "classify_arrow_peak_mib": classifying.arrow_peak,
    }  # fmt: skip


def folder_walk(objects: int, latency: float) -> dict:
    options = {"objects": objects, "layout": "flat", "names": "numbered", "page_latency": latency}
    fs, _ = filesystem_for("simstore://bucket/", options)
    assert len(fs.keys) == objects
    started = time.perf_counter()
    entries = fs.ls("bucket", detail=True)
    return {"objects": len(entries), "seconds": time.perf_counter() - started, "requests": fs.requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", default="1000000,10000000")
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--layouts", default="flat,nested")
    parser.add_argument("--names", default="numbered")
    parser.add_argument("--folder-walk", type=int, default=0)
    parser.add_argument(
        "--workdir", default=None, help="where the tables are written (default: the temp dir)"
    )
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, *rest = args.one
        if kind == "walk":
            print(json.dumps(folder_walk(int(rest[0]), float(rest[1]))))
        elif kind == "table":
            print(json.dumps(write_table(int(rest[0]), rest[1], rest[2], rest[3])))
        else:
            print(json.dumps(one_case(int(rest[0]), rest[1], rest[2], float(rest[3]), rest[4])))
        return
    print(f"simulated store, {args.latency * 1000:.0f} ms per listing request of up to 1,000 keys")
    if args.folder_walk:
        w = in_subprocess(__file__, "walk", str(args.folder_walk), str(args.latency))
        walk = f"flat {w['objects']:,}: {w['seconds']:.1f} s, {w['requests']:,} requests"
        print(f"  folder walk (one paged ls), {walk}")
    print("objects     layout  names     list s  requests  1st plan s  nightly plan s  "
          "to tag (nightly)  list MiB  held MiB  nightly plan MiB")  # fmt: skip
    results = []
    for objects in [int(n) for n in args.objects.split(",")]:
        for layout in args.layouts.split(","):
            for names in args.names.split(","):
                with tempfile.TemporaryDirectory(dir=args.workdir) as root:
                    in_subprocess(__file__, "table", str(objects), layout, names, root)
                    r = in_subprocess(__file__, "case", str(objects), layout, names, str(args.latency), root)
                results.append(r)
                print(f"{r['objects']:>10,}  {layout:6}  {names:8}  {r['list_s']:6.1f}  {r['requests']:8,}  "
                      f"{r['first_plan_s']:10.1f}  {r['nightly_plan_s']:14.1f}  {r['to_tag_nightly']:16,}  "
                      f"{r['list_peak_mib']:8,.0f}  {r['before_nightly_mib']:8,.0f}  "
                      f"{r['nightly_peak_mib']:16,.0f}", flush=True)  # fmt: skip
                print(f"{'':12}where the nightly plan's memory goes (MiB): "
                      f"manifest {r['manifest_mib']:,.0f}, "
                      f"classify's result {r['status_mib']:,.0f}, peak while classifying "
                      f"{r['classify_peak_mib']:,.0f}; Arrow's pool: {r['arrow_held_mib']:,.0f} held before, "
                      f"{r['classify_arrow_peak_mib']:,.0f} at most while classifying, "
                      f"{r['arrow_peak_mib']:,.0f} while planning", flush=True)  # fmt: skip
    flat = sorted(
        (r["objects"], max(r["peak_mib"], r["nightly_peak_mib"])) for r in results if r["layout"] == "flat"
    )
    if len(flat) >= 2 and flat[-1][0] > flat[0][0] and flat[-1][0] >= 1_000_000:  # small N: fixed costs
        (n1, m1), (n2, m2) = flat[0], flat[-1]
        at_100m = m2 + (m2 - m1) / (n2 - n1) * (100_000_000 - n2)
        print(f"driver peak extrapolated to 100,000,000 objects (linear, flat): {at_100m / 1024:,.1f} GiB")


if __name__ == "__main__":
    main()
