"""Decode + preprocess throughput per core on 3 MP JPEGs, measured side by side.

    python benchmarks/decode.py [--images 40] [--rounds 3] [--profile cl_tagger_v2]

Methods, each on the same in-memory JPEGs (2048x1536, q90, photos from
tests/sample_photos.py), one process pinned to one core, rounds interleaved and the
best round kept:
  naive         Image.open -> convert RGB -> resize to the input -> float32 normalise
  bare-draft    Image.draft to the same size tagpipe's fast path asks for -> resize (uint8)
  bare-draft-1x Image.draft to the input size itself -> resize (uint8)
  fast          tagpipe's decode stage work per image: sha256 + decode_image (draft
                ratio 2: EXIF, alpha, phash, geometry)
  fast-1x       the same with --draft-ratio 1
  exact         decode_image(exact=True): full-size decode, imagehash-exact phash
  decode-1/8    Image.draft at 1/8 scale and nothing else: the entropy-decoding floor
                that no DCT-scaled path can beat
Prints img/s per core and the ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features

from pipeline.image.imaging import DecodeOptions, decode_image, draft_request
from pipeline.model.profiles import load_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/sample_photos.py
from sample_photos import mosaic_3mp  # noqa: E402

from pipeline.model.session_runner import Normaliser


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default="cl_tagger_v2")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core: per-core figures

    pre = load_profile(args.profile).preprocess
    target = (pre.width, pre.height)
    resample = pre.interpolation.pil
    normalise = Normaliser(pre)
    jpegs = mosaic_3mp(args.images, seed=0)

    def naive(data: bytes):
        image = Image.open(io.BytesIO(data)).convert("RGB").resize(target, resample)
        return normalise(np.asarray(image)[None])

    def bare(ratio: float):
        def run(data: bytes):
            image = Image.open(io.BytesIO(data))
            image.draft("RGB", draft_request(pre, *image.size, ratio))
            return np.asarray(image.convert("RGB").resize(target, resample))

        return run

    def tagpipe(options: DecodeOptions):
        def run(data: bytes):
            hashlib.sha256(data).hexdigest()
            return decode_image(data, pre, options).pixels

        return run

    def decode_eighth(data: bytes):
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (image.width // 8, image.height // 8))
        image.load()

    methods = {
        "naive": naive,
        "bare-draft": bare(2.0),
        "bare-draft-1x": bare(1.0),
        "fast": tagpipe(DecodeOptions()),
        "fast-1x": tagpipe(DecodeOptions(draft_ratio=1.0)),
        "exact": tagpipe(DecodeOptions(exact=True)),
        "decode-1/8": decode_eighth,
    }
    best = {name: float("inf") for name in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            for data in jpegs:
                fn(data)
            best[name] = min(best[name], time.perf_counter() - start)
    rate = {name: len(jpegs) / seconds for name, seconds in best.items()}

    probe = Image.open(io.BytesIO(jpegs[0]))
    probe.draft("RGB", draft_request(pre, *probe.size, 2.0))
    print(
        f"machine: {cpu_name()}, 1 core; Pillow {PIL.__version__}, "
        f"libjpeg-turbo {features.version('libjpeg_turbo')}"
    )
    print(
        f"input: {len(jpegs)} JPEGs 2048x1536 q90, "
        f"mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB; profile {args.profile} "
        f"({pre.resize_mode.value} {pre.width}x{pre.height} {pre.interpolation.value}); "
        f"fast path decodes at {probe.size[0]}x{probe.size[1]}"
    )
    print(f"{'method':<14} {'img/s/core':>10}")
    for name in methods:
        print(f"{name:<14} {rate[name]:>10.1f}")
    print(f"fast / naive          = {rate['fast'] / rate['naive']:.2f}x   (target >= 5x)")
    print(f"fast / bare-draft     = {rate['fast'] / rate['bare-draft']:.2f}    (target >= 0.85)")
    print(f"fast-1x / naive       = {rate['fast-1x'] / rate['naive']:.2f}x")
    print(f"fast-1x / bare-1x     = {rate['fast-1x'] / rate['bare-draft-1x']:.2f}")
    print(f"exact / naive         = {rate['exact'] / rate['naive']:.2f}x")
    print(
        f"decode-1/8 / naive    = {rate['decode-1/8'] / rate['naive']:.2f}x   "
        "(the ceiling for any DCT-scaled path)"
    )


if __name__ == "__main__":
    main()
