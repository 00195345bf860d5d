"""Profiles imported from timm and Hugging Face configs give the pixels those libraries give.

Three oracles for each recipe, on real photos cropped to aspect ratios from 1:3 to 3:1:
- timm's own eval transform (resolve_data_config + create_transform), when timm is
  installed (it needs torch and torchvision, several GB: not a test dependency; run
  `pip install torch torchvision timm` beside the project to include it, see
  docs/benchmarks.md for the recorded run);
- Hugging Face's own image processors (the PIL ones), when transformers is installed
  (a test dependency);
- an implementation written here from the documented algorithms (torchvision's
  Resize/CenterCrop, timm's ResizeKeepRatio/CenterCropOrPad, Hugging Face's
  get_resize_output_image_size/center_crop), with Pillow and numpy only, always run.

Our side is the real path: the config written into a bundle folder beside an ONNX
model, imported by `profile_data` (what `tagpipe model profile` and `tag` use),
decode_image(exact=True), then both normalisation paths (in-graph and numpy).
Everything is compared in 0-255 levels, RGB, after undoing each side's normalisation.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from pipeline.image.imaging import DecodeOptions, decode_image
from pipeline.model.profile_import import profile_data
from pipeline.model.profiles import (
    ChannelOrder,
    Layout,
    ValueRange,
    parse_profile,
    profile_from_data,
)
from pipeline.model.session_runner import Normaliser
from tests.helpers import feed_through_graph, identity_model
from tests.sample_photos import photo_paths

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
PIL_FILTERS = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS,
}


def _photos() -> list[tuple[str, bytes]]:
    """Real photos in aspect ratios from 1:3 to 3:1, odd sizes included, one JPEG as
    shipped, and one with soft transparency."""
    by_name = {p.stem: p for p in photo_paths()}
    retina = Image.open(by_name["retina"]).convert("RGB")  # 1411x1411
    hubble = Image.open(by_name["hubble_deep_field"]).convert("RGB")  # 1000x872
    crops = {
        "1x3": (retina, (300, 0, 771, 1411)),
        "1x2": (retina, (350, 0, 1055, 1411)),
        "3x4": (hubble, (100, 0, 753, 871)),
        "odd-square": (retina, (10, 20, 523, 533)),
        "2x1": (retina, (0, 350, 1411, 1055)),
        "3x1": (retina, (0, 470, 1411, 941)),
    }
    cases = [
        ("rocket.jpg", by_name["rocket"].read_bytes()),
        ("chelsea-451x300", by_name["chelsea"].read_bytes()),
    ]
    for label, (image, box) in crops.items():
        out = io.BytesIO()
        image.crop(box).save(out, "PNG")
        cases.append((label, out.getvalue()))
    chelsea = Image.open(by_name["chelsea"]).convert("RGB")  # transparency: both libraries drop alpha
    yy, xx = np.mgrid[0 : chelsea.height, 0 : chelsea.width]
    chelsea.putalpha(
        Image.fromarray(
            np.clip((1.2 - np.hypot((xx - 225) / 200, (yy - 150) / 130)) * 400, 0, 255).astype(np.uint8)
        )
    )
    out = io.BytesIO()
    chelsea.save(out, "PNG")
    cases.append(("chelsea-rgba", out.getvalue()))
    return cases


PHOTOS = _photos()


# ---- the independent implementation, from each library's documented algorithm ----


def _torchvision_resize_shortest(image: Image.Image, size: int, interpolation) -> Image.Image:
    """torchvision.transforms.Resize(int): shortest side to size, long side int(size * long / short)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return image.resize((new_short, new_long) if w <= h else (new_long, new_short), interpolation)


