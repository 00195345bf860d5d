"""Rethreshold (stored logits, no model) vs re-inference, on the same images.

    python benchmarks/rethreshold.py [--images 3000] [--workdir /tmp/tagpipe-bench]

Tags the benchmark's 3 MP JPEGs once with the demo model (that run is not timed), then
times, on one warm local Ray: a full re-run of `run_tag_job` with new thresholds into a
fresh output (decode + inference + postprocess), against `run_rethreshold` with the
same thresholds from the first run's parts. Both produce the same tags (checked).
Issue 5's target: rethreshold >= 20x faster.
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
from pipeline.job.rethreshold import run_rethreshold  # noqa: E402
from pipeline.job.settings import make_tag_config  # noqa: E402
from pipeline.job.tag_job import run_tag_job  # noqa: E402
from pipeline.model.runtime import available_cpus  # noqa: E402
from pipeline.table.tag_table import read_current  # noqa: E402

RULES = dict(threshold=0.3, mcut_categories=["character"], exclude=["stripes"], max_tags=6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workdir", default="/tmp/tagpipe-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir)
    images = work / f"images-{args.images}"
    make_images(images, args.images)
    model = write_demo_bundle(work / "model")
    ray = start_local_ray()
    outs = {name: work / "out" / f"rethreshold-{name}" for name in ("base", "rerun", "re")}
    for path in outs.values():
        shutil.rmtree(path, ignore_errors=True)
    run_tag_job(
        make_tag_config(inputs=[str(images)], output=str(outs["base"]), model=str(model), rows_per_part=512)
    )

    cfg = make_tag_config(
        inputs=[str(images)], output=str(outs["rerun"]), model=str(model), rows_per_part=512, **RULES
    )
    t = time.perf_counter()
    run_tag_job(cfg)
    rerun_seconds = time.perf_counter() - t
    t = time.perf_counter()
    summary = run_rethreshold(str(outs["base"]), str(model), str(outs["re"]), cfg.rules)
    re_seconds = time.perf_counter() - t
    ray.shutdown()

    a = read_current(str(outs["rerun"]), columns=["uri", "tags"]).sort_by("uri")
    b = read_current(str(outs["re"]), columns=["uri", "tags"]).sort_by("uri")
    same = a.column("tags").to_pylist() == b.column("tags").to_pylist()
    n = a.num_rows
    print(
        f"{n} images (3 MP JPEGs), demo model on CPU, {available_cpus()} CPUs, warm local Ray; rules {RULES}"
    )
    print(f"full re-run (decode + inference):  {rerun_seconds:7.2f} s  {n / rerun_seconds:8.1f} img/s")
    print(
        f"rethreshold (stored logits):       {re_seconds:7.2f} s  {n / re_seconds:8.1f} img/s  "
        f"({summary.parts} parts, {summary.rows_changed} rows changed)"
    )
    print(f"speed-up: {rerun_seconds / re_seconds:.1f}x (target >= 20x); same tags as the re-run: {same}")


if __name__ == "__main__":
    main()
