"""Exact-mode preprocessing equals each model family's published recipe (<= 1 level).

Each recipe below is written out straight from its model card / reference code, with
Pillow and numpy only, independently of pipeline/image/imaging.py. Our side is the real path:
decode_image(exact=True) -> uint8 -> the in-graph normalisation (and the numpy one),
compared in 0-255 units on the tensor the model would receive.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.image.imaging import DecodeOptions, decode_image
from pipeline.model.profiles import Layout, ValueRange, load_profile
from pipeline.model.session_runner import Normaliser
from tests.helpers import feed_through_graph, identity_model
from tests.sample_photos import photo_paths

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def _pad_square_white(image: Image.Image) -> Image.Image:
    max_dim = max(image.size)
    padded = Image.new("RGB", (max_dim, max_dim), (255, 255, 255))
    padded.paste(image, ((max_dim - image.size[0]) // 2, (max_dim - image.size[1]) // 2))
    return padded


def recipe_wd_v3(image: Image.Image) -> np.ndarray:
    """SmilingWolf wd-tagger: alpha over white, pad to a white square, BICUBIC 448, BGR float 0-255, NHWC."""
    padded = _pad_square_white(_on_white(image))
    if padded.size[0] != 448:
        padded = padded.resize((448, 448), Image.BICUBIC)
    return np.asarray(padded, np.float32)[:, :, ::-1][None]


def recipe_cl_tagger_v2(image: Image.Image) -> np.ndarray:
    """CL Tagger v2 card: resize to 384x384 BICUBIC, /255, (x-0.5)/0.5, RGB, NCHW."""
    resized = _on_white(image).resize((384, 384), Image.BICUBIC)
    x = np.asarray(resized, np.float32) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)[None]


def recipe_joytag(image: Image.Image) -> np.ndarray:
    """JoyTag README prepare_image: white square pad, BICUBIC 448, /255, CLIP mean/std, NCHW."""
    padded = _pad_square_white(_on_white(image))
    if padded.size[0] != 448:
        padded = padded.resize((448, 448), Image.BICUBIC)
    x = np.asarray(padded, np.float32) / 255.0
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)[None]


def recipe_jtp1(image: Image.Image) -> np.ndarray:
    """JTP-1 PILOT: Fit((384,384), LANCZOS, grow) -> ToTensor -> CompositeAlpha(0.5) ->
    Normalize(0.5, 0.5) -> CenterCrop(384) (torchvision pads with 0 = grey after normalising)."""
    image = image.convert("RGBA")
    w, h = image.size
    scale = min(384 / h, 384 / w)
    if scale != 1.0:
        image = image.resize((min(round(w * scale), 384), min(round(h * scale), 384)), Image.LANCZOS)
    t = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
    alpha = t[3:4]
    rgb = t[:3] * alpha + (1.0 - alpha) * 0.5
    rgb = (rgb - 0.5) / 0.5
    out = np.zeros((3, 384, 384), np.float32)
    top, left = (384 - rgb.shape[1]) // 2, (384 - rgb.shape[2]) // 2
    out[:, top : top + rgb.shape[1], left : left + rgb.shape[2]] = rgb
    return out[None]


RECIPES = {
    "wd_v3": recipe_wd_v3,
    "cl_tagger_v2": recipe_cl_tagger_v2,
    "joytag": recipe_joytag,
    "jtp1": recipe_jtp1,
}


def to_levels(x: np.ndarray, pre) -> np.ndarray:
    """A model input tensor back in 0-255 units, NHWC, in the profile's channel order."""
    if pre.layout is Layout.NCHW:
        x = x.transpose(0, 2, 3, 1)
    x = x * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32)
    return x * 255.0 if pre.value_range is ValueRange.UNIT else x


def _test_images() -> list[tuple[str, bytes]]:
    """Real photos in several shapes, two real RGBA images, greyscale, and an upscale case."""
    by_name = {p.stem: p for p in photo_paths()}
    cases = [
        (name, by_name[name].read_bytes())
        for name in ("astronaut", "chelsea", "camera", "rocket", "flower")
        if name in by_name
    ]
    coffee = Image.open(by_name["coffee"]).convert("RGB")
    for label, box in (
        ("tall", (200, 0, 380, 400)),
        ("wide", (0, 150, 600, 260)),
        ("small", (300, 200, 400, 290)),
    ):
        out = io.BytesIO()
        coffee.crop(box).save(out, "PNG")
        cases.append((f"coffee-{label}", out.getvalue()))
    # transparency: a photo cut out with soft and hard alpha edges, as RGBA, LA and palette
    chelsea = Image.open(by_name["chelsea"]).convert("RGB")
    yy, xx = np.mgrid[0 : chelsea.height, 0 : chelsea.width]
    r = np.hypot((xx - 225) / 200, (yy - 150) / 130)
    alpha = np.clip((1.2 - r) * 400, 0, 255).astype(np.uint8)  # soft ring
    alpha[:, :60] = 0  # hard edge
    cutout = chelsea.copy()
    cutout.putalpha(Image.fromarray(alpha))
    for label, image in (("rgba", cutout), ("la", cutout.convert("LA")), ("palette", cutout.quantize(64))):
        out = io.BytesIO()
        if label == "palette":
            image.info["transparency"] = 0
            image.save(out, "PNG", transparency=0)
        else:
            image.save(out, "PNG")
        cases.append((f"chelsea-{label}", out.getvalue()))
    return cases


IMAGES = _test_images()


@pytest.mark.parametrize("profile_name", sorted(RECIPES))
def test_exact_preprocessing_equals_published_recipe(profile_name, tmp_path):
    profile = load_profile(profile_name)
    pre = profile.preprocess
    model = identity_model(tmp_path / "identity.onnx", pre)
    worst = {}
    for name, data in IMAGES:
        expected = to_levels(RECIPES[profile_name](Image.open(io.BytesIO(data))), pre)
        pixels = decode_image(data, pre, DecodeOptions(exact=True)).pixels[None]
        in_graph = to_levels(feed_through_graph(model, pre, pixels), pre)
        in_numpy = to_levels(Normaliser(pre)(pixels), pre)
        assert in_graph.shape == expected.shape
        worst[name] = float(np.abs(in_graph - expected).max())
        np.testing.assert_allclose(in_numpy, in_graph, atol=1e-3)
    assert max(worst.values()) <= 1.0 + 1e-3, worst


def test_recipe_check_can_fail(tmp_path):
    """The comparison is sharp enough to see a wrong recipe: BILINEAR instead of BICUBIC."""
    pre = load_profile("joytag").preprocess
    data = dict(IMAGES)["astronaut"]
    ours = decode_image(data, pre, DecodeOptions(exact=True)).pixels.astype(np.float32)
    wrong = np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").resize((448, 448), Image.BILINEAR), np.float32
    )
    assert np.abs(ours - wrong).max() > 8


def test_exact_pad_square_on_a_strip_stays_close_without_the_huge_canvas():
    """1x10000 would need a 10000x10000 canvas; exact mode fits and pads instead."""
    strip = Image.fromarray(np.random.default_rng(2).integers(0, 256, (10000, 3, 3), dtype=np.uint8))
    out = io.BytesIO()
    strip.save(out, "PNG")
    pre = load_profile("wd_v3").preprocess
    ours = decode_image(out.getvalue(), pre, DecodeOptions(exact=True)).pixels.astype(np.float32)
    expected = recipe_wd_v3(strip)[0][:, :, ::-1]  # back to RGB
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).mean() < 0.5  # the same except where strip and padding meet