def _torchvision_centre_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision.transforms.functional.center_crop: offsets int(round(d / 2.0))."""
    top = int(round((image.height - height) / 2.0))
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def _timm_resize_keep_ratio(image: Image.Image, target_hw, longest: float, interpolation) -> Image.Image:
    """timm.data.transforms.ResizeKeepRatio (no random scale): size = round(side / ratio)."""
    ratio_h, ratio_w = image.height / target_hw[0], image.width / target_hw[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return image.resize((round(image.width / ratio), round(image.height / ratio)), interpolation)


def _timm_centre_crop_or_pad(image: Image.Image, height: int, width: int, fill) -> Image.Image:
    """timm.data.transforms.center_crop_or_pad: pad (floor(d / 2) first), then centre crop."""
    if width > image.width or height > image.height:
        grown = Image.new("RGB", (max(width, image.width), max(height, image.height)), tuple(fill))
        grown.paste(
            image,
            (
                (width - image.width) // 2 if width > image.width else 0,
                (height - image.height) // 2 if height > image.height else 0,
            ),
        )
        image = grown
    return _torchvision_centre_crop(image, height, width)


def reference_timm(image: Image.Image, cfg: dict) -> np.ndarray:
    """timm transforms_imagenet_eval, as documented, to normalised CHW float32."""
    _, height, width = cfg.get("input_size", (3, 224, 224))
    crop_pct = cfg.get("crop_pct", 0.875)
    interpolation = PIL_FILTERS[cfg.get("interpolation", "bicubic")]
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    mode = cfg.get("crop_mode", "center")
    if mode == "squash":
        image = _torchvision_centre_crop(image.resize((scale[1], scale[0]), interpolation), height, width)
    elif mode == "border":
        fitted = _timm_resize_keep_ratio(image, scale, 1.0, interpolation)
        image = _timm_centre_crop_or_pad(fitted, height, width, [round(255 * v) for v in mean])
    else:
        if scale[0] == scale[1]:
            image = _torchvision_resize_shortest(image, scale[0], interpolation)
        else:
            image = _timm_resize_keep_ratio(image, scale, 0.0, interpolation)
        image = _torchvision_centre_crop(image, height, width)
    x = np.asarray(image, np.float32) / 255.0
    return ((x - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)


def reference_hf(image: Image.Image, cfg: dict) -> np.ndarray:
    """A Hugging Face PIL image processor (resize, centre crop, rescale, normalise)."""
    interpolation = {2: Image.BILINEAR, 3: Image.BICUBIC}[cfg.get("resample", 2)]
    size = cfg["size"]
    if cfg.get("image_processor_type") == "ConvNextImageProcessor" and size["shortest_edge"] < 384:
        edge = size["shortest_edge"]
        image = _torchvision_resize_shortest(image, int(edge / cfg.get("crop_pct", 224 / 256)), interpolation)
        crop = {"height": edge, "width": edge}
    elif "shortest_edge" in size:
        image = _torchvision_resize_shortest(image, size["shortest_edge"], interpolation)  # same int() rule
        crop = cfg.get("crop_size") if cfg.get("do_center_crop") else None
    else:
        image = image.resize((size["width"], size["height"]), interpolation)
        crop = cfg.get("crop_size") if cfg.get("do_center_crop") else None
    if crop:
        top, left = (image.height - crop["height"]) // 2, (image.width - crop["width"]) // 2
        image = image.crop((left, top, left + crop["width"], top + crop["height"]))
    x = np.asarray(image, np.float32) / 255.0
    return ((x - np.float32(cfg["image_mean"])) / np.float32(cfg["image_std"])).transpose(2, 0, 1)


# ---- the libraries themselves, when installed ----


def library_timm(image: Image.Image, cfg: dict) -> np.ndarray:
    timm_data = pytest.importorskip("timm.data")
    config = timm_data.resolve_data_config({}, pretrained_cfg=cfg)
    return timm_data.create_transform(**config)(image).numpy()


def library_hf(image: Image.Image, cfg: dict) -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    kind = cfg["image_processor_type"]
    processor = getattr(transformers, kind + "Pil", None) or getattr(transformers, kind)
    settings = {k: v for k, v in cfg.items() if k != "image_processor_type"}
    return processor(**settings)(image, return_tensors="np")["pixel_values"][0]


TIMM_CONFIGS = {
    "imagenet-default": {
        "input_size": [3, 224, 224],
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    },
    "crop_pct-0.95": {
        "input_size": [3, 224, 224],
        "interpolation": "bicubic",
        "crop_pct": 0.95,
        "crop_mode": "center",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    },
    "bilinear-0.9-288": {
        "input_size": [3, 288, 288],
        "interpolation": "bilinear",
        "crop_pct": 0.9,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    },
    "squash-256-crop-224": {
        "input_size": [3, 224, 224],
        "crop_pct": 0.875,
        "crop_mode": "squash",
        "interpolation": "bilinear",
    },
    "squash-1.0": {"input_size": [3, 224, 224], "crop_pct": 1.0, "crop_mode": "squash"},
    "squash-0.9": {"input_size": [3, 256, 256], "crop_pct": 0.9, "crop_mode": "squash"},
    "border-1.0": {"input_size": [3, 224, 224], "crop_pct": 1.0, "crop_mode": "border"},
    "border-0.9": {
        "input_size": [3, 224, 224],
        "crop_pct": 0.9,
        "crop_mode": "border",
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
    },
    "center-non-square": {"input_size": [3, 192, 256], "crop_pct": 0.875, "interpolation": "bicubic"},
    "wd-v3-style-448": {
        "input_size": [3, 448, 448],
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "num_classes": 4,
        "fixed_input_size": True,
        "pool_size": None,
        "first_conv": None,
        "classifier": None,
    },
}

HF_CONFIGS = {
    "clip-shortest-edge-crop": {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 224},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
    },
    "vit-squash": {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": 224, "width": 224},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    },
    "convnext-crop_pct": {
        "image_processor_type": "ConvNextImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 224},
        "crop_pct": 0.875,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    },
}


def _bundle(tmp_path, config_name: str, config: dict, size_hw: tuple[int, int], nhwc: bool = False):
    """A bundle folder with the config and an identity ONNX model of the input size."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / config_name).write_text(json.dumps(config))
    labels = (
        {"id2label": {"0": "a", "1": "b"}} if config_name != "config.json" else {"label_names": ["a", "b"]}
    )
    if config_name != "config.json":
        (folder / "config.json").write_text(json.dumps(labels))
    else:
        (folder / "config.json").write_text(json.dumps({**config, **labels}))
    shape_profile = parse_profile(
        f'name = "x"\n[files]\nvocabulary = "v"\nvocabulary_format = "lines"\n[preprocess]\n'
        f'input_size = [{size_hw[1]}, {size_hw[0]}]\nresize_mode = "squash"\ninterpolation = "bicubic"\n'
        f'value_range = "0-1"\nlayout = "{"NHWC" if nhwc else "NCHW"}"\n',
        "shape",
    )
    identity_model(folder / "model.onnx", shape_profile.preprocess)
    return folder


