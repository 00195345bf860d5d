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
2 bits on real photos (tests/image/test_photos.py, benchmarks/fast_vs_exact.py). A
reducing-gap resize would be faster but drifts past 2 bits now and then (docs/benchmarks.md,
'Fast vs exact fidelity (issue 3)').

Why this module is long: one image's decode path (open, bomb limits, byte-level checks,
the budgeted load, EXIF, modes, alpha, geometry); each step guards the next, and keeping
them together lets the order of the guards be read top to bottom.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.core.errors import ErrorKind
from pipeline.image.phash import phash_with_fragile_bits
from pipeline.model.geometry import centre_box, fit_size, pad_offset, resized_size
from pipeline.model.profiles import AlphaOrder, Preprocess, ResizeMode, Rounding

DEFAULT_MAX_PIXELS = (
    120_000_000  # decompression-bomb limit on any frame's, tile's or sub-image's width*height
)
DEFAULT_MAX_DECODE_MEMORY = (
    2 * 1024**3
)  # bytes one image's decode may add to its process (pipeline/image/decode.py)
PHASH_MIN_SIDE = 128  # drafted images keep this much for the hash (<= 2 bits off)
# Exact pad_square builds the recipe's side x side canvas up to this size; beyond it
# (a 1x10000 strip would need 300 MB) it fits then pads, which differs only in the
# one or two output rows where image and padding meet.
EXACT_PAD_CANVAS_LIMIT = 40_000_000
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


class ImageError(Exception):
    """An image that cannot be used; kind says why, for counting."""

    def __init__(self, kind: ErrorKind, message: str, size: tuple[int, int] | None = None):
        super().__init__(message)
        self.kind = kind
        self.size = size  # the declared size, when the file got as far as saying it


@dataclass(frozen=True)
class DecodeOptions:
    exact: bool = False  # full-size decode and imagehash-exact phash
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse larger declared width*height before decoding
    draft_ratio: float = 2.0  # fast path: decoded JPEG keeps >= this times the model's resolution
    max_memory: int = (
        DEFAULT_MAX_DECODE_MEMORY  # an image whose pixels alone need more is refused unread; 0: none
    )

    def __post_init__(self):
        if self.max_pixels < 1:
            raise ValueError("max_pixels must be >= 1")
        if self.max_memory < 0:
            raise ValueError("max_memory must be >= 0")
        if not 1.0 <= self.draft_ratio <= 16.0:
            raise ValueError("draft_ratio must be between 1 and 16")


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8 [H, W, 3] RGB at the model's input size
    width: int  # upright original size
    height: int
    phash: int
    phash_fragile_bits: int = 0  # bits within FRAGILE_MARGIN of the median (pipeline/image/phash.py)


def _final_scale(pre: Preprocess, width: int, height: int) -> tuple[float, float]:
    """How much each axis shrinks on the way to the model's input (its resize size)."""
    new = resized_size(pre, (width, height))
    return new[0] / width, new[1] / height


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


def _error_kind(exc: BaseException) -> ErrorKind:
    if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
        return ErrorKind.TRUNCATED
    return ErrorKind.DECODE_ERROR


# What Pillow raises for a corrupt file (its plugins use all of these).
DECODER_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
)
BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_BYTES_PER_PIXEL = {
    "1": 1,
    "L": 1,
    "P": 1,
    "I;16": 2,
    "I;16L": 2,
    "I;16B": 2,
    "I;16N": 2,
}  # Pillow's storage; others 4


