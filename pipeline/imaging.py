"""One image: bytes -> upright RGB at the model's input size, plus its phash.

Every odd shape real corpora hold is handled here (EXIF orientation, alpha, palette
transparency, CMYK/YCCK, 16-bit, 1-bit, animation); anything unusable raises
ImageError with a short kind, which the batch stage turns into an error row.
The fast path decodes large JPEGs with libjpeg DCT scaling (Image.draft) to no less
than draft_ratio (default 2) times the final size; exact=True decodes at full size.

The perceptual hash is imagehash.phash of the upright image (EXIF applied, alpha
ignored as imagehash ignores it, 16-bit scaled to 8), so it does not depend on the
model profile and matches hashes users computed with imagehash. Exact mode equals
imagehash bit for bit; fast mode hashes the drafted image (>= 128 px a side), within
2 bits on real photos (tests/test_photos.py, benchmarks/fast_vs_exact.py). A
reducing-gap resize would save 1.5 ms an image but drifts 4 bits now and then.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.phash import phash
from pipeline.profiles import AlphaOrder, Preprocess, ResizeMode

DEFAULT_MAX_PIXELS = 120_000_000  # decompression-bomb limit on declared width*height
PHASH_MIN_SIDE = 128  # drafted images keep this much for the hash (<= 2 bits off)
# Exact pad_square builds the recipe's side x side canvas up to this size; beyond it
# (a 1x10000 strip would need 300 MB) it fits then pads, which differs only in the
# one or two output rows where image and padding meet.
EXACT_PAD_CANVAS_LIMIT = 40_000_000
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
    exact: bool = False  # full-size decode and imagehash-exact phash
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse larger declared width*height before decoding
    draft_ratio: float = 2.0  # fast path: decoded JPEG keeps >= this times the model's resolution

    def __post_init__(self):
        if self.max_pixels < 1:
            raise ValueError("max_pixels must be >= 1")
        if not 1.0 <= self.draft_ratio <= 16.0:
            raise ValueError("draft_ratio must be between 1 and 16")


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


def draft_request(pre: Preprocess, width: int, height: int, ratio: float) -> tuple[int, int]:
    """The smallest decode size that keeps ratio x the final resolution and the phash minimum."""
    sx, sy = _final_scale(pre, width, height)
    want_w = max(math.ceil(width * min(1.0, ratio * sx)), min(width, PHASH_MIN_SIDE))
    want_h = max(math.ceil(height * min(1.0, ratio * sy)), min(height, PHASH_MIN_SIDE))
    return want_w, want_h


# Formats Pillow cannot read that still turn up in image corpora: named, not "not an image".
_UNSUPPORTED_SIGNATURES = (
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypjxl ", "JPEG XL"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"%PDF", "PDF"),
    (0, b"8BPS", "PSD"),
)


# Signatures of formats Pillow reads: a file that has one but will not open is corrupt,
# not "not an image" (Pillow reports both the same way).
_KNOWN_SIGNATURES = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF8", "GIF"),
    (8, b"WEBP", "WebP"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (4, b"ftypavif", "AVIF"),
)


def _signature(data: bytes, table) -> str | None:
    for offset, signature, name in table:
        if data[offset : offset + len(signature)] == signature:
            return name
    return None


def _unsupported_format(data: bytes) -> str | None:
    name = _signature(data, _UNSUPPORTED_SIGNATURES)
    if name:
        return name
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    return None


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
        name = _unsupported_format(data)
        if name:
            raise ImageError("unsupported", f"{name} files are not supported by the installed Pillow") from None
        name = _signature(data, _KNOWN_SIGNATURES)
        if name:
            raise ImageError("decode_error", f"corrupt {name} file: its header does not parse") from None
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
        want = draft_request(pre, *upright, options.draft_ratio)
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


def to_8bit(image: Image.Image) -> Image.Image:
    """High bit depths to 8-bit L by scaling (Pillow's own convert would clip at 255)."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")
    return image


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    canvas = Image.new("RGB", rgba.size, background)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any 8-bit Pillow mode to RGB; alpha (RGBA, LA, PA, palette or colour-key transparency)
    composited over background; CMYK/YCCK through Pillow's conversion."""
    image = to_8bit(image)
    if has_alpha(image):
        return composite(image.convert("RGBA"), background)
    return image if image.mode == "RGB" else image.convert("RGB")


def resample_for_input(image: Image.Image, pre: Preprocess, exact: bool, max_pixels: int) -> tuple[Image.Image, Image.Image | None]:
    """The profile's geometry, in the published recipe's order of pad and resize:
    (model input, the whole image as resampled on the way, before any pad or crop).

    image is RGB, or RGBA for profiles that composite after resizing: Pillow resizes
    RGBA premultiplied, and padding is opaque, so compositing the result afterwards
    is what such a recipe computes. The second image (None where the recipe pads
    first) lets the fast path hash a small image instead of the decoded one.
    """
    resample = pre.interpolation.pil
    width, height = image.size
    target = (pre.width, pre.height)
    if pre.resize_mode is ResizeMode.SQUASH:
        out = image.resize(target, resample) if image.size != target else image
        return out, out
    if pre.resize_mode is ResizeMode.PAD_SQUARE:
        side = max(width, height)
        if exact and side * side <= min(max_pixels, EXACT_PAD_CANVAS_LIMIT):  # the recipe: pad, then resize
            canvas = Image.new(image.mode, (side, side), _fill(image, pre.pad_color))
            canvas.paste(image, ((side - width) // 2, (side - height) // 2))
            return (canvas.resize(target, resample) if canvas.size != target else canvas), None
        return _fit_and_pad(image, pre, resample)  # same geometry without the huge canvas
    if pre.resize_mode is ResizeMode.FIT_PAD:
        return _fit_and_pad(image, pre, resample)
    # RESIZE_CROP
    scale = max(pre.width / width, pre.height / height)
    new = (max(pre.width, round(width * scale)), max(pre.height, round(height * scale)))
    resized = image.resize(new, resample) if new != image.size else image
    left, top = (new[0] - pre.width) // 2, (new[1] - pre.height) // 2
    return resized.crop((left, top, left + pre.width, top + pre.height)), resized


def _fit_and_pad(image: Image.Image, pre: Preprocess, resample: Image.Resampling) -> tuple[Image.Image, Image.Image]:
    width, height = image.size
    scale = min(pre.width / width, pre.height / height)
    new = (max(1, min(pre.width, round(width * scale))), max(1, min(pre.height, round(height * scale))))
    resized = image.resize(new, resample) if new != image.size else image
    if new == (pre.width, pre.height):
        return resized, resized
    canvas = Image.new(image.mode, (pre.width, pre.height), _fill(image, pre.pad_color))
    canvas.paste(resized, ((pre.width - new[0]) // 2, (pre.height - new[1]) // 2))
    return canvas, resized


def _fill(image: Image.Image, color: tuple[int, int, int]) -> tuple[int, ...]:
    return (*color, 255) if image.mode == "RGBA" else color


def decode_image(data: bytes, pre: Preprocess, options: DecodeOptions = DecodeOptions()) -> DecodedImage:
    """Bytes to model-ready uint8 pixels, original size and phash. Raises ImageError."""
    image, (width, height) = open_image(data, options, pre)
    try:
        image = to_8bit(image)
        alpha = has_alpha(image)
        if pre.alpha_order is AlphaOrder.AFTER_RESIZE and alpha:
            working = image.convert("RGBA")
        else:
            working = to_rgb(image, pre.alpha_background)
        model_input, resampled = resample_for_input(working, pre, options.exact, options.max_pixels)
        if model_input.mode == "RGBA":
            model_input = composite(model_input, pre.alpha_background)
        value = phash(_hash_source(image, resampled, pre, options, alpha))
        pixels = np.asarray(model_input, dtype=np.uint8)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageError("decode_error", f"cannot decode: {exc}") from None
    return DecodedImage(pixels=pixels, width=width, height=height, phash=value)


def _hash_source(image: Image.Image, resampled: Image.Image | None, pre: Preprocess, options: DecodeOptions, alpha: bool) -> Image.Image:
    """What to hash: the decoded image, as imagehash would. One shortcut in fast mode:
    imagehash squashes the image to 32x32, so a squash profile's model input (a squash
    to 384x384) hashes like the image itself (within 2 bits in 540 of 540 real-photo
    cases) and saves a 3 ms resize per 3 MP image. Hashing the fitted image of the
    pad/fit profiles instead drifted 4 bits in 2 of 720 cases, so those hash the image."""
    if options.exact or alpha or resampled is None or pre.resize_mode is not ResizeMode.SQUASH:
        return image
    downscaled = resampled.width < image.width and resampled.height < image.height
    return resampled if downscaled else image
