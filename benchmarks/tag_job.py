"""The tag job on local Ray vs a plain single-process loop doing the same work.

    python benchmarks/tag_job.py [--images 600] [--workdir /tmp/tagpipe-bench]

Same images (3 MP JPEGs on local disk, from tests/sample_photos.py), same demo
model (CL v2 contract), same work per image: read, decode (fast path), phash, sha256,
inference, postprocess, Parquet. The loop is DecodeStage then TaggerStage over batches
in one process, writing one Parquet file. The Ray runs are `run_tag_job` with the
settings shown. Prints each rate, end to end (Ray start-up, listing, commits included)
and for the tagging phase alone, and the Ray/loop ratios. Output bytes per image are
printed too.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.demo.model import write_demo_bundle
from pipeline.image.decode import DecodeStage
from pipeline.image.imaging import DecodeOptions
from pipeline.job.settings import make_tag_config
from pipeline.model.runtime import ProviderChoice, available_cpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/sample_photos.py
from sample_photos import mosaic_3mp  # noqa: E402


def make_images(directory: Path, count: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(directory.glob("*.jpg"))
    if len(existing) < count:
        for i, data in enumerate(mosaic_3mp(count, seed=3)):
            (directory / f"img_{i:05d}.jpg").write_bytes(data)
    return [str(p) for p in sorted(directory.glob("*.jpg"))[:count]]


def start_local_ray(cpus: int | None = None):
    """A fresh local Ray for a benchmark: all (or `cpus`) CPUs, quiet, no progress bars."""
    import ray

    ray.init(
        address="local",
        num_cpus=cpus or available_cpus(),
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def run_loop(uris: list[str], model_dir: Path, out: Path, batch_size: int) -> tuple[float, float]:
    """(end-to-end seconds, tagging seconds) for the plain loop."""
    from pipeline.model.tagger import TaggerSettings, TaggerStage

    started = time.perf_counter()
    tagger = TaggerStage(TaggerSettings(str(model_dir), provider=ProviderChoice.CPU, intra_op_threads=1))
    decode = DecodeStage(tagger.bundle.profile.preprocess, DecodeOptions())
    t = time.perf_counter()
    tables = []
    for i in range(0, len(uris), batch_size):
        tables.append(tagger(decode({"uri": np.array(uris[i : i + batch_size], object)})))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(tables), out / "loop.parquet", compression="zstd")
    end = time.perf_counter()
    return end - started, end - t


def run_ray(images_dir: Path, model_dir: Path, out: Path, **settings) -> tuple[float, float, dict]:
    from pipeline.job.tag_job import run_tag_job

    started = time.perf_counter()
    summary = run_tag_job(
        make_tag_config(inputs=[str(images_dir)], output=str(out), model=str(model_dir), **settings)
    )
    return time.perf_counter() - started, summary.timings["tag_seconds"], summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workdir", default="/tmp/tagpipe-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir)
    images_dir = work / f"images-{args.images}"
    uris = make_images(images_dir, args.images)
    model_dir = write_demo_bundle(work / "model")
    cpus = available_cpus()
    configs = {
        "ray, defaults": dict(),
        "ray, decode batch 32": dict(decode_batch_size=32),
    }
    results = {}
    ray = start_local_ray(cpus)
    # warm-up: worker processes and the first dataset's set-up, paid once per Ray start
    # (included in the end-to-end figures through init_seconds + warm-up below)
    t = time.perf_counter()
    warm_dir = work / "images-warmup"
    warm_dir.mkdir(exist_ok=True)
    for uri in uris[:32]:
        target = warm_dir / Path(uri).name
        if not target.exists():
            shutil.copy(uri, target)
    shutil.rmtree(work / "out" / "warmup", ignore_errors=True)
    run_ray(warm_dir, model_dir, work / "out" / "warmup")
    warmup_seconds = time.perf_counter() - t
    for name, settings in configs.items():
        out = work / "out" / name.replace(" ", "").replace(",", "-")
        shutil.rmtree(out, ignore_errors=True)
        results[name] = run_ray(images_dir, model_dir, out, **settings)
    ray.shutdown()
    t = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    init_seconds = time.perf_counter() - t
    ray.shutdown()
    loop_out = work / "out" / "loop"
    shutil.rmtree(loop_out, ignore_errors=True)
    loop_total, loop_tag = run_loop(uris, model_dir, loop_out, 32)

    n = len(uris)
    print(
        f"machine: {os.cpu_count()} CPUs visible, {cpus} usable; "
        f"{n} JPEGs 2048x1536 q90 on local disk; demo model on CPU"
    )
    print(
        f"{'run':<22} {'end to end img/s':>17} {'tagging img/s':>14} "
        f"{'vs loop (e2e)':>14} {'vs loop (tagging)':>18}"
    )
    print(f"{'plain loop':<22} {n / loop_total:>17.1f} {n / loop_tag:>14.1f} {'1.00':>14} {'1.00':>18}")
    for name, (total, tag, _summary) in results.items():
        total_with_init = total + init_seconds + warmup_seconds  # what a cold `tagpipe tag` pays once
        print(
            f"{name:<22} {n / total_with_init:>17.1f} {n / tag:>14.1f} "
            f"{loop_total / total_with_init:>14.2f} {loop_tag / tag:>18.2f}"
        )
    print(
        f"(cold start added to each Ray end-to-end figure: Ray start {init_seconds:.1f} s + "
        f"first-job warm-up {warmup_seconds:.1f} s incl. 32 images)"
    )
    for name in results:
        out = work / "out" / name.replace(" ", "").replace(",", "-")
        size = sum(p.stat().st_size for p in out.glob("data/*/part-*.parquet"))
        print(f"output bytes per image ({name}): {size / n:.0f}")


if __name__ == "__main__":
    main()
