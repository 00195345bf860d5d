"""The odd-file corpus: every shape of file real image corpora hold, one row each.

Each case is written here with Pillow (or by hand where Pillow cannot write it) from a
real photo, together with what it must decode to: the upright RGB image a viewer would
show, or the error kind. The kinds (33 files, 28 kinds):

  JPEG: baseline, progressive, greyscale, CMYK (Adobe, inverted), YCCK (Adobe
  transform 2), EXIF orientations 2/3/5/6/8, a large EXIF-rotated JPEG (fast path
  drafts it), truncated, garbage after SOI.
  PNG: RGBA, LA, palette + tRNS, 16-bit grey, 16-bit RGB (hand-written), 1-bit,
  1x1, 1x10000, 10000x1, animated (APNG), truncated, bad CRC, declared 30000x30000
  (decompression bomb).
  GIF: animated with transparency. WebP: lossy, animated. BMP. TIFF (LZW).
  AVIF when the installed Pillow reads it.
  Not images: zero bytes, text, HEIC and SVG (named as unsupported).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from pipeline.image.decode import DecodeStage
from pipeline.image.imaging import DecodeOptions
from pipeline.model.profiles import load_profile
from tests.sample_photos import photo_paths

PRE = load_profile("cl_tagger_v2").preprocess  # squash 384 BICUBIC, alpha over white
WHITE = (255, 255, 255)


@dataclass
class Case:
    data: bytes
    upright: Image.Image | None = None  # what it must look like (RGB, original size)
    error_kind: str | tuple[str, ...] | None = None
    tolerance: float = 2.0  # mean abs difference, 0-255, at the model's input size
    not_like: Image.Image | None = None  # a wrong reading that must be clearly different


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_raw(width: int, height: int, depth: int, color: int, rows: bytes | None) -> bytes:
    """A PNG written by hand (Pillow cannot write 48-bit RGB, nor lie about its size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    idat = zlib.compress(rows or b"")
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _ycck_jpeg(rgb: Image.Image) -> bytes:
    """An Adobe YCCK JPEG showing rgb. Pillow writes only CMYK, so we hand it the YCCK
    component values (inverted, as Pillow inverts Adobe CMYK on write) and flip the
    Adobe marker's transform byte from 0 (CMYK) to 2 (YCCK)."""
    x = 255.0 - np.asarray(rgb, np.float64)  # CMYK ink of Pillow's RGB->CMYK: C=255-R, K=0
    r, g, b = (
        x[..., 0],
        x[..., 1],
        x[..., 2],
    )  # libjpeg's YCCK is YCbCr of (255-C, 255-M, 255-Y)... of the inverted samples
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    k = np.full_like(y, 255.0)  # stored K = 255 - ink K (0)
    stored = np.clip(np.rint(np.stack([y, cb, cr, k], -1)), 0, 255).astype(np.uint8)
    data = bytearray(_save(Image.frombytes("CMYK", rgb.size, (255 - stored).tobytes()), "JPEG", quality=98))
    at = data.index(b"\xff\xee\x00\x0eAdobe") + 15  # marker, length, "Adobe", version, flags0, flags1
    assert data[at] == 0
    data[at] = 2
    return bytes(data)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# How each EXIF orientation is stored, given the upright image (the inverse of display).
STORED_FOR_ORIENTATION = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],
    8: [Image.Transpose.ROTATE_270],
}


def _stored(upright: Image.Image, orientation: int) -> Image.Image:
    image = upright
    for op in STORED_FOR_ORIENTATION[orientation]:
        image = image.transpose(op)
    return image


