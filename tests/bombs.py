"""Decompression bombs, one per container format: small files that declare (somewhere
inside) far more pixels or memory than they hold. Written by hand, byte by byte where
Pillow will not write a lie. Each is a few KiB to a few hundred KiB.

BOMBS maps a file name to its bytes. Each builder documents where the lie sits, since
that is what a check has to see before pixels are decoded.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_of_zeros(width: int, height: int, color_type: int = 2, bit_depth: int = 8) -> bytes:
    """A valid PNG whose every row is zeros: the zlib stream is ~1/1000 of the pixels."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\x00" * (1 + width * channels * bit_depth // 8)
    compressor = zlib.compressobj(9)
    chunks = [compressor.compress(row) for _ in range(height)]
    idat = b"".join(chunks) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int, color_type: int = 6) -> bytes:
    """A PNG that declares width x height and holds one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def icns_with_png(width: int, height: int) -> bytes:
    """An ICNS whose 1024x1024 slot (ic10) holds a PNG declaring width x height. The
    container says 1024x1024; only the embedded PNG's header tells the truth."""
    inner = (
        png_of_zeros(width, height, color_type=6)
        if width * height <= 50_000_000
        else png_header_only(width, height)
    )
    entry = b"ic10" + struct.pack(">I", 8 + len(inner)) + inner
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def ico_with_png(width: int, height: int) -> bytes:
    """An ICO whose directory says 256x256 (0, 0) while the embedded PNG declares more."""
    inner = (
        png_of_zeros(width, height, color_type=6)
        if width * height <= 50_000_000
        else png_header_only(width, height)
    )
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(inner), 6 + 16)
    return header + entry + inner


def icns_with_jpeg2000(width: int, height: int) -> bytes:
    """An ICNS whose 1024x1024 slot holds a JPEG 2000 image of width x height: Pillow
    decodes it whole (OpenJPEG keeps 4 bytes a sample) before it checks the size."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, "JPEG2000")
    inner = out.getvalue()
    entry = b"ic10" + struct.pack(">I", 8 + len(inner)) + inner
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def _tiff(entries: list[tuple[int, int, int, int]], data: bytes) -> bytes:
    """A little-endian TIFF: one IFD of (tag, type, count, value) entries after `data`."""
    ifd_offset = 8 + len(data)
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in sorted(entries):
        ifd += struct.pack("<HHII", tag, kind, count, value)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + data + ifd + b"\x00\x00\x00\x00"


def tiff_strips(width: int, height: int) -> bytes:
    """An uncompressed 8-bit grey TIFF declaring width x height in one strip of 64 bytes."""
    data = b"\x00" * 64
    return _tiff(
        [
            (256, 4, 1, width),
            (257, 4, 1, height),
            (258, 3, 1, 8),
            (259, 3, 1, 1),
            (262, 3, 1, 1),
            (273, 4, 1, 8),
            (277, 3, 1, 1),
            (278, 4, 1, height),
            (279, 4, 1, len(data)),
        ],
        data,
    )


def tiff_tiles(width: int, height: int, tile: int) -> bytes:
    """A deflate-compressed RGB TIFF of width x height in one tile of tile x tile pixels:
    the image is small, the tile libtiff must allocate is not."""
    data = zlib.compress(b"\x00" * 1024)
    return _tiff(
        [
            (256, 4, 1, width),
            (257, 4, 1, height),
            (258, 3, 1, 8),
            (259, 3, 1, 8),
            (262, 3, 1, 1),
            (277, 3, 1, 1),
            (322, 4, 1, tile),
            (323, 4, 1, tile),
            (324, 4, 1, 8),
            (325, 4, 1, len(data)),
        ],
        data,
    )


def tiff_16bit(width: int, height: int) -> bytes:
    """A 16-bit grey TIFF of zeros (deflate): small on disk, and its conversion to 8 bits
    takes several times the decoded size."""
    image = Image.new("I;16", (width, height))
    out = io.BytesIO()
    image.save(out, "TIFF", compression="tiff_adobe_deflate")
    return out.getvalue()


def psd_rle(width: int, height: int) -> bytes:
    """A 3-channel PSD whose composite is RLE-compressed zeros: 2 bytes a 128-pixel run."""
    runs_per_row = -(-width // 128)
    row = b"".join(bytes([0x81, 0]) for _ in range(runs_per_row))  # -127: repeat 128 times
    counts = struct.pack(">H", len(row)) * (height * 3)
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">I", 0) * 3  # colour mode data, image resources, layers
    return header + sections + struct.pack(">H", 1) + counts + row * (height * 3)


def gif_big_frame(width: int, height: int) -> bytes:
    """A 16x16 GIF screen whose one frame declares width x height (Pillow grows the image
    to hold the frame)."""
    lzw = bytes([2, 2, 0x4C, 0x01, 0])  # minimal LZW data (clear, one pixel, end)
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", 16, 16, 0x80, 0, 0)
        + b"\x00\x00\x00\xff\xff\xff"
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, width, height, 0)
        + lzw
        + b"\x3b"
    )


def apng_big_frame(width: int, height: int) -> bytes:
    """A 16x16 APNG whose second frame's fcTL declares width x height."""
    base = png_of_zeros(16, 16, color_type=6)
    ihdr_end = 8 + 25
    actl = png_chunk(b"acTL", struct.pack(">II", 2, 0))
    fctl0 = png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 16, 16, 0, 0, 1, 10, 0, 0))
    idat_start = base.index(b"IDAT") - 4
    idat = base[idat_start:-12]
    fctl1 = png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", 1, width, height, 0, 0, 1, 10, 0, 0))
    fdat = png_chunk(b"fdAT", struct.pack(">I", 2) + zlib.compress(b"\x00" * 64))
    return base[:ihdr_end] + actl + fctl0 + idat + fctl1 + fdat + png_chunk(b"IEND", b"")


def webp_lossless_header(width: int, height: int) -> bytes:
    """A VP8L WebP declaring width x height (14 bits each, up to 16384) over a few bytes."""
    bits = (width - 1) | ((height - 1) << 14)
    payload = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 32
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def jpeg_absurd_height(width: int = 64, height: int = 65500) -> bytes:
    """A real 64x64 JPEG whose SOF0 header is patched to say width x height."""
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 200)).save(out, "JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def build_bombs() -> dict[str, bytes]:
    return {
        "icns_png_20000.icns": icns_with_png(20000, 20000),
        "icns_png_6000.icns": icns_with_png(6000, 6000),
        "ico_png_20000.ico": ico_with_png(20000, 20000),
        "ico_png_6000.ico": ico_with_png(6000, 6000),
        "tiff_strips_60000.tif": tiff_strips(60000, 60000),
        "icns_jpeg2000_4000.icns": icns_with_jpeg2000(4000, 4000),
        "tiff_tile_20000.tif": tiff_tiles(256, 256, 20000),
        "tiff_16bit_9000.tif": tiff_16bit(9000, 9000),
        "psd_rle_12000.psd": psd_rle(12000, 10000),
        "gif_frame_60000.gif": gif_big_frame(60000, 60000),
        "apng_frame_60000.png": apng_big_frame(60000, 60000),
        "png_zeros_10000.png": png_of_zeros(10000, 10000),
        "png_grey_11000.png": png_of_zeros(11000, 10000, color_type=0),
        "webp_16383.webp": webp_lossless_header(16383, 16383),
        "jpeg_height_65500.jpg": jpeg_absurd_height(),
        "jpeg_65500_square.jpg": jpeg_absurd_height(65500, 65500),
    }
