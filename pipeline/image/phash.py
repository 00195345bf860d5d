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


_blas_warm = False


def warm_up_blas() -> None:
    """One matrix product like the hash's, once per process. OpenBLAS allocates its work
    buffers on a process's first product and, when that allocation fails, aborts the
    whole process (no MemoryError). Under a decode's memory limit that killed the worker:
    the decode stage calls this before any image's limit, so the buffers exist outside it."""
    global _blas_warm
    if not _blas_warm:
        DCT_MATRIX @ np.ones((_N, _N)) @ DCT_MATRIX.T
        _blas_warm = True


SOLID_HASH = 1 << 63  # every solid-colour image
BLACK_HASH = 0
# A bit is fragile when its DCT coefficient lies within FRAGILE_MARGIN of the median it
# is compared with: one grey level of noise on the 32x32 image moves a coefficient by
# about 64 (2 x 2 x 16 x 1), so re-encoding or resizing can flip such a bit. Real photos
# have 0-20 fragile bits of 64; stripes, gradients and solid colours 56-64 (their AC
# coefficients are all ~0, so the bits are noise); benchmarks/phash_reliability.py.
FRAGILE_MARGIN = 128.0
LOW_DETAIL_BITS = 24  # more fragile bits than this: the hash is unreliable and matches nothing
NEAR_BLANK_BITS = 4  # hashes this close to a blank image's, in rows hashed before the margin was kept


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash of an image (any mode Pillow converts to L or RGB)."""
    return phash_with_fragile_bits(image)[0]


def phash_with_fragile_bits(image: Image.Image) -> tuple[int, int]:
    """(imagehash's phash, how many of its bits are fragile: see FRAGILE_MARGIN)."""
    small = to_grey(image).resize((_N, _N), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float64)
    dct = DCT_MATRIX @ pixels @ DCT_MATRIX.T  # along axis 0, then axis 1
    # Coefficients that are zero in exact arithmetic (every one but DC for a blank
    # image) come out as +-1e-12 noise; rounded to 0, as scipy's FFT gives them, so
    # blank images hash to 8000000000000000 / 0 like imagehash.
    low = np.round(dct[:HASH_SIZE, :HASH_SIZE], 6)
    median = np.median(low)
    bits = (low > median).ravel()
    fragile = int(np.count_nonzero(np.abs(low - median) < FRAGILE_MARGIN))
    return int(np.packbits(bits).view(">u8")[0]), fragile


def low_detail(fragile_bits: int) -> bool:
    """A hash whose bits are mostly noise: it must not match anything."""
    return fragile_bits > LOW_DETAIL_BITS


def near_blank(hashes: np.ndarray) -> np.ndarray:
    """Hashes within NEAR_BLANK_BITS of a blank image's (8000000000000000 or 0): how
    rows written before the fragile-bit count are judged (their flag knew only the two
    exact values; stripes and gradients hash a few bits from them)."""
    hashes = np.asarray(hashes, np.uint64)
    solid = np.bitwise_count(hashes ^ np.uint64(SOLID_HASH))
    black = np.bitwise_count(hashes)
    return (solid <= NEAR_BLANK_BITS) | (black <= NEAR_BLANK_BITS)


def to_grey(image: Image.Image) -> Image.Image:
    """Greyscale as imagehash takes it (convert("L")); modes Pillow has no direct
    conversion to L for (LAB, HSV) go through RGB."""
    try:
        return image.convert("L")
    except ValueError:
        return image.convert("RGB").convert("L")


def is_degenerate(value: int) -> bool:
    """Blank images (solid colour, all black) hash to these; they match nothing by hash."""
    return value in (SOLID_HASH, BLACK_HASH)


def unreliable(value: int, fragile_bits: int) -> bool:
    """What a row's phash_degenerate says: blank, or too little detail to match on."""
    return is_degenerate(value) or low_detail(fragile_bits)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
