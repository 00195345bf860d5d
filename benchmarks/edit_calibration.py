"""What tag-time edit calibration costs, and what it measures, with the demo model.

    python benchmarks/edit_calibration.py [--images 200] [--kind photos|3mp] [--workdir DIR]

A first tag run (local Ray, all CPUs) over `--images` images with
edit_calibration_images = --images, so every image is sampled: 13 decodes and 13
model rows per image (the original and its 12 standard edits) in one Ray task placed
like one tagger actor (on CPU: the actor's one intra-op thread). Images: `photos`, the
package photos (tests/sample_photos.py, 0.1-0.8 MP) cropped and scaled at random to
vary them; `3mp`, 2048x1536 JPEGs q90 (the decode benchmark's standard input).
Prints the run's timings (tagging vs calibration) and, per edit, the cosine quantiles.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from pipeline.demo.model import write_demo_bundle
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.table.tag_table import TagTable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/sample_photos.py
from sample_photos import load_photos, mosaic_3mp  # noqa: E402
from tag_job import start_local_ray  # noqa: E402  (benchmarks/tag_job.py)


def make_images(directory: Path, count: int, kind: str) -> None:
    directory.mkdir(parents=True)
    if kind == "3mp":
        for i, data in enumerate(mosaic_3mp(count, seed=5)):
            (directory / f"img_{i:05d}.jpg").write_bytes(data)
        return
    rng = np.random.default_rng(5)
    photos = load_photos()
    for i in range(count):
        _, photo = photos[i % len(photos)]
        keep = rng.uniform(0.6, 1.0)
        w, h = round(photo.width * keep), round(photo.height * keep)
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        image = photo.crop((left, top, left + w, top + h))
        out = io.BytesIO()
        image.save(out, "PNG" if i % 2 else "JPEG", **({} if i % 2 else {"quality": 90}))
        (directory / f"img_{i:05d}.{'png' if i % 2 else 'jpg'}").write_bytes(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--kind", choices=("photos", "3mp"), default="photos")
    parser.add_argument("--workdir", default="/tmp/tagpipe-bench-calibration")
    args = parser.parse_args()
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    make_images(root / "images", args.images, args.kind)
    bundle = write_demo_bundle(root / "model")
    start_local_ray()
    cfg = make_tag_config(
        inputs=[str(root / "images")],
        output=str(root / "tags"),
        model=str(bundle),
        edit_calibration_images=args.images,
        progress=False,
    )
    summary = run_tag_job(cfg)
    print(summary.text())
    timings = summary.timings
    print(
        f"{args.images} {args.kind} images: tagging {timings['tag_seconds']:.1f} s, edit calibration "
        f"{timings['edit_calibration_seconds']:.1f} s ({summary.edit_calibration.rows} copies, "
        f"{summary.edit_calibration.failed} failed)"
    )
    table = TagTable(str(root / "tags"))
    rows = table.edit_calibration(table.snapshot())
    assert rows is not None
    print(f"{'edit':<12} {'p5':>6} {'p50':>6} {'p95':>6}")
    for edit in dict.fromkeys(rows.column("edit").to_pylist()):
        cosines = rows.filter(pc.equal(rows.column("edit"), edit)).column("cosine").drop_null().to_numpy()
        p5, p50, p95 = np.percentile(cosines, [5, 50, 95])
        print(f"{edit:<12} {p5:6.3f} {p50:6.3f} {p95:6.3f}")


if __name__ == "__main__":
    main()
