"""Basic decode-stage behaviour (issue 3 widens the odd-file corpus)."""

import io

import imagehash
import numpy as np
import pytest
from PIL import Image

from pipeline.demo.synthetic import KINDS, encode, render
from pipeline.image.decode import DecodeStage
from pipeline.image.imaging import DecodeOptions, decode_image
from pipeline.image.phash import phash
from pipeline.model.profiles import load_profile
from pipeline.model.session_runner import Normaliser

CL = load_profile("cl_tagger_v2").preprocess


def _photo_like(seed: int, size=(640, 480)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([np.sin(x / (20 + 10 * c) + seed) * np.cos(y / (15 + 7 * c)) for c in range(3)], -1)
    noise = rng.normal(0, 0.15, base.shape)
    return Image.fromarray(np.clip((base + noise + 1) * 127, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("seed", range(4))
def test_exact_phash_matches_imagehash(seed):
    image = _photo_like(seed)
    data = encode(image, "PNG")
    decoded = decode_image(data, CL, DecodeOptions(exact=True))
    assert f"{decoded.phash:016x}" == str(imagehash.phash(Image.open(io.BytesIO(data))))


def test_broken_files_become_error_rows(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(encode(render(KINDS["red"], 500, 300), "JPEG"))
    cases = {"empty.jpg": b"", "text.png": b"hello", "truncated.jpg": good.read_bytes()[:600]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    uris = [str(good)] + [str(tmp_path / n) for n in cases] + [str(tmp_path / "missing.jpg")]
    out = DecodeStage(CL)({"uri": np.array(uris, object)})
    assert list(out["error_kind"]) == [None, "empty", "not_an_image", "truncated", "not_found"]
    assert out["pixels"].shape == (5, 384, 384, 3) and out["pixels"].dtype == np.uint8
    assert (out["width"][0], out["height"][0]) == (500, 300)
    assert [int(v) for v in out["pixels"][0, 100, 100]] == pytest.approx([220, 40, 40], abs=4)
    assert out["sha256"][3] is not None and out["sha256"][4] is None


def test_decompression_bomb_refused_before_decoding():
    big = io.BytesIO()
    Image.new("L", (12000, 12000)).save(big, "PNG")  # small file, 144 Mpx declared
    from pipeline.image.imaging import ImageError

    with pytest.raises(ImageError) as info:
        decode_image(big.getvalue(), CL, DecodeOptions(max_pixels=50_000_000))
    assert info.value.kind == "too_large"


def test_normaliser_follows_each_profile():
    pixels = np.zeros((1, 2, 2, 3), np.uint8)
    pixels[..., 0], pixels[..., 2] = 255, 51  # R=255, B=51
    wd = Normaliser(load_profile("wd_v3").preprocess)(pixels)
    assert wd.shape == (1, 2, 2, 3) and wd[0, 0, 0].tolist() == [51.0, 0.0, 255.0]  # BGR, 0-255, NHWC
    cl = Normaliser(CL)(pixels)
    assert cl.shape == (1, 3, 2, 2) and cl[0, :, 0, 0].tolist() == pytest.approx(
        [1.0, -1.0, 51 / 255 * 2 - 1]
    )


@pytest.mark.parametrize("exact", [True, False])
def test_blank_images_are_flagged_degenerate(tmp_path, exact):
    files = {
        "white.png": encode(Image.new("RGB", (300, 200), (255, 255, 255)), "PNG"),
        "black.jpg": encode(Image.new("RGB", (1600, 1200), (0, 0, 0)), "JPEG"),
        "teal.jpg": encode(Image.new("RGB", (2000, 1000), (0, 128, 128)), "JPEG"),
        "photo.png": encode(_photo_like(1), "PNG"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = DecodeStage(CL, DecodeOptions(exact=exact))(
        {"uri": np.array([str(tmp_path / n) for n in files], object)}
    )
    assert list(out["phash_degenerate"]) == [True, True, True, False]
    assert {int(h) for h in out["phash"][:3]} <= {0, 1 << 63}


_Y, _X = np.mgrid[0:200, 0:300]
SYMMETRIC = {
    "white": np.full((200, 300), 255),
    "black": np.zeros((200, 300)),
    "hgrad": _X * 255 / 299,
    "checker": ((_X // 50 + _Y // 50) % 2) * 255,
    "stripes": ((_X // 20) % 2) * 255,
    "circle": (np.hypot(_X - 150, _Y - 100) < 60) * 255,
    "half": (_X < 150) * 200,
}


@pytest.mark.parametrize("name", sorted(SYMMETRIC))
def test_phash_matches_imagehash_on_symmetric_patterns(name):
    """Symmetric images have DCT coefficients that are exactly zero; float noise must not flip bits."""
    image = Image.fromarray(SYMMETRIC[name].astype(np.uint8)).convert("RGB")
    assert f"{phash(image):016x}" == str(imagehash.phash(image))


@pytest.mark.parametrize("dtype", [np.float16, np.float64, ">f4"])
def test_a_float_tiff_pillow_cannot_open_is_unsupported(dtype):
    """The README's kind for a format the installed Pillow cannot read is `unsupported`:
    a well-formed TIFF of float samples is that, not a corrupt file (decode_error)."""
    import tifffile

    from pipeline.image.imaging import ImageError

    data = io.BytesIO()
    tifffile.imwrite(data, np.random.default_rng(0).random((8, 8, 3)).astype(dtype))
    with pytest.raises(ImageError) as info:
        decode_image(data.getvalue(), CL, DecodeOptions())
    assert info.value.kind == "unsupported" and "floating-point samples" in str(info.value)


@pytest.mark.parametrize(
    "data,kind",
    [
        (b"GIF89a", "truncated"),  # cut off within its 13-byte header
        (b"\x89PNG\r\n\x1a\n", "truncated"),
        (b"GIF89a" + bytes(20), "decode_error"),  # whole header, nonsense in it: corrupt
        (b"II*\x00\x08\x00\x00\x00" + b"not an image directory", "decode_error"),
    ],
)
def test_a_file_cut_within_its_header_is_truncated(data, kind):
    from pipeline.image.imaging import ImageError

    with pytest.raises(ImageError) as info:
        decode_image(data, CL, DecodeOptions())
    assert info.value.kind == kind
