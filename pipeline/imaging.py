"""One image: bytes -> upright RGB at the model's input size, plus its phash.

Every odd shape real corpora hold is handled here (EXIF orientation, alpha, palette
transparency, CMYK/YCCK, 16-bit, 1-bit, animation); anything unusable raises
ImageError with a short kind, which the batch stage turns into an error row.
The fast path decodes large JPEGs with libjpeg DCT scaling (Image.draft) to no less
than twice the final size; exact=True decodes at full size.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.phash import phash
from pipeline.profiles import Preprocess, ResizeMode

DEFAULT_MAX_PIXELS = 120_000_000  # decompression-bomb limit on declared width*height
PHASH_MIN_SIDE = 128  # drafted images keep this much for the hash (<= 2 bits off)
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees

# We enforce our own, configurable pixel limit before decoding; Pillow's global one
# would otherwise warn or raise on images the user allowed.
Image.MAX_IMAGE_PIXELS = None


class ImageError(Exception):
    """An image that cannot be used. kind is a short stable code for counting."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DecodeOptions:
    exact: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8 [H, W, 3] RGB at the model's input size
    width: int  # upright original size
    height: int
    phash: int


def _final_scale(pre: Preprocess, width: int, height: int) -> tuple[float, float]:
    """How much each axis shrinks on the way to the model's input size."""
    if pre.resize_mode is ResizeMode.SQUASH:
        return pre.width / width, pre.height / height
    if pre.resize_mode is ResizeMode.RESIZE_CROP:
        s = max(pre.width / width, pre.height / height)
    elif pre.resize_mode is ResizeMode.PAD_SQUARE:
        s = min(pre.width, pre.height) / max(width, height)
    else:  # FIT_PAD
        s = min(pre.width / width, pre.height / height)
    return s, s


def _draft_request(pre: Preprocess, width: int, height: int) -> tuple[int, int]:
    """The smallest decode size that keeps 2x the final resolution and the phash minimum."""
    sx, sy = _final_scale(pre, width, height)
    want_w = max(math.ceil(width * min(1.0, 2 * sx)), min(width, PHASH_MIN_SIDE))
    want_h = max(math.ceil(height * min(1.0, 2 * sy)), min(height, PHASH_MIN_SIDE))
    return want_w, want_h


def _error_kind(exc: BaseException) -> str:
    return "truncated" if "truncated" in str(exc).lower() or isinstance(exc, EOFError) else "decode_error"


def open_image(data: bytes, options: DecodeOptions, pre: Preprocess) -> tuple[Image.Image, tuple[int, int]]:
    """Open, check size, draft (fast path), load, rotate upright; also the upright original size."""
    if not data:
        raise ImageError("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(_error_kind(exc), f"cannot open: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError("bad_size", f"declared size {width}x{height}")
    if width * height > options.max_pixels:
        raise ImageError("too_large", f"declared size {width}x{height} exceeds the {options.max_pixels}-pixel limit")
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    if image.format == "JPEG" and not options.exact:
        upright = (height, width) if orientation in _SWAPS_AXES else (width, height)
        want = _draft_request(pre, *upright)
        if orientation in _SWAPS_AXES:
            want = (want[1], want[0])
        image.draft(None, want)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(_error_kind(exc), f"cannot decode: {exc}") from None
    if orientation != 1:
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as exc:
            raise ImageError("decode_error", f"cannot apply EXIF orientation: {exc}") from None
    original = (height, width) if orientation in _SWAPS_AXES else (width, height)
    return image, original


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode to RGB; alpha composited over background; high bit depths scaled."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        image, mode = Image.fromarray(grey, "L"), "L"
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        image, mode = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L"), "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image if mode == "RGB" else image.convert("RGB")


def resize_to_input(image: Image.Image, pre: Preprocess, exact: bool, max_pixels: int) -> Image.Image:
    """Apply the profile's geometry: the published recipe's order of pad and resize."""
    resample = pre.interpolation.pil
    width, height = image.size
    target = (pre.width, pre.height)
    if pre.resize_mode is ResizeMode.SQUASH:
        return image.resize(target, resample) if image.size != target else image
    if pre.resize_mode is ResizeMode.PAD_SQUARE:
        side = max(width, height)
        if exact and side * side <= max_pixels:  # the recipe: pad, then resize
            canvas = Image.new("RGB", (side, side), pre.pad_color)
            canvas.paste(image, ((side - width) // 2, (side - height) // 2))
            return canvas.resize(target, resample) if canvas.size != target else canvas
        return _fit_and_pad(image, pre, resample)  # same geometry without the huge canvas
    if pre.resize_mode is ResizeMode.FIT_PAD:
        return _fit_and_pad(image, pre, resample)
    # RESIZE_CROP
    scale = max(pre.width / width, pre.height / height)
    new = (max(pre.width, round(width * scale)), max(pre.height, round(height * scale)))
    resized = image.resize(new, resample) if new != image.size else image
    left, top = (new[0] - pre.width) // 2, (new[1] - pre.height) // 2
    return resized.crop((left, top, left + pre.width, top + pre.height))


def _fit_and_pad(image: Image.Image, pre: Preprocess, resample: Image.Resampling) -> Image.Image:
    width, height = image.size
    scale = min(pre.width / width, pre.height / height)
    new = (max(1, min(pre.width, round(width * scale))), max(1, min(pre.height, round(height * scale))))
    resized = image.resize(new, resample) if new != image.size else image
    if new == (pre.width, pre.height):
        return resized
    canvas = Image.new("RGB", (pre.width, pre.height), pre.pad_color)
    canvas.paste(resized, ((pre.width - new[0]) // 2, (pre.height - new[1]) // 2))
    return canvas


def decode_image(data: bytes, pre: Preprocess, options: DecodeOptions = DecodeOptions()) -> DecodedImage:
    """Bytes to model-ready uint8 pixels, original size and phash. Raises ImageError."""
    image, (width, height) = open_image(data, options, pre)
    try:
        rgb = to_rgb(image, pre.alpha_background)
        value = phash(rgb)
        model_input = resize_to_input(rgb, pre, options.exact, options.max_pixels)
        pixels = np.asarray(model_input, dtype=np.uint8)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageError("decode_error", f"cannot decode: {exc}") from None
    return DecodedImage(pixels=pixels, width=width, height=height, phash=value)
