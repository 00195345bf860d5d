"""Every mode Pillow converts to RGB decodes (phash included), and the upright size is
right on every orientation path, checked against Pillow's own exif_transpose."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from pipeline.image.imaging import DecodeOptions, decode_image, to_8bit, to_rgb
from pipeline.image.phash import phash
from pipeline.model.profiles import load_profile
from tests.sample_photos import photo_paths

PRE = load_profile("cl_tagger_v2").preprocess


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    path = next(p for p in photo_paths() if p.stem == "astronaut")
    return Image.open(path).convert("RGB").crop((40, 20, 360, 220))  # 320x200, not square


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def _lab(rgb: Image.Image) -> Image.Image:
    transform = ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    return ImageCms.applyTransform(rgb, transform)


def _modes(rgb: Image.Image) -> dict[str, bytes]:
    grey = np.asarray(rgb.convert("L"), np.float64)
    la = rgb.convert("LA")
    p_trns = rgb.quantize(64)
    return {
        "LAB.tif": _encode(_lab(rgb), "TIFF"),
        "I;16B.tif": _encode(
            Image.frombytes("I;16B", rgb.size, (grey * 257).astype(">u2").tobytes()), "TIFF"
        ),
        "I;16.png": _encode(Image.fromarray((grey * 257).astype(np.uint16)), "PNG"),
        "I.tif": _encode(Image.fromarray((grey * 257).astype(np.int32)), "TIFF"),
        "F.tif": _encode(Image.fromarray((grey / 255).astype(np.float32)), "TIFF"),
        "LA.png": _encode(la, "PNG"),
        "CMYK.jpg": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "CMYK.tif": _encode(rgb.convert("CMYK"), "TIFF"),
        "YCbCr.tif": _encode(rgb.convert("YCbCr"), "TIFF"),
        "1.png": _encode(rgb.convert("1"), "PNG"),
        "1.tif": _encode(rgb.convert("1"), "TIFF", compression="group4"),
        "P.gif": _encode(p_trns, "GIF", transparency=0),
        "P.png": _encode(p_trns, "PNG", transparency=0),
        "RGBA.webp": _encode(rgb.convert("RGBA"), "WEBP", lossless=True),
    }


def test_every_mode_decodes_with_its_phash(photo):
    """The file's own Pillow reading, made RGB the way Pillow does, is what tagpipe sees."""
    problems = []
    for name, data in _modes(photo).items():
        if data is None:
            continue
        reference = Image.open(io.BytesIO(data))
        reference.load()
        try:
            decoded = decode_image(data, PRE, DecodeOptions(exact=True))
        except Exception as exc:  # noqa: BLE001 - the test reports every mode at once
            problems.append(f"{name} ({reference.mode}): {type(exc).__name__}: {exc}")
            continue
        if (decoded.width, decoded.height) != reference.size:
            problems.append(f"{name}: size {decoded.width}x{decoded.height}, file is {reference.size}")
        # a dithered 1-bit image is compared with Pillow's own reading of it, the rest with the photo
        source = reference.convert("RGB") if name.startswith("1.") else photo
        expected = np.asarray(source.resize((PRE.width, PRE.height), Image.Resampling.BICUBIC), np.float32)
        if name.split(".")[0] in ("I;16B", "I;16", "I", "F", "LA"):
            expected = np.asarray(
                photo.convert("L").resize((PRE.width, PRE.height), Image.Resampling.BICUBIC), np.float32
            )[..., None]
        diff = float(np.abs(decoded.pixels.astype(np.float32) - expected).mean())
        if diff > 12:
            problems.append(f"{name} ({reference.mode}): mean difference {diff:.1f} from the photo")
        if decoded.phash in (0, 1 << 63):
            problems.append(f"{name}: blank phash")
    assert not problems, "\n".join(problems)


def test_lab_hashes_through_rgb(photo):
    lab = _lab(photo)
    assert phash(lab) == phash(lab.convert("RGB"))


@pytest.mark.parametrize("mode", ["PA", "La", "RGBa", "HSV", "RGBX", "I;16L", "I;16N"])
def test_modes_no_file_format_writes_convert_and_hash(photo, mode):
    """Modes Pillow's writers refuse, but its readers (or plugins) can produce."""
    if mode in ("PA",):
        image = photo.quantize(64).convert("PA")
    elif mode.startswith("I;16"):
        grey = (np.asarray(photo.convert("L"), np.uint16) * 257).astype("<u2" if mode == "I;16L" else "=u2")
        image = Image.frombytes(mode, photo.size, grey.tobytes())
    elif mode == "La":
        image = photo.convert("LA").convert("La")
    else:
        image = photo.convert(mode)
    rgb = to_rgb(image, (255, 255, 255))
    assert rgb.mode == "RGB" and rgb.size == photo.size
    reference = photo.convert("L") if mode in ("La", "I;16L", "I;16N") else photo
    diff = np.abs(
        np.asarray(rgb.convert("L"), np.float32) - np.asarray(reference.convert("L"), np.float32)
    ).mean()
    assert diff < 6, f"{mode}: {diff:.1f}"
    assert phash(to_8bit(image)) not in (0, 1 << 63)


def _with_orientation(image: Image.Image, fmt: str, orientation: int, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    if fmt == "TIFF":  # TIFF keeps orientation as its own tag, read by libtiff or Pillow
        return _encode(image, fmt, tiffinfo={0x0112: orientation}, **kw)
    return _encode(image, fmt, exif=exif.tobytes(), **kw)


ORIENTATION_PATHS = [
    ("JPEG", {"quality": 95}),
    ("PNG", {}),
    ("WEBP", {"lossless": True}),
    ("TIFF", {}),  # raw strips: Pillow's own decoder
    ("TIFF", {"compression": "tiff_lzw"}),  # libtiff
    ("TIFF", {"compression": "tiff_adobe_deflate"}),  # libtiff
]


@pytest.mark.parametrize(
    "fmt,kw", ORIENTATION_PATHS, ids=[f"{f}-{k.get('compression', 'plain')}" for f, k in ORIENTATION_PATHS]
)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_upright_size_and_pixels_match_pillows_exif_transpose(photo, fmt, kw, exact):
    problems = []
    for orientation in range(1, 9):
        data = _with_orientation(photo, fmt, orientation, **kw)
        reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        decoded = decode_image(data, PRE, DecodeOptions(exact=exact, draft_ratio=1.0))
        if (decoded.width, decoded.height) != reference.size:
            problems.append(
                f"orientation {orientation}: {decoded.width}x{decoded.height}, Pillow says {reference.size}"
            )
        expected = np.asarray(reference.resize((PRE.width, PRE.height), Image.Resampling.BICUBIC), np.float32)
        diff = float(np.abs(decoded.pixels.astype(np.float32) - expected).mean())
        if diff > 4:
            problems.append(
                f"orientation {orientation}: pixels differ by {diff:.1f} from Pillow's upright image"
            )
    assert not problems, f"{fmt} {kw}:\n" + "\n".join(problems)
