"""A nightly run with 1% new images vs the full run it updates, side by side.

    python benchmarks/nightly.py [--images 2000] [--new-fraction 0.01] [--workdir /tmp/tagpipe-bench]

Same 3 MP JPEGs as benchmarks/tag_job.py, demo model (CL v2 contract) on CPU, one warm
local Ray. Times (1) the full run that creates the table, (2) the nightly run after
adding --new-fraction new images, (3) a run with nothing new (the fixed cost of
listing, reading the table's source columns and deciding). Prints images run through
the model, tagging-phase seconds and end-to-end seconds for each, and the nightly/full
ratios. Issue 8's target: the nightly run costs <= 5% of the full run's inference work.

    python benchmarks/nightly.py --plan-rows 10000000

times only the driver's change classification (pipeline/incremental.classify) on a
synthetic listing and table of that many rows plus 1% new: its seconds and peak memory.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tag_job import make_images, start_local_ray  # noqa: E402

from pipeline.demo.model import write_demo_bundle  # noqa: E402
from pipeline.job.settings import make_tag_config  # noqa: E402
from pipeline.model.runtime import available_cpus  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/sample_photos.py
from sample_photos import mosaic_3mp  # noqa: E402

from pipeline.job.tag_job import run_tag_job  # noqa: E402
from pipeline.table.tag_table import read_current  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--new-fraction", type=float, default=0.01)
    parser.add_argument("--workdir", default="/tmp/tagpipe-bench")
    parser.add_argument(
        "--plan-rows", type=int, default=0, help="Only time change classification at this many rows."
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.plan_rows:
        return plan_at_scale(args.plan_rows)
    work = Path(args.workdir)
    base_dir = work / f"images-{args.images}"
    make_images(base_dir, args.images)
    new_dir = work / "nightly-new"
    shutil.rmtree(new_dir, ignore_errors=True)
    new_dir.mkdir(parents=True)
    out = work / "out" / "nightly"
    shutil.rmtree(out, ignore_errors=True)
    model = write_demo_bundle(work / "model")
    ray = start_local_ray()
    cfg = make_tag_config(
        inputs=[str(base_dir), str(new_dir)], output=str(out), model=str(model), rows_per_part=512
    )

    def timed():
        t = time.perf_counter()
        summary = run_tag_job(cfg)
        return summary, time.perf_counter() - t

    full, full_s = timed()
    count = max(1, round(args.images * args.new_fraction))
    for i, data in enumerate(mosaic_3mp(count, seed=11)):
        (new_dir / f"new_{i:05d}.jpg").write_bytes(data)
    nightly, nightly_s = timed()
    idle, idle_s = timed()
    ray.shutdown()
    rows = read_current(str(out), columns=["uri", "run_id"])
    unchanged_kept = sum(1 for r in rows.to_pylist() if r["run_id"] == full.run_id)

    print(
        f"{args.images} images + {count} new (3 MP JPEGs), demo model on CPU, "
        f"{available_cpus()} CPUs, warm local Ray"
    )
    print(
        "run                     | through the model | tagging phase s | end to end s | "
        "list s | plan s | commit s"
    )
    for name, s, total in (
        ("full (creates v1)", full, full_s),
        (f"nightly, {count} new", nightly, nightly_s),
        ("nothing new", idle, idle_s),
    ):
        t = s.timings
        print(
            f"{name:23} | {s.images:17d} | {t.get('tag_seconds', 0):15.2f} | {total:12.2f} | "
            f"{t['list_seconds']:6.2f} | "
            f"{t['plan_seconds']:6.2f} | {t.get('commit_seconds', 0):8.2f}"
        )
    print(
        f"nightly/full: images through the model {nightly.images / full.images:.2%} (target <= 5%), "
        f"tagging phase {nightly.timings['tag_seconds'] / full.timings['tag_seconds']:.2%}, "
        f"end to end {nightly_s / full_s:.2%}"
    )
    print(
        f"nightly counts: new {nightly.new}, changed {nightly.changed}, deleted {nightly.deleted}, "
        f"skipped {nightly.skipped}; "
        f"rows kept from the full run unrecomputed: {unchanged_kept}/{rows.num_rows}; "
        f"versions {full.version} -> {nightly.version} -> {idle.version}"
    )
    shutil.rmtree(new_dir, ignore_errors=True)


def plan_at_scale(n: int) -> None:
    import resource

    import numpy as np
    import pyarrow as pa

    from pipeline.job.changes import classify

    uris = pa.array([f"s3://bucket/images/{i:09d}.jpg" for i in range(n)])
    view = pa.table(
        {
            "uri": uris,
            "source_size": pa.array(np.full(n, 300_000, np.int64)),
            "etag": pa.array([f"{i:032x}" for i in range(n)]),
            "mtime": pa.array(np.full(n, 1.7e9)),
            "sha256": pa.nulls(n, pa.string()),
            "error_kind": pa.nulls(n, pa.string()),
            "_file": pa.array((np.arange(n) // 4096).astype(np.int32)),
        }
    )
    k = n // 100
    new = pa.table(
        {
            "uri": pa.array([f"s3://bucket/images/new{i:09d}.jpg" for i in range(k)]),
            "source_size": pa.array(np.ones(k, np.int64)),
            "etag": pa.array(["x"] * k),
            "mtime": pa.array(np.full(k, 1.8e9)),
        }
    )
    manifest = pa.concat_tables([view.select(["uri", "source_size", "etag", "mtime"]), new])
    t = time.perf_counter()
    status = classify(manifest, view)
    seconds = time.perf_counter() - t
    new_count = status.tally()["new"]
    print(
        f"classify {n} table rows + {k} new: {seconds:.1f} s, {new_count} new found, "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB (test data included)"
    )


if __name__ == "__main__":
    main()
