"""Which perceptual hashes carry enough detail to match on: fragile bits, measured.

    python benchmarks/phash_reliability.py

A bit is fragile when its DCT coefficient lies within FRAGILE_MARGIN of the median it
is compared with (pipeline/image/phash.py). For the shipped real photos (and their JPEG q70,
half-size, 2% crop copies) and for every kind of the demo's synthetic images (solid
colours, stripes, gradients, noise) at two sizes, prints the fragile-bit counts and
how many are over LOW_DETAIL_BITS (unreliable), and for the photos how many bits the
copies flip, split by whether the bit was fragile.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.image.phash import (
    DCT_MATRIX,
    FRAGILE_MARGIN,
    HASH_SIZE,
    LOW_DETAIL_BITS,
    phash_with_fragile_bits,
    to_grey,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/sample_photos.py
from sample_photos import photo_paths  # noqa: E402

from pipeline.demo.synthetic import KINDS, render


def _coefficients(image: Image.Image) -> tuple[np.ndarray, float]:
    small = to_grey(image).resize((32, 32), Image.Resampling.LANCZOS)
    low = np.round(
        (DCT_MATRIX @ np.asarray(small, np.float64) @ DCT_MATRIX.T)[:HASH_SIZE, :HASH_SIZE], 6
    ).ravel()
    return low, float(np.median(low))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue()))


COPIES = {
    "jpeg q70": lambda im: _jpeg(im, 70),
    "half size": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "2% crop": lambda im: im.crop(
        (im.width // 50, im.height // 50, im.width - im.width // 50, im.height - im.height // 50)
    ),
}


def main() -> None:
    print(
        f"fragile: |coefficient - median| < {FRAGILE_MARGIN:g}; "
        f"unreliable: more than {LOW_DETAIL_BITS} fragile bits"
    )
    photo_counts, flips_fragile, flips_firm, fragile_total = [], 0, 0, 0
    for path in photo_paths():
        image = Image.open(path).convert("RGB")
        low, median = _coefficients(image)
        fragile = np.abs(low - median) < FRAGILE_MARGIN
        photo_counts.append(int(fragile.sum()))
        for copy in COPIES.values():
            low2, median2 = _coefficients(copy(image))
            flipped = (low > median) != (low2 > median2)
            flips_fragile += int((flipped & fragile).sum())
            flips_firm += int((flipped & ~fragile).sum())
            fragile_total += int(fragile.sum())
    print(
        f"{len(photo_counts)} photos: fragile bits min {min(photo_counts)}, max {max(photo_counts)}, "
        f"unreliable {sum(c > LOW_DETAIL_BITS for c in photo_counts)}"
    )
    print(
        f"their copies ({', '.join(COPIES)}): "
        f"{flips_fragile} flips of fragile bits ({fragile_total} fragile), "
        f"{flips_firm} of firm bits ({len(photo_counts) * len(COPIES) * 64 - fragile_total} firm)"
    )
    for kind in KINDS.values():
        counts = [
            phash_with_fragile_bits(render(kind, w, h, seed=1))[1] for w, h in ((400, 300), (1000, 700))
        ]
        verdict = (
            "unreliable"
            if min(counts) > LOW_DETAIL_BITS
            else ("reliable" if max(counts) <= LOW_DETAIL_BITS else "mixed")
        )
        print(f"  {kind.name:14s} fragile bits {counts}: {verdict}")


if __name__ == "__main__":
    main()