def build_cases() -> dict[str, Case]:
    photos = {p.stem: p for p in photo_paths()}
    base = Image.open(photos["astronaut"]).convert("RGB").crop((40, 20, 360, 220))  # 320x200, asymmetric
    cat = Image.open(photos["chelsea"]).convert("RGB")
    cases: dict[str, Case] = {}

    cases["jpeg_baseline.jpg"] = Case(_save(base, "JPEG", quality=95), base)
    cases["jpeg_progressive.jpg"] = Case(_save(base, "JPEG", quality=95, progressive=True), base)
    grey = base.convert("L")
    cases["jpeg_grey.jpg"] = Case(_save(grey, "JPEG", quality=95), grey.convert("RGB"))
    cases["jpeg_cmyk.jpg"] = Case(
        _save(base.convert("CMYK"), "JPEG", quality=95),
        base,
        tolerance=3.0,
        not_like=Image.eval(base, lambda v: 255 - v),
    )
    cases["jpeg_ycck.jpg"] = Case(
        _ycck_jpeg(base), base, tolerance=3.0, not_like=Image.eval(base, lambda v: 255 - v)
    )
    for orientation in STORED_FOR_ORIENTATION:
        stored = _stored(base, orientation)
        cases[f"jpeg_exif_orientation_{orientation}.jpg"] = Case(
            _save(stored, "JPEG", quality=95, exif=_exif(orientation)),
            base,
            not_like=stored.resize(base.size),
        )
    big = Image.open(photos["rocket"]).convert("RGB").resize((2560, 1708), Image.Resampling.LANCZOS)
    cases["jpeg_large_exif_6.jpg"] = Case(
        _save(big.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=_exif(6)),
        big,
        not_like=big.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    )
    whole = _save(base, "JPEG", quality=95)
    cases["jpeg_truncated.jpg"] = Case(whole[: len(whole) // 2], error_kind="truncated")
    cases["jpeg_garbage.jpg"] = Case(
        b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(3).integers(0, 256, 3000, dtype=np.uint8)),
        error_kind="truncated",
    )  # Pillow reads to the end looking for a frame

    # transparency: the cat cut out with soft and hard edges
    yy, xx = np.mgrid[0 : cat.height, 0 : cat.width]
    alpha = np.clip((1.2 - np.hypot((xx - 225) / 200, (yy - 150) / 130)) * 400, 0, 255).astype(np.uint8)
    alpha[:, :60] = 0
    rgba = cat.copy()
    rgba.putalpha(Image.fromarray(alpha))
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    cases["png_rgba.png"] = Case(_save(rgba, "PNG"), on_white, not_like=cat)
    la = rgba.convert("LA")
    cases["png_la.png"] = Case(
        _save(la, "PNG"),
        Image.alpha_composite(Image.new("RGBA", la.size, WHITE + (255,)), la.convert("RGBA")).convert("RGB"),
        not_like=cat.convert("L").convert("RGB"),
    )
    palette = cat.quantize(31)  # indices 0-30; 31 is free for transparency
    palette_alpha = np.where(alpha > 127, 255, 0).astype(np.uint8)
    indices = np.asarray(palette).copy()
    indices[palette_alpha == 0] = 31  # index 31 marks the transparent pixels
    keyed = Image.frombytes("P", palette.size, indices.tobytes())
    keyed.putpalette(palette.getpalette() + [0, 0, 0])
    keyed_rgb = np.asarray(keyed.convert("RGB")).copy()
    keyed_rgb[palette_alpha == 0] = WHITE
    cases["png_palette_trns.png"] = Case(
        _save(keyed, "PNG", transparency=31), Image.fromarray(keyed_rgb), not_like=keyed.convert("RGB")
    )

    # high and low bit depths
    ramp = (np.linspace(0, 65535, 256)[None, :] * np.linspace(0.2, 1.0, 128)[:, None]).astype(np.uint16)
    grey16 = Image.fromarray(ramp)
    assert grey16.mode == "I;16"
    grey8 = Image.fromarray(np.rint(ramp / 257.0).astype(np.uint8)).convert("RGB")
    cases["png_16bit_grey.png"] = Case(
        _save(grey16, "PNG"),
        grey8,
        tolerance=1.0,
        not_like=Image.fromarray(np.minimum(ramp, 255).astype(np.uint8)).convert("RGB"),
    )
    rgb16 = np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 40000)], -1)
    rows = b"".join(b"\x00" + rgb16[i].astype(">u2").tobytes() for i in range(rgb16.shape[0]))
    rgb8 = Image.fromarray(np.rint(rgb16 / 257.0).astype(np.uint8))
    cases["png_16bit_rgb.png"] = Case(
        _png_raw(256, 128, 16, 2, rows),
        rgb8,
        tolerance=1.0,
        not_like=Image.fromarray(np.minimum(rgb16, 255).astype(np.uint8)),
    )
    bilevel = base.convert("1")
    cases["png_1bit.png"] = Case(_save(bilevel, "PNG"), bilevel.convert("RGB"), tolerance=0.5)

    # sizes
    one = Image.new("RGB", (1, 1), (10, 200, 30))
    cases["png_1x1.png"] = Case(_save(one, "PNG"), one, tolerance=0.5)
    strip = Image.fromarray(np.random.default_rng(1).integers(0, 256, (10000, 1, 3), dtype=np.uint8))
    cases["png_1x10000.png"] = Case(_save(strip, "PNG"), strip, tolerance=0.5)
    band = strip.transpose(Image.Transpose.TRANSPOSE)
    cases["png_10000x1.png"] = Case(_save(band, "PNG"), band, tolerance=0.5)
    cases["png_bomb_30000x30000.png"] = Case(_png_raw(30000, 30000, 8, 2, None), error_kind="too_large")

    # animation: the first frame counts
    frames = [base, base.transpose(Image.Transpose.FLIP_TOP_BOTTOM), Image.new("RGB", base.size, (0, 0, 255))]
    cases["png_animated.png"] = Case(
        _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100),
        base,
        tolerance=0.5,
        not_like=frames[1],
    )
    gif_frames = [f.quantize(64) for f in frames]
    gif_first = np.asarray(gif_frames[0].convert("RGB")).copy()
    transparent_index = int(np.asarray(gif_frames[0])[0, 0])
    gif_first[np.asarray(gif_frames[0]) == transparent_index] = WHITE
    cases["gif_animated_transparent.gif"] = Case(
        _save(
            gif_frames[0],
            "GIF",
            save_all=True,
            append_images=gif_frames[1:],
            duration=100,
            transparency=transparent_index,
            disposal=2,
        ),
        Image.fromarray(gif_first),
        tolerance=1.0,
        not_like=frames[1],
    )
    cases["webp_lossy.webp"] = Case(_save(base, "WEBP", quality=95), base, tolerance=3.0)
    cases["webp_animated.webp"] = Case(
        _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
        base,
        tolerance=0.5,
        not_like=frames[1],
    )
    cases["bmp.bmp"] = Case(_save(base, "BMP"), base, tolerance=0.5)
    cases["tiff_lzw.tif"] = Case(_save(base, "TIFF", compression="tiff_lzw"), base, tolerance=0.5)
    if features.check("avif"):
        cases["avif.avif"] = Case(_save(base, "AVIF", quality=90), base, tolerance=4.0)

    # broken PNGs and things that are not images
    png = _save(base, "PNG")
    cases["png_truncated.png"] = Case(png[: len(png) // 2], error_kind="truncated")
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # inside IHDR's CRC
    cases["png_bad_crc.png"] = Case(bytes(bad_crc), error_kind="decode_error")
    cases["empty.jpg"] = Case(b"", error_kind="empty")
    cases["notes.txt.jpg"] = Case(b"this is not an image\n" * 20, error_kind="not_an_image")
    cases["photo.heic"] = Case(
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200, error_kind="unsupported"
    )
    cases["drawing.svg"] = Case(
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        error_kind="unsupported",
    )
    return cases


CASES = build_cases()


def _at_input_size(image: Image.Image) -> np.ndarray:
    return np.asarray(
        image.convert("RGB").resize((PRE.width, PRE.height), Image.Resampling.BICUBIC), np.float32
    )


def test_corpus_has_at_least_20_kinds():
    kinds = {name.split(".")[0].rsplit("_", 1)[0] if "orientation" in name else name for name in CASES}
    assert len(CASES) >= 30 and len(kinds) >= 20


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odd")
    for name, case in CASES.items():
        (root / name).write_bytes(case.data)
    return root


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_every_odd_file_gives_one_correct_row(corpus_dir, exact):
    names = list(CASES)
    out = DecodeStage(PRE, DecodeOptions(exact=exact, max_pixels=200_000_000))(
        {"uri": np.array([str(corpus_dir / n) for n in names], object)}
    )
    assert len(out["uri"]) == len(names) and list(out["uri"]) == [str(corpus_dir / n) for n in names]
    problems = []
    for i, name in enumerate(names):
        case = CASES[name]
        if case.error_kind:
            allowed = case.error_kind if isinstance(case.error_kind, tuple) else (case.error_kind,)
            if out["error_kind"][i] not in allowed or not out["error"][i]:
                problems.append(
                    f"{name}: expected {case.error_kind}, got {out['error_kind'][i]} ({out['error'][i]})"
                )
            continue
        if out["error"][i] is not None:
            problems.append(f"{name}: unexpected error {out['error_kind'][i]}: {out['error'][i]}")
            continue
        if (out["width"][i], out["height"][i]) != case.upright.size:
            problems.append(
                f"{name}: size {out['width'][i]}x{out['height'][i]}, expected {case.upright.size}"
            )
        got = out["pixels"][i].astype(np.float32)
        diff = float(np.abs(got - _at_input_size(case.upright)).mean())
        if diff > case.tolerance:
            problems.append(f"{name}: mean difference {diff:.2f} > {case.tolerance}")
        if case.not_like is not None:
            wrong = float(np.abs(got - _at_input_size(case.not_like)).mean())
            if wrong < 5 * max(diff, 1.0):
                problems.append(
                    f"{name}: the wrong reading is as close ({wrong:.2f}) as the right one ({diff:.2f})"
                )
        assert out["sha256"][i] and out["size"][i] == len(case.data)
    assert not problems, "\n".join(problems)


def test_bomb_limit_is_configurable(corpus_dir):
    uri = np.array([str(corpus_dir / "png_1x10000.png")], object)
    assert DecodeStage(PRE, DecodeOptions(max_pixels=9_999))({"uri": uri})["error_kind"][0] == "too_large"
    assert DecodeStage(PRE, DecodeOptions(max_pixels=10_000))({"uri": uri})["error_kind"][0] is None


def test_decode_stage_runs_as_a_ray_data_stage(ray_session, corpus_dir):
    import ray.data

    names = sorted(CASES)
    ds = ray.data.from_items([{"uri": str(corpus_dir / n)} for n in names]).map_batches(
        DecodeStage, fn_constructor_args=(PRE,), batch_size=8, concurrency=1
    )
    rows = {r["uri"]: r for r in ds.take_all()}
    assert len(rows) == len(names)
    assert rows[str(corpus_dir / "empty.jpg")]["error_kind"] == "empty"
    assert rows[str(corpus_dir / "jpeg_exif_orientation_6.jpg")]["width"] == 320
    assert rows[str(corpus_dir / "png_rgba.png")]["pixels"].shape == (384, 384, 3)
