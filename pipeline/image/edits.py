"""The standard edits: what a copy of an image usually went through on its way back into
a corpus (cropped, mirrored, shrunk, re-compressed, framed, captioned, recoloured,
straightened). Tag-time calibration (pipeline/job/edit_calibration.py) applies each to a
sample of the corpus's own images and measures how far the tagger's embedding moves, so
dedup can pick an embedding threshold from the copies it has to find.

Each edit is a pure function PIL.Image -> PIL.Image, deterministic (a crop's offset
comes from a seeded generator, not from the clock). `edited_bytes` encodes an edit's
output as a file would be (PNG, lossless, except jpeg_q30's JPEG), so the copy goes
through the same decode path as any file of the corpus. Images are taken in the modes
`editable` gives (RGB, RGBA, L, LA); alpha is kept where the edit can keep it.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from pipeline.image.imaging import has_alpha, to_8bit

EDIT_SEED = 0  # the crops' offsets; changing it changes every table's calibration
PNG_LEVEL = 0  # lossless either way: stored, not compressed (the bytes never leave the task)
TEXT_BAND = "tagpipe calibration copy"
EDITABLE_MODES = ("RGB", "RGBA", "L", "LA")


def editable(image: Image.Image) -> Image.Image:
    """An upright decoded image in one of EDITABLE_MODES: 16-bit scaled (as decode does),
    palette and colour-key transparency to RGBA, CMYK and the rest to RGB."""
    image = to_8bit(image)
    if image.mode in EDITABLE_MODES:
        return image
    if has_alpha(image):
        return image.convert("RGBA")
    return image.convert("L" if image.mode == "1" else "RGB")


def _window(image: Image.Image, keep: float, name: str, seed: int) -> Image.Image:
    """A window `keep` of the width and height, placed by a generator seeded with the
    edit's name and the seed, so the same image always gives the same crop."""
    rng = random.Random(f"{name}:{seed}")
    width, height = max(1, round(image.width * keep)), max(1, round(image.height * keep))
    left = round(rng.uniform(0, 1) * (image.width - width))
    top = round(rng.uniform(0, 1) * (image.height - height))
    return image.crop((left, top, left + width, top + height))


def crop_5(image: Image.Image, seed: int = EDIT_SEED) -> Image.Image:
    """Keeps 95% of the width and height, off-centre by a seeded offset."""
    return _window(image, 0.95, "crop_5", seed)


def crop_10(image: Image.Image, seed: int = EDIT_SEED) -> Image.Image:
    """Keeps 90% of the width and height, off-centre by a seeded offset."""
    return _window(image, 0.90, "crop_10", seed)


def crop_20(image: Image.Image, seed: int = EDIT_SEED) -> Image.Image:
    """Keeps 80% of the width and height, off-centre by a seeded offset."""
    return _window(image, 0.80, "crop_20", seed)


def corner_crop(image: Image.Image) -> Image.Image:
    """The top-left 60% x 60%: a detail cut out of the image."""
    return image.crop((0, 0, max(1, round(image.width * 0.6)), max(1, round(image.height * 0.6))))


def flip(image: Image.Image) -> Image.Image:
    """The horizontal mirror image."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def resize_half(image: Image.Image) -> Image.Image:
    """Half the width and half the height (Lanczos), as a re-upload at lower resolution."""
    size = (max(1, image.width // 2), max(1, image.height // 2))
    return image.resize(size, Image.Resampling.LANCZOS)


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    """The image as a JPEG; alpha is flattened onto white, as re-encoders do."""
    if image.mode not in ("RGB", "L"):
        image = _on_white(image)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def jpeg_q30(image: Image.Image) -> Image.Image:
    """Re-encoded as a JPEG at quality 30 (heavy blocking and chroma loss), decoded back."""
    decoded = Image.open(io.BytesIO(jpeg_bytes(image, 30)))
    decoded.load()
    return decoded


def border(image: Image.Image) -> Image.Image:
    """A solid white frame adding 10% of the width (and of the height) to each side."""
    x, y = max(1, round(image.width * 0.1)), max(1, round(image.height * 0.1))
    return ImageOps.expand(image, border=(x, y, x, y), fill=_white(image.mode))


def text_band(image: Image.Image) -> Image.Image:
    """An opaque black band over the bottom 15%, with white text (PIL's default font)."""
    out = image.copy()
    band = max(1, round(image.height * 0.15))
    top = image.height - band
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, top, image.width, image.height), fill=_colour(image.mode, 0))
    font = ImageFont.load_default(size=max(8, band * 0.6))
    draw.text((band * 0.2, top + band * 0.15), TEXT_BAND, fill=_white(image.mode), font=font)
    return out


def greyscale(image: Image.Image) -> Image.Image:
    """Luminance only (L, or LA where the image has alpha)."""
    return image.convert("LA" if "A" in image.mode else "L")


def brightness(image: Image.Image) -> Image.Image:
    """Colours x1.4 (clipped at white); alpha as it was."""
    return _colours_only(image, lambda colours: ImageEnhance.Brightness(colours).enhance(1.4))


def rotate_5(image: Image.Image) -> Image.Image:
    """Turned 5 degrees anticlockwise in its own frame (expand=False); corners opaque black."""
    return image.rotate(5, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=_colour(image.mode, 0))


STANDARD_EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "crop_5": crop_5,
    "crop_10": crop_10,
    "crop_20": crop_20,
    "corner_crop": corner_crop,
    "flip": flip,
    "resize_half": resize_half,
    "jpeg_q30": jpeg_q30,
    "border": border,
    "text_band": text_band,
    "greyscale": greyscale,
    "brightness": brightness,
    "rotate_5": rotate_5,
}


def edited_bytes(name: str, image: Image.Image) -> bytes:
    """Edit `name` applied to an editable image, as file bytes: jpeg_q30's JPEG itself
    (not re-encoded), every other edit as a PNG (lossless: only the edit changes pixels)."""
    if name == "jpeg_q30":
        return jpeg_bytes(image, 30)
    out = io.BytesIO()
    STANDARD_EDITS[name](image).save(out, "PNG", compress_level=PNG_LEVEL)
    return out.getvalue()


def _colour(mode: str, level: int) -> int | tuple[int, ...]:
    """A grey level as a fill of the mode: opaque where the mode has alpha."""
    bands = len(mode)
    if bands == 1:
        return level
    return (level,) * (bands - 1) + (255,) if mode.endswith("A") else (level,) * bands


def _white(mode: str) -> int | tuple[int, ...]:
    return _colour(mode, 255)


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def _colours_only(image: Image.Image, change: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """`change` applied to the colour bands; an alpha band is put back untouched."""
    if "A" not in image.mode:
        return change(image)
    colours = image.convert(image.mode[:-1])
    out = change(colours).convert(image.mode)
    out.putalpha(image.getchannel("A"))
    return out
