"""Perceptual hash, bit for bit the one imagehash.phash computes.

greyscale -> 32x32 LANCZOS -> 2-D DCT-II (unnormalised, as scipy.fftpack.dct) ->
top-left 8x8 including DC -> bit = value > median, row-major, MSB first.
The DCT is a matrix product here, so scipy is not needed at run time.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIZE = 8
HIGHFREQ_FACTOR = 4
_N = HASH_SIZE * HIGHFREQ_FACTOR
_k = np.arange(_N)[:, None]
_n = np.arange(_N)[None, :]
DCT_MATRIX = 2.0 * np.cos(np.pi * _k * (2 * _n + 1) / (2 * _N))  # scipy dct type II, norm=None
SOLID_HASH = 1 << 63  # every solid-colour image
BLACK_HASH = 0


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash of an image (any mode Pillow converts to L or RGB)."""
    small = to_grey(image).resize((_N, _N), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float64)
    dct = DCT_MATRIX @ pixels @ DCT_MATRIX.T  # along axis 0, then axis 1
    # Coefficients that are zero in exact arithmetic (every one but DC for a blank
    # image) come out as +-1e-12 noise; rounded to 0, as scipy's FFT gives them, so
    # blank images hash to 8000000000000000 / 0 like imagehash and are flagged.
    low = np.round(dct[:HASH_SIZE, :HASH_SIZE], 6)
    bits = (low > np.median(low)).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def to_grey(image: Image.Image) -> Image.Image:
    """Greyscale as imagehash takes it (convert("L")); modes Pillow has no direct
    conversion to L for (LAB, HSV) go through RGB."""
    try:
        return image.convert("L")
    except ValueError:
        return image.convert("RGB").convert("L")


def to_hex(value: int) -> str:
    """imagehash's string form: 16 hex digits."""
    return f"{value:016x}"


def is_degenerate(value: int) -> bool:
    """Blank images (solid colour, all black) hash to these; they match nothing by hash."""
    return value in (SOLID_HASH, BLACK_HASH)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
