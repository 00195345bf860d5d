"""Real photographs for tests and benchmarks: the ones scikit-image and scikit-learn ship.

Synthetic images are too smooth to show what DCT-scaled decoding and resampling do to
real detail, and no dataset can be downloaded here. The files are found by path, so
neither library is imported; both are in the `test` extra.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "moon.png",
    "coins.png",
    "ihc.png",
    "cell.png",
    "clock_motion.png",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


def photo_paths() -> list[Path]:
    """Every shipped photo that is installed; raises with the fix when none is."""
    found = []
    skimage = _package_dir("skimage")
    sklearn = _package_dir("sklearn")
    if skimage:
        found += [skimage / "data" / n for n in SKIMAGE_PHOTOS if (skimage / "data" / n).is_file()]
    if sklearn:
        found += [
            sklearn / "datasets" / "images" / n
            for n in SKLEARN_PHOTOS
            if (sklearn / "datasets" / "images" / n).is_file()
        ]
    if not found:
        raise RuntimeError(
            "no sample photos: install the test extra (pip install -e '.[test]'), "
            "which brings scikit-image and scikit-learn"
        )
    return found


def load_photos() -> list[tuple[str, Image.Image]]:
    """(name, RGB image) for each photo."""
    return [(p.stem, Image.open(p).convert("RGB")) for p in photo_paths()]


def jpeg(image: Image.Image, quality: int = 90, **save_args) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, **save_args)
    return out.getvalue()


def large_variants(
    count: int, seed: int = 0, long_side: tuple[int, int] = (2200, 4200)
) -> list[tuple[str, bytes]]:
    """JPEGs large enough for DCT-scaled decoding: photos scaled up (LANCZOS) to a random
    long side, randomly cropped to varied aspect ratios, with mild sensor-like grain."""
    rng = np.random.default_rng(seed)
    photos = load_photos()
    out = []
    for i in range(count):
        name, photo = photos[i % len(photos)]
        w, h = photo.size
        aspect = float(rng.choice([1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 1 / 2]))
        cw, ch = (w, min(h, round(w / aspect))) if w / h < aspect else (min(w, round(h * aspect)), h)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((left, top, left + cw, top + ch))
        target = int(rng.integers(*long_side))
        scale = target / max(cw, ch)
        big = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.LANCZOS)
        grain = rng.normal(0, 2.5, (big.height, big.width, 1))
        noisy = np.clip(np.asarray(big, np.float32) + grain, 0, 255).astype(np.uint8)
        out.append((f"{name}-{i}", jpeg(Image.fromarray(noisy), quality=int(rng.integers(80, 96)))))
    return out


def mosaic_3mp(count: int, seed: int = 0) -> list[bytes]:
    """2048x1536 (3.1 MP) JPEGs, q90: four photos per frame, the benchmark's standard input."""
    rng = np.random.default_rng(seed)
    tiles = [p.resize((1024, 768), Image.Resampling.LANCZOS) for _, p in load_photos()]
    out = []
    for _ in range(count):
        canvas = Image.new("RGB", (2048, 1536))
        for j, k in enumerate(rng.choice(len(tiles), 4, replace=False)):
            tile = tiles[k] if rng.random() < 0.5 else tiles[k].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            canvas.paste(tile, ((j % 2) * 1024, (j // 2) * 768))
        grain = rng.normal(0, 2.5, (1536, 2048, 1))
        out.append(
            jpeg(
                Image.fromarray(np.clip(np.asarray(canvas, np.float32) + grain, 0, 255).astype(np.uint8)),
                quality=90,
            )
        )
    return out
