"""Synthetic images whose right tags are known, for the demo and the tests.

Each kind is drawn from a recipe (solid colour, stripes, gradient, noise) and carries
the tags a person would give it under the demo model's vocabulary. The corpus adds
planted near-duplicates (resized, re-encoded, slightly cropped copies) and broken files.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE = (220, 40, 40), (40, 200, 40), (50, 80, 230)
WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (128, 128, 128), (230, 230, 230)
STRIPE_PAIRS = 24  # stripe pairs across the image, whatever its size


@dataclass(frozen=True)
class Kind:
    name: str
    recipe: str  # solid | vstripes | hstripes | gradient | noise
    colors: tuple[tuple[int, int, int], ...]
    tags: frozenset[str]  # threshold tags (general, character, copyright, artist, meta)
    rating: str
    quality: str


def _kind(name, recipe, colors, tags, rating="general", quality="normal_quality"):
    return Kind(name, recipe, tuple(colors), frozenset(tags), rating, quality)


KINDS = {
    k.name: k
    for k in [
        _kind("red", "solid", [RED], {"red_theme", "solid_painter"}, rating="sensitive"),
        _kind("green", "solid", [GREEN], {"green_theme", "solid_painter"}),
        _kind("blue", "solid", [BLUE], {"blue_theme", "solid_painter"}),
        _kind("white", "solid", [WHITE], {"bright", "monochrome", "solid_painter"}),
        _kind("black", "solid", [BLACK], {"dark", "monochrome", "solid_painter"}, rating="questionable"),
        _kind("grey", "solid", [GREY], {"monochrome", "solid_painter"}),
        _kind(
            "red_stripes",
            "vstripes",
            [RED, LIGHT],
            {"vertical_stripes", "stripe_chan_(tagpipe)", "tagpipe_demo"},
        ),
        _kind("blue_hstripes", "hstripes", [BLUE, LIGHT], {"horizontal_stripes"}),
        _kind(
            "bw_stripes",
            "vstripes",
            [BLACK, WHITE],
            {"vertical_stripes", "monochrome", "high_contrast"},
            quality="best_quality",
        ),
        _kind(
            "bw_hstripes",
            "hstripes",
            [BLACK, WHITE],
            {"horizontal_stripes", "monochrome", "high_contrast"},
            quality="best_quality",
        ),
        _kind("gradient", "gradient", [BLACK, WHITE], {"monochrome"}),
        _kind("noise", "noise", [], {"noise"}, rating="explicit", quality="worst_quality"),
    ]
}


def render(kind: Kind, width: int, height: int, seed: int = 0) -> Image.Image:
    """Draw one RGB image of this kind at the given size."""
    if kind.recipe == "solid":
        return Image.new("RGB", (width, height), kind.colors[0])
    if kind.recipe in ("vstripes", "hstripes"):
        length = width if kind.recipe == "vstripes" else height
        band = (np.arange(length) * 2 * STRIPE_PAIRS // length) % 2
        palette = np.array(kind.colors, dtype=np.uint8)
        line = palette[band]  # [length, 3]
        if kind.recipe == "vstripes":
            pixels = np.broadcast_to(line[None, :, :], (height, width, 3))
        else:
            pixels = np.broadcast_to(line[:, None, :], (height, width, 3))
        return Image.fromarray(np.ascontiguousarray(pixels))
    if kind.recipe == "gradient":
        ramp = np.linspace(0, 255, width).round().astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp[None, :, None], (height, width, 3))))
    if kind.recipe == "noise":
        # a 192x192 grid of random cells scaled to the image: about 2 px a cell at the
        # model's input size, whatever the image size, so its edge energy is stable
        rng = np.random.default_rng(seed)
        cells = rng.integers(0, 256, size=(192, 192, 3), dtype=np.uint8)
        return Image.fromarray(cells).resize((width, height), Image.Resampling.NEAREST)
    raise ValueError(f"unknown recipe {kind.recipe}")


def encode(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()


@dataclass(frozen=True)
class CorpusEntry:
    path: str  # relative to the corpus root
    kind: str | None  # None for broken files
    tags: list[str]
    rating: str | None
    quality: str | None
    broken: bool
    duplicate_of: str | None  # the original's path for planted near-duplicates
    variant: str  # original | resized | reencoded | cropped | broken kind


def make_corpus(
    root: str | Path, images_per_kind: int = 3, seed: int = 0, broken: bool = True
) -> list[CorpusEntry]:
    """Write images under root/images and root/expected.jsonl; return the entries.

    Entry paths are relative to root/images, which is what a tag job takes as input.
    """
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    entries: list[CorpusEntry] = []

    def add(rel: str, data: bytes, entry: CorpusEntry) -> None:
        path = images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if (
            not path.is_file() or path.read_bytes() != data
        ):  # same bytes keep their mtime: a rerun changes nothing
            path.write_bytes(data)
        entries.append(entry)

    formats = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")]
    for kind in KINDS.values():
        for i in range(images_per_kind):
            width, height = rng.randint(320, 1400), rng.randint(320, 1400)
            if kind.recipe == "noise":  # noise squashed to a square would turn into stripes
                height = width
            fmt, ext = formats[i % len(formats)] if kind.recipe != "noise" else ("PNG", "png")
            image = render(kind, width, height, seed=seed * 1000 + i)
            rel = f"{kind.name}/{kind.name}_{i:03d}.{ext}"
            expected = dict(
                kind=kind.name, tags=sorted(kind.tags), rating=kind.rating, quality=kind.quality, broken=False
            )
            add(rel, encode(image, fmt), CorpusEntry(rel, duplicate_of=None, variant="original", **expected))
            if i == 0 and kind.recipe != "noise":  # planted near-duplicates of the first of each kind
                w2, h2 = max(1, width // 2), max(1, height // 2)
                variants = {
                    "resized": encode(image.resize((w2, h2), Image.Resampling.LANCZOS), "JPEG", 90),
                    "reencoded": encode(image, "JPEG", 70),
                    "cropped": encode(
                        image.crop((width // 40, height // 40, width - width // 40, height - height // 40)),
                        "JPEG",
                        92,
                    ),
                }
                for variant, data in variants.items():
                    add(
                        f"{kind.name}/{kind.name}_{i:03d}_{variant}.jpg",
                        data,
                        CorpusEntry(
                            f"{kind.name}/{kind.name}_{i:03d}_{variant}.jpg",
                            duplicate_of=rel,
                            variant=variant,
                            **expected,
                        ),
                    )
    if broken:
        good = encode(render(KINDS["red"], 400, 300), "JPEG")
        broken_files = {
            "truncated.jpg": good[: len(good) // 3],
            "empty.jpg": b"",
            "not_an_image.jpg": b"this is a text file, not a picture\n" * 10,
            "random_bytes.png": bytes(rng.getrandbits(8) for _ in range(2048)),
        }
        for name, data in broken_files.items():
            rel = f"broken/{name}"
            add(rel, data, CorpusEntry(rel, None, [], None, None, True, None, name.split(".")[0]))
    written = {images / e.path for e in entries}
    for stale in [
        p for p in images.rglob("*") if p.is_file() and p not in written
    ]:  # from an earlier, larger corpus
        stale.unlink()
    with (root / "expected.jsonl").open("w", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(json.dumps(entry.__dict__) + "\n")
    return entries


def load_expected(root: str | Path) -> dict[str, CorpusEntry]:
    """expected.jsonl, keyed by path relative to root/images."""
    out = {}
    for line in (Path(root) / "expected.jsonl").read_text(encoding="utf-8").splitlines():
        entry = CorpusEntry(**json.loads(line))
        out[entry.path] = entry
    return out