@contextlib.contextmanager
def pillow_pixel_limit(max_pixels: int):
    """Pillow's own decompression-bomb checks, at max_pixels and as errors, for the
    block below. Its plugins check what tagpipe cannot see from outside: each ICO and
    ICNS sub-image, each GIF frame, each TIFF tile, before decoding any of it. A file
    refused while it is opened leaves no image, so its row has no size."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # libjpeg's "corrupt data" and similar chatter
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def check_png_chunks(data: bytes) -> None:
    """Walk a PNG's chunks to IEND and check the CRC of every critical one (as libpng
    does), so a flipped bit in the image data or a cut-off end is an error, not a row of
    silently wrong pixels: Pillow checks neither while it decodes."""
    offset, end = 8, len(data)
    canvas = struct.unpack_from(">II", data, 16) if end >= 24 else (0, 0)
    while offset + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, offset)
        body_end = offset + 8 + length
        if body_end + 4 > end:
            raise ImageError(ErrorKind.TRUNCATED, f"PNG chunk {kind!r} runs past the end of the file")
        crc = struct.unpack_from(">I", data, body_end)[0]
        if kind[:1].isupper() and zlib.crc32(data[offset + 4 : body_end]) != crc:
            raise ImageError(ErrorKind.DECODE_ERROR, f"PNG chunk {kind!r} fails its CRC check")
        if kind == b"fcTL" and length >= 20:
            _check_apng_frame(data[offset + 8 : body_end], canvas)
        if kind == b"IEND":
            return
        offset = body_end + 4
    raise ImageError(ErrorKind.TRUNCATED, "PNG ends without an IEND chunk")


_HUFFMAN_DCT_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive; not lossless or arithmetic


def check_jpeg_length(data: bytes, width: int, height: int) -> None:
    """A Huffman-coded JPEG spends at least one bit on every 8x8 luma block, so a file
    shorter than that cannot hold the image its header declares. libjpeg decodes such a
    file without an error (it fills the missing rows with grey and only warns), so this
    is the check that stops a header claiming 64x65500 over 600 bytes, or a cut-off file
    that kept its end marker."""
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return  # not a marker where one should be: the decoder will say what is wrong
        marker = data[offset + 1]
        if marker == 0xDA:  # start of scan: no frame header seen
            return
        if marker in _HUFFMAN_DCT_FRAMES:
            blocks = -(-width // 8) * -(-height // 8)
            if len(data) * 8 < blocks:
                need = f"a {width}x{height} JPEG needs at least {blocks // 8} bytes; the file has {len(data)}"
                raise ImageError(ErrorKind.TRUNCATED, need)
            return
        offset += 2 + struct.unpack_from(">H", data, offset + 2)[0]


def _check_apng_frame(fctl: bytes, canvas: tuple[int, int]) -> None:
    """An APNG frame must lie within the image (the APNG spec): one that does not is a
    corrupt file, or a bomb in a frame tagpipe would never decode."""
    sequence, width, height, x, y = struct.unpack_from(">IIIII", fctl)
    if not width or not height or x + width > canvas[0] or y + height > canvas[1]:
        raise ImageError(
            ErrorKind.DECODE_ERROR,
            f"APNG frame (fcTL {sequence}) of {width}x{height} at {x},{y} lies outside "
            f"the {canvas[0]}x{canvas[1]} image",
        )


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, 1 when absent or unreadable. Called only where reading it
    cannot load pixels (a JPEG's EXIF is in its header; other formats are loaded first),
    so a failure here is bad metadata, never a hidden decode error."""
    try:
        value = int(image.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF: metadata only, the pixels are fine
        return 1
    return value if 1 <= value <= 8 else 1


def _check_memory(image: Image.Image, options: DecodeOptions) -> None:
    """Refuse, before decoding, an image whose decoded pixels alone exceed the budget."""
    need = image.width * image.height * _BYTES_PER_PIXEL.get(image.mode, 4)
    if options.max_memory and need > options.max_memory:
        raise ImageError(
            ErrorKind.TOO_LARGE,
            f"{image.width}x{image.height} {image.mode} needs {need / 2**20:.0f} MiB decoded, over the "
            f"{options.max_memory / 2**20:.0f} MiB max_decode_memory budget",
        )


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        name = _unsupported_format(data)
        if name:
            raise ImageError(
                ErrorKind.UNSUPPORTED, f"{name} files are not supported by the installed Pillow"
            ) from None
        name = _signature(data, _KNOWN_SIGNATURES)
        if name:
            raise _unopened(name, data) from None
        raise ImageError(ErrorKind.NOT_AN_IMAGE, "not a recognised image format") from None


# The bytes a format's header takes: a file shorter than this with the format's signature
# was cut off (a 6-byte "GIF89a" is truncated, not corrupt).
_HEADER_BYTES = {"GIF": 13, "PNG": 33, "BMP": 26, "TIFF": 8, "WebP": 30}


def _unopened(name: str, data: bytes) -> ImageError:
    """Why a file with a known format's signature did not open: cut off within its
    header (truncated), a TIFF whose header parses but whose layout Pillow does not
    read (float samples: unsupported, as the README's kinds say), else corrupt."""
    if len(data) < _HEADER_BYTES.get(name, 0):
        return ImageError(ErrorKind.TRUNCATED, f"{name} file of {len(data)} bytes ends within its header")
    layout = _tiff_layout(data) if name == "TIFF" else None
    if layout:
        return ImageError(
            ErrorKind.UNSUPPORTED, f"TIFF files of {layout} are not supported by the installed Pillow"
        )
    return ImageError(ErrorKind.DECODE_ERROR, f"corrupt {name} file: its header does not parse")


_TIFF_SAMPLE_FORMATS = {1: "unsigned", 2: "signed", 3: "floating-point", 6: "complex floating-point"}


def _tiff_layout(data: bytes) -> str | None:
    """A TIFF's first image described ("floating-point samples (32 bits)") when its
    directory parses; None when it does not (the file is corrupt)."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        (offset,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, offset)
        tags = {}
        for i in range(count):
            tag, _kind, n, value = struct.unpack_from(order + "HHI4s", data, offset + 2 + 12 * i)
            where = struct.unpack(order + "I", value)[0] if n > 2 else None
            tags[tag] = (
                struct.unpack_from(order + "H", data, where)[0]
                if where
                else struct.unpack(order + "H", value[:2])[0]
            )
    except struct.error:
        return None
    if 256 not in tags or 257 not in tags:  # no width or height: not an image directory
        return None
    sample = _TIFF_SAMPLE_FORMATS.get(tags.get(339, 1), f"sample format {tags.get(339)}")
    return f"{sample} samples ({tags.get(258, 1)} bits)"


class Loaded:
    """One file's decodes, shared by the profiles of a multi-model pass: the loaded
    upright image by draft state, and the phash of each image hashed so far.

    meter: () -> (seconds, address-space bytes) now; charge(seconds, bytes): called when
    a profile takes a decode an earlier profile paid for, so the per-image time and memory
    limits (pipeline/image/decode.py) count that load for it too, as its own decode would."""

    def __init__(self, meter: Callable[[], tuple[float, int]] | None = None, charge=None) -> None:
        self.images: dict[tuple, tuple[Image.Image, tuple[int, int]]] = {}
        self.hashes: dict[int, tuple[int, int]] = {}  # id(image) -> (phash, fragile bits)
        self.costs: dict[tuple, tuple[float, int]] = {}  # draft state -> what its load took
        self.meter, self.charge = meter, charge

    def take(self, state: tuple) -> tuple[Image.Image, tuple[int, int]] | None:
        """An earlier profile's decode of this draft state, its cost charged; None: none."""
        if state not in self.images:
            return None
        if self.charge is not None:
            self.charge(*self.costs[state])
        return self.images[state]

    def keep(self, state: tuple, decoded: tuple[Image.Image, tuple[int, int]], before) -> None:
        after = self.meter() if self.meter else (0.0, 0)
        self.costs[state] = (after[0] - before[0], max(0, after[1] - before[1]))
        self.images[state] = decoded

    def phash(self, image: Image.Image) -> tuple[int, int]:
        """phash_with_fragile_bits, once per image this file loaded (pad and fit
        profiles, and every profile in exact mode, hash the image itself)."""
        shared = any(image is loaded for loaded, _ in self.images.values())
        if not shared:
            return phash_with_fragile_bits(image)
        if id(image) not in self.hashes:
            self.hashes[id(image)] = phash_with_fragile_bits(image)
        return self.hashes[id(image)]


def open_image(
    data: bytes, options: DecodeOptions, pre: Preprocess, loaded: Loaded | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Open, check sizes, draft (fast path), load, rotate upright; also the upright
    original size. Every check on sizes runs before any pixel is decoded.

    loaded: the same file's earlier decodes, for several models in one pass. Opening and
    drafting are cheap (a header parse); a profile whose draft comes out the same as an
    earlier one's (same size, mode and DCT scale, as Pillow itself set them) takes that
    decode instead of loading again: the pixels are the ones its own decode would give."""
    if not data:
        raise ImageError(ErrorKind.EMPTY, "zero-byte file")
    image = None
    with pillow_pixel_limit(options.max_pixels):
        try:
            image = _open(data)  # some plugins (ICO) decode here: Pillow's checks stay on
            return _load_upright(image, data, options, pre, Loaded() if loaded is None else loaded)
        except ImageError as exc:
            exc.size = exc.size or _declared_size(image)
            raise
        except BOMB_ERRORS as exc:
            raise ImageError(
                ErrorKind.TOO_LARGE, _bomb_message(exc, options.max_pixels), _declared_size(image)
            ) from None
        except MemoryError:
            raise
        except DECODER_ERRORS as exc:
            if "ghostscript" in str(exc).lower():  # EPS: Pillow renders it through an external program
                raise ImageError(
                    ErrorKind.UNSUPPORTED, "EPS files need Ghostscript, which is not installed"
                ) from None
            message = f"cannot decode: {type(exc).__name__}: {exc}"
            raise ImageError(_error_kind(exc), message, _declared_size(image)) from None


def _declared_size(image: Image.Image | None) -> tuple[int, int] | None:
    """What an opened file says its size is (TIFF already upright), for error rows."""
    if image is None or image.width <= 0 or image.height <= 0:
        return None
    return image.size


def _bomb_message(exc: BaseException, max_pixels: int) -> str:
    """Pillow words its check with its own thresholds (warning at the limit, error at
    twice it); say what was found against the limit the user set."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    what = f"of {int(found.group(1))} pixels " if found else ""
    return f"a frame, tile or sub-image {what}is over the {max_pixels}-pixel limit (max_pixels)"


def _load_upright(
    image: Image.Image, data: bytes, options: DecodeOptions, pre: Preprocess, loaded: Loaded
) -> tuple[Image.Image, tuple[int, int]]:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(ErrorKind.BAD_SIZE, f"declared size {width}x{height}")
    if width * height > options.max_pixels:
        raise ImageError(
            ErrorKind.TOO_LARGE,
            f"declared size {width}x{height} exceeds the {options.max_pixels}-pixel limit",
        )
    if image.format == "PNG":
        check_png_chunks(data)
    if image.format in ("JPEG", "MPO"):
        check_jpeg_length(data, width, height)
    jpeg = image.format == "JPEG"
    orientation = _orientation(image) if jpeg else 1  # a JPEG's EXIF is in its header
    if jpeg and not options.exact:
        upright = (height, width) if orientation in _SWAPS_AXES else (width, height)
        want = draft_request(pre, *upright, options.draft_ratio)
        if orientation in _SWAPS_AXES:
            want = (want[1], want[0])
        image.draft(None, want)
    _check_memory(image, options)
    state = (image.size, image.mode, getattr(image, "decoderconfig", ()))
    shared = loaded.take(state)
    if shared is not None:
        return shared
    before = loaded.meter() if loaded.meter else (0.0, 0)
    drafted = image.size != (width, height)
    image.load()
    if not jpeg:
        # After load: PNG reads EXIF that follows the image data by loading, and TIFF
        # applies (and removes) its own orientation while loading.
        orientation = _orientation(image)
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    # drafted: the loaded image is smaller than the file's: its declared size, upright
    upright = ((height, width) if orientation in _SWAPS_AXES else (width, height)) if drafted else image.size
    loaded.keep(state, (image, upright), before)
    return image, upright


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_SCALE_ROWS_PIXELS = 1 << 22  # rows scaled at a time: float temporaries stay ~16 MB


def to_8bit(image: Image.Image) -> Image.Image:
    """High bit depths to 8-bit L by scaling (Pillow's own convert would clip at 255):
    16-bit by 65535, 32-bit integers by 65535 when any value exceeds 255, floats by 255
    when they lie in 0-1. Premultiplied La, which Pillow converts only to LA, becomes LA.
    Scaled a band of rows at a time, so a large 16-bit image needs about its own size
    again, not the 4-8x of whole-image float arrays."""
    if image.mode == "La":  # premultiplied; Pillow converts it to LA only
        return image.convert("LA")
    if image.mode not in HIGH_DEPTH_MODES:
        return image
    values = np.asarray(image)
    top = float(values.max(initial=0))
    if image.mode == "F":
        factor = 255.0 if top <= 1.0 else 1.0
    else:
        factor = 255.0 / (65535.0 if image.mode.startswith("I;16") or top > 255 else 255.0)
    out = np.empty(values.shape, np.uint8)
    step = max(1, _SCALE_ROWS_PIXELS // max(1, values.shape[1]))
    for start in range(0, values.shape[0], step):
        block = values[start : start + step].astype(np.float32) * np.float32(factor)
        np.clip(np.rint(block, out=block), 0, 255, out=block)
        out[start : start + step] = block
    return Image.fromarray(out, "L")


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


def resample_for_input(
    image: Image.Image,
    pre: Preprocess,
    exact: bool,
    max_pixels: int,
    source_size: tuple[int, int] | None = None,
) -> tuple[Image.Image, Image.Image | None]:
    """The profile's geometry, in the published recipe's order of pad, resize and crop:
    (model input, the whole image as resampled on the way, before any pad or crop).

    image is RGB, or RGBA for profiles that composite after resizing: Pillow resizes
    RGBA premultiplied, and padding is opaque, so compositing the result afterwards
    is what such a recipe computes. The second image (None where the recipe pads
    first) lets the fast path hash a small image instead of the decoded one. Sizes and
    offsets come from pipeline/model/geometry.py, in the arithmetic of the profile's rounding,
    computed from source_size (the upright original's, default the image's): a JPEG
    drafted smaller still gets the sizes and offsets its full-size decode would get.
    """
    resample = pre.interpolation.pil
    target = (pre.width, pre.height)
    if pre.resize_mode is ResizeMode.PAD_SQUARE:
        width, height = image.size
        side = max(width, height)
        if exact and side * side <= min(max_pixels, EXACT_PAD_CANVAS_LIMIT):  # the recipe: pad, then resize
            canvas = Image.new(image.mode, (side, side), _fill(image, pre.pad_color))
            canvas.paste(image, ((side - width) // 2, (side - height) // 2))
            return (canvas.resize(target, resample) if canvas.size != target else canvas), None
        return _fit_and_pad(image, pre, resample, source_size or image.size)  # without the huge canvas
    new = resized_size(pre, source_size or image.size)
    resized = image.resize(new, resample) if new != image.size else image
    if new == target:
        return resized, resized
    if pre.resize_mode is ResizeMode.FIT_PAD:
        return _pad_then_crop(resized, pre), resized
    return resized.crop(
        centre_box(new, target, pre.rounding)
    ), resized  # SQUASH, RESIZE_CROP: cover, then crop


def _pad_then_crop(image: Image.Image, pre: Preprocess) -> Image.Image:
    """timm's CenterCropOrPad: pad a side shorter than the input (floor(d / 2) before),
    then centre crop a side longer than it."""
    target = (pre.width, pre.height)
    grown = (max(image.width, target[0]), max(image.height, target[1]))
    if grown != image.size:
        canvas = Image.new(image.mode, grown, _fill(image, pre.pad_color))
        canvas.paste(image, (pad_offset(grown[0] - image.width), pad_offset(grown[1] - image.height)))
        image = canvas
    return image if image.size == target else image.crop(centre_box(image.size, target, pre.rounding))


def _fit_and_pad(
    image: Image.Image, pre: Preprocess, resample: Image.Resampling, source_size: tuple[int, int]
) -> tuple[Image.Image, Image.Image]:
    """pad_square on images too long for the recipe's canvas (or drafted): fit, then pad."""
    new = fit_size(source_size, (pre.width, pre.height), Rounding.TAGPIPE)
    resized = image.resize(new, resample) if new != image.size else image
    return _pad_then_crop(resized, pre), resized


def _fill(image: Image.Image, color: tuple[int, int, int]) -> tuple[int, ...]:
    return (*color, 255) if image.mode == "RGBA" else color


def decode_image(
    data: bytes, pre: Preprocess, options: DecodeOptions = DecodeOptions(), loaded: Loaded | None = None
) -> DecodedImage:
    """Bytes to model-ready uint8 pixels, original size and phash. Raises ImageError.
    loaded: the file's decodes for other profiles of the same pass (see open_image)."""
    loaded = Loaded() if loaded is None else loaded
    image, (width, height) = open_image(data, options, pre, loaded)
    try:
        image = to_8bit(image)
        alpha = has_alpha(image)
        if pre.alpha_order is AlphaOrder.AFTER_RESIZE and alpha:
            working = image.convert("RGBA")
        elif pre.alpha_order is AlphaOrder.DROP:  # what timm's and HF's convert("RGB") give
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's note on palette transparency: dropped on purpose
                working = image if image.mode == "RGB" else image.convert("RGB")
        else:
            working = to_rgb(image, pre.alpha_background)
        model_input, resampled = resample_for_input(
            working, pre, options.exact, options.max_pixels, (width, height)
        )
        if model_input.mode == "RGBA":
            model_input = composite(model_input, pre.alpha_background)
        value, fragile = loaded.phash(_hash_source(image, resampled, pre, options, alpha))
        pixels = np.asarray(model_input, dtype=np.uint8)
    except (ImageError, MemoryError):
        raise
    except DECODER_ERRORS as exc:
        raise ImageError(ErrorKind.DECODE_ERROR, f"cannot convert: {type(exc).__name__}: {exc}") from None
    return DecodedImage(pixels=pixels, width=width, height=height, phash=value, phash_fragile_bits=fragile)


def _hash_source(
    image: Image.Image, resampled: Image.Image | None, pre: Preprocess, options: DecodeOptions, alpha: bool
) -> Image.Image:
    """What to hash: the decoded image, as imagehash would. One shortcut in fast mode:
    imagehash squashes the image to 32x32, so a squash profile's model input (a squash
    to 384x384) hashes like the image itself (within 2 bits) and saves a resize per image.
    Hashing the fitted image of the pad/fit profiles instead drifted past 2 bits, so those
    hash the image (docs/benchmarks.md, 'Fast vs exact fidelity (issue 3)')."""
    if options.exact or alpha or resampled is None or pre.resize_mode is not ResizeMode.SQUASH:
        return image
    downscaled = resampled.width < image.width and resampled.height < image.height
    return resampled if downscaled else image
