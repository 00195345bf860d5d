"""Precision and recall of each duplicate signal on real photos with planted copies.

    python benchmarks/dedup_signals.py

Originals: the 19 photos tests/sample_photos.py ships (scikit-image, scikit-learn).
Copies of each: crops of 2, 5, 10 and 20% a side, a white border, a letterbox, half
size, JPEG q50, a mirror flip, a 3 degree rotation, brightness +25%, a colour shift,
and a text overlay. Every (original, copy) and (copy, copy) pair of one photo is a
positive; every pair across photos a negative. Each image goes through the real decode
(phash and its fragile-bit count) and the demo tagger (its embedding), then:
  sha256       identical bytes
  phash R      Hamming distance <= R between reliable hashes
  embedding t  cosine >= t (the demo model's pooled colour statistics)
  combined     sha256 or phash R=6 or embedding at the auto threshold
Prints recall (positives found) and precision (found pairs that are positives) per row.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from pipeline.corpus.duplicate_signals import auto_threshold
from pipeline.corpus.embedding_search import unit_rows
from pipeline.demo.model import write_demo_bundle
from pipeline.image.decode import DecodeStage
from pipeline.model.runtime import ProviderChoice

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/sample_photos.py
from sample_photos import photo_paths  # noqa: E402

from pipeline.model.tagger import TaggerSettings, TaggerStage


def _crop(image: Image.Image, share: float) -> Image.Image:
    dx, dy = int(image.width * share), int(image.height * share)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def _overlay(image: Image.Image) -> Image.Image:
    out = image.copy()
    draw = ImageDraw.Draw(out)
    for row in range(3):
        draw.text((10, 10 + row * 14), "tagpipe.example  @someone  #repost", fill=(255, 255, 255))
    return out


TRANSFORMS = {
    "crop 2%": lambda im: _crop(im, 0.02),
    "crop 5%": lambda im: _crop(im, 0.05),
    "crop 10%": lambda im: _crop(im, 0.10),
    "crop 20%": lambda im: _crop(im, 0.20),
    "border": lambda im: ImageOps.expand(im, border=max(im.size) // 12, fill=(255, 255, 255)),
    "letterbox": lambda im: ImageOps.pad(im, (max(im.size), max(im.size)), color=(0, 0, 0)),
    "half size": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "jpeg q50": lambda im: im,
    "flip": ImageOps.mirror,
    "rotate 3": lambda im: im.rotate(3, resample=Image.Resampling.BICUBIC, expand=False),
    "brighter": lambda im: ImageEnhance.Brightness(im).enhance(1.25),
    "colour": lambda im: ImageEnhance.Color(im).enhance(1.6),
    "text": _overlay,
}


def _encode(image: Image.Image, name: str) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=50 if name == "jpeg q50" else 92)
    return out.getvalue()


def build(folder: Path) -> tuple[list[str], list[int]]:
    uris, photo_of = [], []
    for index, path in enumerate(photo_paths()):
        original = Image.open(path).convert("RGB")
        uris.append(str(path))
        photo_of.append(index)
        for name, transform in TRANSFORMS.items():
            target = folder / f"{path.stem}-{name.replace(' ', '_').replace('%', 'pct')}.jpg"
            target.write_bytes(_encode(transform(original), name))
            uris.append(str(target))
            photo_of.append(index)
    return uris, photo_of


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        uris, photo_of = build(folder)
        stage = TaggerStage(
            TaggerSettings(str(write_demo_bundle(folder / "bundle")), provider=ProviderChoice.CPU)
        )
        batch = DecodeStage(stage.bundle.profile.preprocess)({"uri": np.asarray(uris, object)})
        rows = stage(batch).to_pydict()
    n = len(uris)
    photo = np.asarray(photo_of)
    a, b = np.triu_indices(n, 1)
    positive = photo[a] == photo[b]
    sha = np.asarray(rows["sha256"], object)
    hashes = np.asarray(rows["phash"], np.uint64)
    reliable = ~np.asarray(rows["phash_degenerate"], bool)
    unit, _ = unit_rows(np.asarray([np.asarray(e, np.float32) for e in rows["embedding"]]))
    cosine = np.einsum("ij,ij->i", unit[a].astype(np.float32), unit[b].astype(np.float32))
    distance = np.bitwise_count(hashes[a] ^ hashes[b])
    both_reliable = reliable[a] & reliable[b]
    print(
        f"{n} images ({n // (len(TRANSFORMS) + 1)} photos x {len(TRANSFORMS) + 1}), "
        f"{int(positive.sum())} positive "
        f"pairs, {int((~positive).sum())} negative; unreliable hashes: {int((~reliable).sum())}"
    )
    found = {"sha256": sha[a] == sha[b]}
    for radius in (4, 6, 8, 10, 12):
        found[f"phash R={radius}"] = both_reliable & (distance <= radius)
    for threshold in (0.99, 0.995, 0.999):
        found[f"embedding {threshold}"] = cosine >= threshold
    groups = np.arange(n)
    choice = auto_threshold(unit, np.ones(n, bool), (a[found["phash R=6"]], b[found["phash R=6"]]), groups)
    found[f"embedding auto ({choice.threshold:.4f})"] = cosine >= choice.threshold
    found["combined (sha256 | phash 6 | emb auto)"] = (
        found["sha256"] | found["phash R=6"] | (cosine >= choice.threshold)
    )
    print(f"{'signal':40s} {'recall':>7s} {'precision':>9s}")
    for name, hit in found.items():
        recall = (hit & positive).sum() / positive.sum()
        precision = (hit & positive).sum() / max(1, hit.sum())
        print(f"{name:40s} {recall:7.3f} {precision:9.3f}")
    print("recall of phash R=6 per transform (pairs original-copy):")
    first = {p: i for i, p in reversed(list(enumerate(photo_of)))}
    names = list(TRANSFORMS)
    for t, name in enumerate(names):
        copies = [first[p] + 1 + t for p in sorted(set(photo_of))]
        origin = [first[p] for p in sorted(set(photo_of))]
        d = np.bitwise_count(hashes[origin] ^ hashes[copies])
        ok = reliable[origin] & reliable[copies] & (d <= 6)
        cos = np.einsum("ij,ij->i", unit[origin].astype(np.float32), unit[copies].astype(np.float32))
        print(
            f"  {name:10s} phash {ok.mean():.2f} (median {int(np.median(d))} bits)   embedding >= auto "
            f"{(cos >= choice.threshold).mean():.2f} (median cosine {np.median(cos):.4f})"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
