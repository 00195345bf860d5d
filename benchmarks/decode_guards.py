"""What the hostile-input guards cost per image, measured side by side.

    python benchmarks/decode_guards.py [--images 20] [--rounds 5]

On the same in-memory 3 MP files (JPEG q90 from tests/sample_photos.py, and the same
frames as PNG), one process, rounds interleaved, best round kept:
  unguarded  decode_image with the memory budget off (max_memory=0 skips the pre-check
             too; Pillow's pixel checks and the PNG/JPEG byte checks still run)
  guarded    DecodeStage's per-image decode: the same, inside the RLIMIT_AS budget
  checks     check_png_chunks / check_jpeg_length alone (the byte-level checks)
  limit      entering and leaving memory_limit alone (getrlimit, /proc/self/statm, two setrlimit)
Prints ms per image and guarded/unguarded.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import cpu_name  # noqa: E402

from pipeline.image.decode import DecodeStage, memory_limit  # noqa: E402
from pipeline.image.imaging import (  # noqa: E402
    DecodeOptions,
    check_jpeg_length,
    check_png_chunks,
    decode_image,
)
from pipeline.model.profiles import load_profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/sample_photos.py
from sample_photos import mosaic_3mp  # noqa: E402


def _png(jpeg: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, "PNG")
    return out.getvalue()


def _best(call, files: list[bytes], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for data in files:
            call(data)
        best = min(best, (time.perf_counter() - started) / len(files))
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pre = load_profile("wd_v3").preprocess
    jpegs = mosaic_3mp(args.images)
    inputs = {"JPEG": jpegs, "PNG": [_png(j) for j in jpegs[: max(4, args.images // 4)]]}
    unguarded_options = DecodeOptions(max_memory=0)
    guarded = DecodeStage(pre, DecodeOptions())
    print(f"{cpu_name()}, {os.cpu_count()} cores; {args.images} 3 MP images, best of {args.rounds} rounds")
    print(f"{'format':6} {'unguarded ms':>13} {'guarded ms':>11} {'ratio':>6} {'byte checks ms':>15}")
    for fmt, files in inputs.items():
        check = check_png_chunks if fmt == "PNG" else (lambda d: check_jpeg_length(d, 2048, 1536))
        times = {"unguarded": [], "guarded": [], "checks": []}
        for _ in range(args.rounds):  # interleaved, so drift hits all three alike
            times["unguarded"].append(_best(lambda d: decode_image(d, pre, unguarded_options), files, 1))
            times["guarded"].append(_best(guarded._decode, files, 1))
            times["checks"].append(_best(check, files, 1))
        u, g, c = (min(times[k]) for k in ("unguarded", "guarded", "checks"))
        print(f"{fmt:6} {u:13.2f} {g:11.2f} {g / u:6.3f} {c:15.3f}")
    started = time.perf_counter()
    for _ in range(10000):
        with memory_limit(2 * 1024**3):
            pass
    print(f"memory_limit alone: {(time.perf_counter() - started) / 10000 * 1e6:.1f} us per image")


if __name__ == "__main__":
    main()
