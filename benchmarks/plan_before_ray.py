"""Runs with nothing to tag: seconds for a dry run, a "no change" run and a missing input.

    python benchmarks/plan_before_ray.py [--images 1000] [--rounds 3] [--workdir /tmp/tagpipe-plan]

The images (small JPEGs, 10 folders) are tagged once (demo model, CPU) into a table;
then each case runs `run_tag_job` in a fresh Python process, as `tagpipe tag` would:
  dry run:     --dry-run against the table, which is up to date;
  no change:   the same run for real: it lists, plans, commits nothing;
  missing:     an input that does not exist.
It prints, per case, the best round of: imports, the job after imports, and whether Ray
was started. Listing, classifying and planning run before Ray (pipeline/job/tag_job.py),
so none of the three should start it. Run it with PYTHONPATH pointing at an older
checkout to see that checkout's figures the same way. The files stay in --workdir.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = ("dry run", "no change", "missing input")


def one_run(case: str, images: str, model: str, out: str) -> dict:
    """In a fresh process: import, run the case, report its seconds and Ray's state."""
    began = time.perf_counter()
    import logging

    import ray

    from pipeline.core.errors import TagpipeError
    from pipeline.job.settings import make_tag_config
    from pipeline.job.tag_job import run_tag_job

    imported = time.perf_counter() - began
    logging.basicConfig(level=logging.WARNING)
    inputs = images + "-missing" if case == "missing input" else images
    t = time.perf_counter()
    try:
        cfg = make_tag_config(inputs=[inputs], output=out, model=model, progress=False)
        answer = run_tag_job(cfg, dry_run=case == "dry run").change
    except TagpipeError as exc:
        answer = f"error: {str(exc)[:60]}"
    job = time.perf_counter() - t
    return {"imports": imported, "job": job, "ray": ray.is_initialized(), "answer": answer}


def _child(case: str, images: str, model: str, out: str) -> dict:
    args = [sys.executable, __file__, "--one", case, images, model, out]
    done = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_images(directory: Path, count: int) -> None:
    """`count` distinct 96x96 JPEGs in 10 folders (kept between runs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(5)
    for i in range(count):
        path = directory / f"f{i % 10}" / f"img_{i:05d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), np.uint8)).save(buffer, "JPEG")
        path.write_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/tagpipe-plan")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one)))
        return
    from pipeline.demo.model import write_demo_bundle
    from pipeline.model.runtime import available_cpus

    work = Path(args.workdir)
    images, out = work / f"images-{args.images}", str(work / "tags")
    make_images(images, args.images)
    model = str(write_demo_bundle(work / "model"))
    first = _child("no change", str(images), model, out)  # the first run tags them all
    print(f"{args.images} JPEGs 96x96 in 10 folders, demo model, {available_cpus()} CPUs; first run "
          f"{first['job']:.1f} s ({first['answer']}); best of {args.rounds}")  # fmt: skip
    rounds = {case: [_child(case, str(images), model, out) for _ in range(args.rounds)] for case in CASES}
    print("| case | imports s | after imports s | Ray started | answer |")
    print("| --- | ---: | ---: | --- | --- |")
    for case, results in rounds.items():
        best = min(results, key=lambda r: r["job"])
        ray = "yes" if any(r["ray"] for r in results) else "no"
        print(f"| {case} | {best['imports']:.2f} | {best['job']:.2f} | {ray} | {best['answer']} |")


if __name__ == "__main__":
    main()
