"""Start-up: seconds from a `tagpipe tag` process's start to its first tagged image.

    python benchmarks/startup.py [--images 64] [--rounds 3] [--workdir /tmp/tagpipe-startup]

Each round runs the tag job in a fresh Python process on the same 3 MP JPEGs (demo
model, CPU), two ways:
  cold:   the default, a private local Ray started by the run (`ray.init(address="local")`);
  joined: a local Ray already running (`ray start --head` once, as on a workstation or a
          node that runs nightly jobs), joined with --ray-address auto.
It prints, per way, the best round of: imports, Ray start (joining), listing (before Ray
starts since issue 32; alongside it before), and first tagged rows, counted from the
process's start. The images, model and output stay in --workdir for the next run (delete it when done).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/tag_job.py


def one_run(images: str, model: str, out: str, address: str | None) -> dict:
    """In a fresh process: import, run the job, and report its timings."""
    began = time.perf_counter()
    import logging

    from pipeline.job.settings import make_tag_config
    from pipeline.job.tag_job import run_tag_job

    imported = time.perf_counter() - began
    logging.basicConfig(level=logging.WARNING)
    cfg = make_tag_config(inputs=[images], output=out, model=model, ray_address=address, progress=False)
    summary = run_tag_job(cfg)
    return {"imports": imported, **summary.timings, "images": summary.images}


def _child(images: str, model: str, out: str, address: str | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, __file__, "--one", images, model, out, address or ""]
    done = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ray_cli(*args: str) -> None:
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run(
        [ray, *args], check=True, capture_output=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/tagpipe-startup")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        images, model, out, address = args.one
        print(json.dumps(one_run(images, model, out, address or None)))
        return
    from tag_job import make_images

    from pipeline.demo.model import write_demo_bundle
    from pipeline.model.runtime import available_cpus

    work = Path(args.workdir)
    uris = make_images(work / f"images-{args.images}", args.images)
    folder, model = str(uris[0].rsplit("/", 1)[0]), str(write_demo_bundle(work / "model"))
    runs: dict[str, list[dict]] = {"cold": [], "joined": []}
    _ray_cli("start", "--head", f"--num-cpus={available_cpus()}", "--include-dashboard=false")
    try:
        for _ in range(args.rounds):  # alternating, so drift falls on both
            runs["cold"].append(_child(folder, model, str(work / "out"), None))
            runs["joined"].append(_child(folder, model, str(work / "out"), "auto"))
    finally:
        _ray_cli("stop", "--force")
    print(f"{args.images} JPEGs 2048x1536, demo model on CPU, {available_cpus()} CPUs; best of {args.rounds}")
    print("| Ray | imports s | Ray start s | listing s | first tagged rows s (from process start) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for way, results in runs.items():
        best = min(results, key=lambda r: r["imports"] + r["first_rows_seconds"])
        first = best["imports"] + best["first_rows_seconds"]
        ray_start, listing = best["ray_start_seconds"], best["list_seconds"]
        print(f"| {way} | {best['imports']:.2f} | {ray_start:.2f} | {listing:.2f} | {first:.2f} |")
    for way, results in runs.items():
        print(f"{way} rounds, first rows from process start: "
              + ", ".join(f"{r['imports'] + r['first_rows_seconds']:.2f}" for r in results))  # fmt: skip


if __name__ == "__main__":
    main()