def to_rgb_levels(x: np.ndarray, pre) -> np.ndarray:
    """A model input tensor (batch of one) back to RGB 0-255 levels, HWC."""
    x = x[0].transpose(1, 2, 0) if pre.layout is Layout.NCHW else x[0]
    if pre.channel_order is ChannelOrder.BGR:
        x = x[..., ::-1]
    x = x.astype(np.float32) * np.float32(pre.std) + np.float32(pre.mean)
    return x * 255.0 if pre.value_range is ValueRange.UNIT else x


def _levels(chw: np.ndarray, mean, std) -> np.ndarray:
    return (chw.transpose(1, 2, 0) * np.float32(std) + np.float32(mean)) * 255.0


def _compare(folder, profile, oracle, cfg, mean, std) -> dict[str, float]:
    """Worst difference per photo, in levels, for both normalisation paths."""
    model = folder / "model.onnx"
    worst = {}
    for name, data in PHOTOS:
        expected = _levels(oracle(Image.open(io.BytesIO(data)).convert("RGB"), cfg), mean, std)
        pixels = decode_image(data, profile.preprocess, DecodeOptions(exact=True)).pixels[None]
        in_graph = to_rgb_levels(feed_through_graph(model, profile.preprocess, pixels), profile.preprocess)
        in_numpy = to_rgb_levels(Normaliser(profile.preprocess)(pixels), profile.preprocess)
        assert in_graph.shape == expected.shape, (name, in_graph.shape, expected.shape)
        worst[name] = float(max(np.abs(in_graph - expected).max(), np.abs(in_numpy - expected).max()))
    return worst


