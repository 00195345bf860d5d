"""The tag job's tagging phase, round after round on one warm local Ray.

    python benchmarks/tag_rounds.py [--images 200] [--rounds 3] [--models 1]
                                    [--workdir /tmp/tagpipe-rounds]

For comparing two trees of tagpipe side by side on a shared machine: run it with
PYTHONPATH set to each tree in turn (A B A B) and compare medians. It uses only what
every tree has (run_tag_job, the demo model, benchmarks/tag_job.py's images and Ray
start), so one copy of the script times both. Each round tags the same 3 MP JPEGs into
a fresh table (edit calibration off: it is not tagging); the first round after Ray's
start is a warm-up and not counted. Prints each round's tag_seconds (the tagging phase:
decode, model, parts) and end-to-end seconds, and their medians. --models 2 tags with
the demo model and a second one (pad 448) in one pass.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/tag_job.py
from tag_job import make_images, start_local_ray  # noqa: E402

from pipeline.demo.model import write_demo_bundle  # noqa: E402
from pipeline.job.settings import make_tag_config  # noqa: E402


def one_round(images: Path, models: list[Path], out: Path) -> tuple[float, float]:
    """(tag_seconds, end-to-end seconds) of one run into a fresh table."""
    from pipeline.job.tag_job import run_tag_job, run_tag_pass

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    settings = dict(inputs=[str(images)], output=str(out), edit_calibration_images=0)
    if len(models) == 1:
        summary = run_tag_job(make_tag_config(model=str(models[0]), **settings))
        tag_seconds = summary.timings["tag_seconds"]
    else:
        summaries = run_tag_pass(make_tag_config(model=[str(m) for m in models], **settings))
        tag_seconds = summaries.runs[0].timings["tag_seconds"]
    return tag_seconds, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", type=int, choices=(1, 2), default=1)
    parser.add_argument("--workdir", default="/tmp/tagpipe-rounds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir)
    images = work / f"images-{args.images}"
    make_images(images, args.images)
    models = [write_demo_bundle(work / "squash-384")]
    if args.models == 2:
        pad = dict(seed=1, input_size=448, resize_mode="pad_square", name="pad-448")
        models.append(write_demo_bundle(work / "pad-448", **pad))
    ray = start_local_ray()
    one_round(images, models, work / "out")  # warm-up: worker processes, first dataset
    rounds = [one_round(images, models, work / "out") for _ in range(args.rounds)]
    ray.shutdown()
    for tag, total in rounds:
        print(f"round: tag_seconds {tag:.2f}, end to end {total:.2f}")
    tag = statistics.median(r[0] for r in rounds)
    total = statistics.median(r[1] for r in rounds)
    print(
        f"median of {args.rounds}, {args.images} images, {args.models} model(s): "
        f"tag_seconds {tag:.2f}, end to end {total:.2f}"
    )


if __name__ == "__main__":
    main()
