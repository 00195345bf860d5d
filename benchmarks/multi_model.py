"""Two models in one pass against two passes, on the same 3 MP JPEGs.

    python benchmarks/multi_model.py [--images 300] [--rounds 3] [--e2e-images 600]
                                     [--workdir /tmp/tagpipe-multi-model]

(1) Decode CPU, in this process on one core: DecodeStage with both models'
    preprocessings (one read, one sha256, one decode per distinct draft and one phash
    per image hashed, then each geometry's resize) against a DecodeStage per model, one
    after the other (what two runs do). The two alternate over --rounds rounds; the best
    round of each counts. Pairs: CL v2's squash 384 with WD v3's pad 448 (different
    geometries, the same DCT scale on a 4:3 3 MP image) in fast and exact decode; WD v3
    with JTP-1's fit 384; two models of one preprocessing.
(2) End to end: `tagpipe tag --model A --model B` against two `tagpipe tag` runs, each
    from a cold local Ray on every core (demo models: squash 384 and pad 448). Wall
    seconds and the CPU seconds of the Ray workers (decode tasks, tagger actors, part
    writers) and of the whole process tree.
Prints each ratio one pass / two passes; the target is decode CPU <= 0.6.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/tag_job.py, efficiency.py
from efficiency import cpu_by_process, one_core, where_cpu_went  # noqa: E402
from tag_job import make_images, start_local_ray  # noqa: E402

from pipeline.demo.model import write_demo_bundle  # noqa: E402
from pipeline.image.decode import DecodeStage  # noqa: E402
from pipeline.image.imaging import DecodeOptions  # noqa: E402
from pipeline.job.settings import make_tag_config  # noqa: E402
from pipeline.model.profiles import load_profile  # noqa: E402
from pipeline.model.runtime import available_cpus  # noqa: E402

BATCH = 16


def decode_seconds(uris: list[str], stages: list[DecodeStage]) -> float:
    """CPU seconds this process spends decoding every image with each stage in turn."""
    started = time.process_time()
    for stage in stages:
        for i in range(0, len(uris), BATCH):
            stage({"uri": np.asarray(uris[i : i + BATCH], object)})
    return time.process_time() - started


def decode_ratio(uris: list[str], profiles: tuple, options: DecodeOptions, rounds: int) -> dict:
    """Best-of-rounds CPU seconds: one stage for every profile vs one stage per profile."""
    distinct = tuple(p for i, p in enumerate(profiles) if p not in profiles[:i])  # as the tag job groups them
    one = [DecodeStage(distinct, options)]
    two = [DecodeStage(pre, options) for pre in profiles]
    best = {"one_pass": float("inf"), "two_passes": float("inf")}
    for _ in range(rounds):
        best["one_pass"] = min(best["one_pass"], decode_seconds(uris, one))
        best["two_passes"] = min(best["two_passes"], decode_seconds(uris, two))
    return {**best, "ratio": best["one_pass"] / best["two_passes"]}


def end_to_end(images: Path, models: list[Path], out: Path, one_pass: bool) -> dict:
    """Wall and CPU seconds of one pass over both models, or one run per model."""
    from pipeline.job.tag_job import run_tag_job, run_tag_pass

    shutil.rmtree(out, ignore_errors=True)
    before, started = cpu_by_process(), time.perf_counter()
    ray = start_local_ray()
    if one_pass:
        run_tag_pass(make_tag_config(inputs=[str(images)], output=str(out), model=[str(m) for m in models]))
    else:
        for model in models:
            run_tag_job(make_tag_config(inputs=[str(images)], output=str(out / model.name), model=str(model)))
    wall = time.perf_counter() - started
    cpu = where_cpu_went(before, cpu_by_process())
    ray.shutdown()
    workers = sum(v for k, v in cpu.items() if k.startswith("Ray workers"))
    return {"wall": wall, "ray_workers_cpu": workers, "all_cpu": sum(cpu.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--e2e-images", type=int, default=600)
    parser.add_argument("--workdir", default="/tmp/tagpipe-multi-model")
    args = parser.parse_args()
    work = Path(args.workdir)
    uris = make_images(work / "images", max(args.images, args.e2e_images))
    squash, pad = load_profile("cl_tagger_v2").preprocess, load_profile("wd_v3").preprocess
    fit = load_profile("jtp1").preprocess
    print(f"{args.images} 3 MP JPEGs, {args.rounds} rounds, one core; CPU seconds (best round)")
    cases = [
        ("CL v2 squash 384 + WD v3 pad 448, fast decode", (squash, pad), DecodeOptions()),
        ("CL v2 squash 384 + WD v3 pad 448, exact decode", (squash, pad), DecodeOptions(exact=True)),
        ("WD v3 pad 448 + JTP-1 fit 384, fast decode", (pad, fit), DecodeOptions()),
        ("two models of one preprocessing, fast decode", (squash, squash), DecodeOptions()),
    ]
    import os

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    one_core()
    for name, profiles, options in cases:
        r = decode_ratio(uris[: args.images], profiles, options, args.rounds)
        print(
            f"decode CPU, {name}: one pass {r['one_pass']:.2f} s, two passes {r['two_passes']:.2f} s, "
            f"ratio {r['ratio']:.2f}"
        )
    if affinity is not None:
        os.sched_setaffinity(0, affinity)
    e2e_images = work / "e2e_images"
    shutil.rmtree(e2e_images, ignore_errors=True)
    e2e_images.mkdir(parents=True)
    for uri in uris[: args.e2e_images]:
        (e2e_images / Path(uri).name).symlink_to(uri)
    models = [
        write_demo_bundle(work / "squash-384"),
        write_demo_bundle(work / "pad-448", seed=1, input_size=448, resize_mode="pad_square", name="pad-448"),
    ]
    print(f"end to end, {args.e2e_images} images, {available_cpus()} CPUs, cold local Ray each:")
    two = end_to_end(e2e_images, models, work / "two", one_pass=False)
    one = end_to_end(e2e_images, models, work / "one", one_pass=True)
    for key, label in (("wall", "wall"), ("ray_workers_cpu", "Ray workers' CPU"), ("all_cpu", "all CPU")):
        print(
            f"  {label}: one pass {one[key]:.1f} s, two passes {two[key]:.1f} s, "
            f"ratio {one[key] / two[key]:.2f}"
        )


if __name__ == "__main__":
    main()