@pytest.mark.parametrize("oracle", ["reference", "timm"])
@pytest.mark.parametrize("config_name", sorted(TIMM_CONFIGS))
def test_timm_config_import_matches_timm(tmp_path, config_name, oracle):
    cfg = TIMM_CONFIGS[config_name]
    folder = _bundle(
        tmp_path, "config.json", {"architecture": "x", "pretrained_cfg": cfg}, tuple(cfg["input_size"][1:])
    )
    profile = profile_from_data(profile_data(folder, activation="softmax"), "imported")
    run = reference_timm if oracle == "reference" else library_timm
    worst = _compare(folder, profile, run, cfg, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    assert max(worst.values()) <= 1.0 + 1e-3, worst


@pytest.mark.parametrize("oracle", ["reference", "transformers"])
@pytest.mark.parametrize("config_name", sorted(HF_CONFIGS))
def test_hf_config_import_matches_the_image_processor(tmp_path, config_name, oracle):
    cfg = HF_CONFIGS[config_name]
    size = cfg.get("crop_size") or (cfg["size"] if "height" in cfg["size"] else None)
    size_hw = (size["height"], size["width"]) if size else (cfg["size"]["shortest_edge"],) * 2
    folder = _bundle(tmp_path, "preprocessor_config.json", cfg, size_hw)
    profile = profile_from_data(profile_data(folder), "imported")
    run = reference_hf if oracle == "reference" else library_hf
    worst = _compare(folder, profile, run, cfg, cfg["image_mean"], cfg["image_std"])
    assert max(worst.values()) <= 1.0 + 1e-3, worst


def test_bgr_nhwc_profile_in_timm_terms_matches_timm(tmp_path):
    """A Caffe-style model (BGR, NHWC, uneven mean) written by hand in timm's terms:
    both paths feed it timm's pixels, in its channel order."""
    cfg = TIMM_CONFIGS["imagenet-default"]
    folder = _bundle(tmp_path, "config.json", {"pretrained_cfg": cfg}, (224, 224), nhwc=True)
    profile = parse_profile(
        'name = "caffe-style"\n[files]\nvocabulary = "config.json"\nvocabulary_format = "config_labels"\n'
        '[preprocess]\ninput_size = 224\ncrop_pct = 0.875\ncrop_mode = "center"\ninterpolation = "bicubic"\n'
        'value_range = "0-1"\nmean = [0.406, 0.456, 0.485]\nstd = [0.225, 0.224, 0.229]\n'
        'mean_std_order = "BGR"\n'
        'channel_order = "BGR"\nlayout = "NHWC"\nalpha_order = "drop"\n',
        "caffe-style",
    )
    assert profile.preprocess.mean == tuple(IMAGENET_MEAN)  # read in BGR, kept in RGB
    worst = _compare(folder, profile, reference_timm, cfg, IMAGENET_MEAN, IMAGENET_STD)
    assert max(worst.values()) <= 1.0 + 1e-3, worst


def test_the_oracle_comparison_can_fail(tmp_path):
    """A pixel of crop offset is visible: tagpipe's own rounding against timm's arithmetic
    on the same sizes differs by more than a level on real photos."""
    cfg = TIMM_CONFIGS["imagenet-default"]
    folder = _bundle(tmp_path, "config.json", {"pretrained_cfg": cfg}, (224, 224))
    data = profile_data(folder, activation="softmax")
    data["preprocess"]["rounding"] = "tagpipe"
    profile = profile_from_data(data, "wrong rounding")
    worst = _compare(folder, profile, reference_timm, cfg, IMAGENET_MEAN, IMAGENET_STD)
    assert max(worst.values()) > 8, worst
