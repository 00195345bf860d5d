"""Profiles from timm and Hugging Face configs: the CLI command, automatic use by
`tag`/`inspect`, refusals by field name, and keys of existing tables left unchanged."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.errors import ConfigError
from pipeline.job.incremental import profile_key
from pipeline.model.bundle import load_bundle
from pipeline.model.profile_import import profile_data
from pipeline.model.profiles import (
    Activation,
    ResizeMode,
    Rounding,
    load_profile,
    parse_profile,
    profile_from_data,
)
from tests.helpers import run_cli, tiny_tagger, wd_bundle

runner = CliRunner()
TIMM_CFG = {
    "input_size": [3, 224, 224],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "num_classes": 3,
}


def _timm_folder(tmp_path: Path, cfg: dict = TIMM_CFG, activation: str | None = "Sigmoid") -> Path:
    folder = tmp_path / "timm"
    tiny_tagger(folder / "model.onnx", size=224, nhwc=False, tags=3, activation=activation)
    (folder / "config.json").write_text(
        json.dumps({"architecture": "vit_tiny", "pretrained_cfg": cfg, "label_names": ["cat", "dog", "fox"]})
    )
    return folder


def test_model_profile_writes_a_profile_that_tag_and_inspect_then_use(tmp_path):
    folder = _timm_folder(tmp_path)
    result = runner.invoke(app, ["model", "profile", "--from", str(folder)])
    assert result.exit_code == 0, result.output
    written = tomllib.loads((folder / "tagpipe_profile.toml").read_text())
    assert (
        written["preprocess"]["crop_pct"] == 0.875
        and written["model"]["output_activation"] == "sigmoid_probabilities"
    )
    profile = load_bundle(folder).profile
    assert profile.preprocess.resize_size == (256, 256) and profile.preprocess.rounding is Rounding.TIMM
    assert profile.preprocess.resize_mode is ResizeMode.RESIZE_CROP and profile.input_size == (224, 224)
    again = run_cli("model", "profile", "--from", str(folder))
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert again.stderr.strip().count("\n") == 0  # one line
    assert runner.invoke(app, ["model", "profile", "--from", str(folder), "--overwrite"]).exit_code == 0


def test_a_folder_with_only_a_config_is_imported_and_says_so(tmp_path, caplog):
    folder = _timm_folder(tmp_path)
    with caplog.at_level("INFO"):
        bundle = load_bundle(folder)
    assert bundle.profile.source == f"imported from {folder / 'config.json'}"
    assert any("imported from" in r.getMessage() for r in caplog.records)
    assert bundle.vocabulary.tags == ("cat", "dog", "fox")
    result = runner.invoke(app, ["model", "inspect", str(folder)])
    assert (
        result.exit_code == 0 and "imported from" in result.output and "shortest side to 256" in result.output
    )


def test_a_shipped_family_wins_over_its_pytorch_config(tmp_path):
    """WD v3 folders carry timm's config.json, but the ONNX export takes BGR 0-255 pad-square."""
    folder = wd_bundle(tmp_path / "wd")
    (folder / "config.json").write_text(
        json.dumps({"pretrained_cfg": {**TIMM_CFG, "input_size": [3, 448, 448]}})
    )
    assert load_bundle(folder).profile.name == "wd_v3"


@pytest.mark.parametrize(
    "edit,field",
    [
        ({"test_mode": "tta"}, "pretrained_cfg.test_mode"),
        ({"label_offset": 1}, "pretrained_cfg.label_offset"),
        ({"crop_mode": "random"}, "preprocess.crop_mode"),
        ({"crop_pct": 1.15}, "preprocess.crop_pct"),
        ({"input_size": [3, 256, 256]}, "ONNX input"),
    ],
)
def test_timm_settings_tagpipe_cannot_reproduce_stop_the_import_by_name(tmp_path, edit, field):
    folder = _timm_folder(tmp_path, {**TIMM_CFG, **edit})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        profile_data(folder)


@pytest.mark.parametrize(
    "config,field",
    [
        ({"do_pad": True}, "do_pad"),
        ({"size": {"shortest_edge": 224, "longest_edge": 1333}}, "size"),
        ({"rescale_factor": 0.5}, "rescale_factor"),
        ({"image_grid_pinpoints": [[336, 672]]}, "image_grid_pinpoints"),
        ({"do_center_crop": False, "size": {"shortest_edge": 224}}, "preprocess.size"),
        ({"image_processor_type": "AcmeImageProcessor", "size": 224}, "field size = 224"),
        ({"resample": None}, "resample"),
    ],
)
def test_hf_settings_tagpipe_cannot_reproduce_stop_the_import_by_name(tmp_path, config, field):
    folder = tmp_path / "hf"
    tiny_tagger(folder / "model.onnx", size=224, nhwc=False, tags=2, activation=None)
    base = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 224},
        "do_center_crop": True,
        "resample": 3,
        "crop_size": {"height": 224, "width": 224},
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps({**base, **config}))
    (folder / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(ConfigError, match=field):
        profile_data(folder)


def test_logits_of_unknown_kind_ask_for_the_activation(tmp_path):
    folder = _timm_folder(tmp_path, activation=None)
    with pytest.raises(ConfigError, match="--activation"):
        profile_data(folder)
    assert profile_data(folder, activation="softmax")["model"]["output_activation"] == "softmax"


def _profile_text(preprocess: str) -> str:
    return f'name = "p"\n[files]\nvocabulary = "v"\nvocabulary_format = "lines"\n[preprocess]\n{preprocess}'


@pytest.mark.parametrize(
    "preprocess,expected",
    [
        (
            'input_size = 224\nresize_size = 256\nresize_mode = "resize_crop"\n',
            ((256, 256), ResizeMode.RESIZE_CROP),
        ),
        ('input_size = 224\nresize_size = 256\nresize_mode = "squash"\n', ((256, 256), ResizeMode.SQUASH)),
        ("input_size = 224\ncrop_pct = 0.875\n", ((256, 256), ResizeMode.RESIZE_CROP)),
        ('input_size = 224\ncrop_pct = 0.875\ncrop_mode = "squash"\n', ((256, 256), ResizeMode.SQUASH)),
        ('input_size = 224\ncrop_pct = 1.0\ncrop_mode = "border"\n', ((224, 224), ResizeMode.FIT_PAD)),
        ("size = { shortest_edge = 256 }\ncrop_size = 224\n", ((256, 256), ResizeMode.RESIZE_CROP)),
        ("size = { height = 240, width = 250 }\ncrop_size = 224\n", ((250, 240), ResizeMode.SQUASH)),
        ("size = { height = 224, width = 224 }\n", ((224, 224), ResizeMode.SQUASH)),
    ],
)
def test_the_three_vocabularies_land_on_the_same_fields(preprocess, expected):
    pre = parse_profile(
        _profile_text(preprocess + 'interpolation = "bicubic"\nvalue_range = "0-1"\n'), "p"
    ).preprocess
    assert (pre.resize_size, pre.resize_mode) == expected and (pre.width, pre.height) == (224, 224)


@pytest.mark.parametrize(
    "preprocess,field",
    [
        ('input_size = 224\ncrop_pct = 0.9\nresize_mode = "squash"\n', "preprocess.resize_mode"),
        ("input_size = 224\ncrop_pct = 0.9\nsize = { shortest_edge = 256 }\n", "mix"),
        ('input_size = 224\nresize_size = 200\nresize_mode = "resize_crop"\n', "preprocess.resize_size"),
        ('input_size = 224\nresize_size = 256\nresize_mode = "pad_square"\n', "preprocess.resize_size"),
        ("size = { shortest_edge = 256 }\ncrop_size = 224\ninput_size = 200\n", "preprocess.input_size"),
        ("size = { longest_edge = 256 }\ncrop_size = 224\n", "preprocess.size"),
        ('input_size = 224\nresize_mode = "squash"\nrounding = "numpy"\n', "preprocess.rounding"),
    ],
)
def test_geometry_mistakes_name_the_field(preprocess, field):
    with pytest.raises(ConfigError, match=field):
        parse_profile(_profile_text(preprocess + 'interpolation = "bicubic"\nvalue_range = "0-1"\n'), "p")


LEGACY_KEYS = json.loads((Path(__file__).parents[1] / "data" / "legacy_profile_keys.json").read_text())


@pytest.mark.parametrize("name", sorted(LEGACY_KEYS))
def test_shipped_profiles_keep_the_keys_existing_tables_were_written_with(name):
    """Recorded from the code before this change: a changed key would re-tag every table on upgrade."""
    profile = load_profile(name)
    assert profile_key(profile) == LEGACY_KEYS[name]
    assert profile.preprocess.extra_key() == {}


def test_new_geometry_joins_the_key():
    text = _profile_text(
        'input_size = 224\nresize_size = 256\nresize_mode = "resize_crop"\ninterpolation = "bicubic"\n'
        'value_range = "0-1"\n'
    )
    assert parse_profile(text, "p").preprocess.extra_key() == {"resize_size": [256, 256]}
    assert profile_from_data(tomllib.loads(text), "p").activation is Activation.SIGMOID


def test_fast_decode_drafts_for_the_resize_size_and_stays_close_to_exact():
    """The DCT-scaled decode keeps draft_ratio times the size the image is resized to
    (256 for "resize 256, crop 224"), not the crop size."""
    from pipeline.image.imaging import DecodeOptions, decode_image, draft_request
    from tests.sample_photos import photo_paths

    text = _profile_text(
        'input_size = 224\nresize_size = 448\nresize_mode = "resize_crop"\nrounding = "timm"\n'
        'interpolation = "bicubic"\nvalue_range = "0-1"\n'
    )
    pre = parse_profile(text, "p").preprocess
    cropped_only = parse_profile(text.replace("resize_size = 448\n", ""), "p").preprocess
    assert draft_request(pre, 4000, 3000, 2.0)[1] >= 2 * 448 > draft_request(cropped_only, 4000, 3000, 2.0)[1]
    data = next(p for p in photo_paths() if p.name == "retina.jpg").read_bytes()
    fast = decode_image(data, pre, DecodeOptions(exact=False)).pixels.astype(float)
    exact = decode_image(data, pre, DecodeOptions(exact=True)).pixels.astype(float)
    assert fast.shape == exact.shape == (224, 224, 3) and abs(fast - exact).mean() < 2.0


def test_the_readme_caffe_profile_parses_to_resize_256_crop_224():
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    block = next(b.split("```", 1)[0] for b in readme.split("```toml\n")[1:] if "caffe-resnet" in b)
    profile = parse_profile(block, "README")
    pre = profile.preprocess
    assert (pre.resize_size, (pre.width, pre.height)) == ((256, 256), (224, 224))
    assert pre.resize_mode is ResizeMode.SQUASH and pre.mean == (123.0, 117.0, 104.0)
    assert profile.activation is Activation.SOFTMAX_PROBABILITIES


def test_an_integer_size_means_what_the_processor_class_means(tmp_path):
    """transformers reads `size: 224` as a shortest edge for CLIP and ConvNext, a square for ViT."""
    folder = tmp_path / "hf"
    tiny_tagger(folder / "model.onnx", size=224, nhwc=False, tags=2, activation=None)
    (folder / "config.json").write_text(
        json.dumps({"id2label": {"0": "a", "1": "b"}, "architectures": ["X"]})
    )
    clip = {
        "image_processor_type": "CLIPImageProcessor",
        "size": 224,
        "crop_size": 224,
        "do_center_crop": True,
        "resample": 3,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(clip))
    data = profile_data(folder)
    assert data["preprocess"]["size"] == {"shortest_edge": 224} and data["name"] == "X"
    vit = {**clip, "image_processor_type": "ViTImageProcessor", "do_center_crop": False}
    del vit["crop_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps(vit))
    assert profile_data(folder)["preprocess"]["size"] == {"height": 224, "width": 224}


def _key_as_0_2_computed_it(cfg, bundle, legacy_profile: str) -> str:
    """incremental.inference_key as the earlier code wrote it, for keys already in tables."""
    from pipeline.job.incremental import _digest

    return _digest(
        {
            "model_sha256": bundle.fingerprint.model_sha256,
            "profile": legacy_profile,
            "exact_decode": cfg.exact_decode,
            "draft_ratio": None if cfg.exact_decode else cfg.draft_ratio,
            "max_pixels": cfg.max_pixels,
            "dense_logits": cfg.dense_logits,
            "logit_floor": cfg.logit_floor,
        }
    )


@pytest.mark.parametrize("with_embedding", [True, False])
def test_whole_inference_keys_of_existing_tables_stay(tmp_path, with_embedding):
    """The full key, for a CL bundle with and without its embedding output and a WD one
    (sparse logits: their vocabularies are far above 4,096 tags)."""
    from pipeline.demo.model import write_demo_bundle
    from pipeline.job.incremental import inference_key
    from pipeline.job.settings import TagJobConfig

    cfg = TagJobConfig(inputs=("x",), output="o", model="m", dense_logits=False)
    cl = load_bundle(write_demo_bundle(tmp_path / "cl", with_embedding_output=with_embedding))
    wd = load_bundle(wd_bundle(tmp_path / "wd"))
    for bundle in (cl, wd):
        assert inference_key(cfg, bundle) == _key_as_0_2_computed_it(
            cfg, bundle, LEGACY_KEYS[bundle.profile.name]
        )


def test_a_bgr_profile_with_uneven_mean_joins_the_key_with_its_order():
    text = _profile_text(
        'input_size = 8\nresize_mode = "squash"\ninterpolation = "bicubic"\nvalue_range = "0-255"\n'
        'mean = [104, 117, 123]\nchannel_order = "BGR"\nmean_std_order = "{}"\n'
    )
    keys = {order: parse_profile(text.format(order), "p").preprocess.extra_key() for order in ("RGB", "BGR")}
    assert keys == {"RGB": {"mean_std_order": "RGB"}, "BGR": {"mean_std_order": "BGR"}}


@pytest.mark.parametrize("crop_mode", ["border", "center", "squash"])
def test_fast_decode_keeps_the_exact_sizes_and_offsets(crop_mode):
    """A drafted JPEG is smaller than the file: sizes and offsets still come from the
    file's own size, so fast mode lands on the same pixels as exact mode, give or take
    the DCT scaling (a pixel off, border mode differed by 3.5 levels on average)."""
    import io

    from PIL import Image

    from pipeline.image.imaging import DecodeOptions, decode_image
    from tests.sample_photos import photo_paths

    retina = Image.open(next(p for p in photo_paths() if p.name == "retina.jpg")).convert("RGB")
    text = _profile_text(
        f'input_size = 224\ncrop_pct = 0.9\ncrop_mode = "{crop_mode}"\ninterpolation = "bicubic"\n'
        'value_range = "0-1"\n'
    )
    pre = parse_profile(text, "p").preprocess
    for size in ((3001, 2003), (1203, 4001)):
        out = io.BytesIO()
        retina.resize(size).save(out, "JPEG", quality=92)
        fast = decode_image(out.getvalue(), pre, DecodeOptions()).pixels.astype(float)
        exact = decode_image(out.getvalue(), pre, DecodeOptions(exact=True)).pixels.astype(float)
        assert abs(fast - exact).mean() < 1.0, (size, abs(fast - exact).mean())


def test_a_profile_whose_input_size_differs_from_the_model_stops_before_work(tmp_path):
    """A fixed 224 model given a 256 profile answered through the in-graph path and failed
    every row through numpy; now the bundle is refused, naming the field."""
    from pipeline.core.errors import BundleError

    folder = _timm_folder(tmp_path)
    (folder / "tagpipe_profile.toml").write_text(
        'name = "wrong"\n[files]\nvocabulary = "config.json"\nvocabulary_format = "config_labels"\n'
        "[preprocess]\n"
        'input_size = 256\nresize_size = 288\nresize_mode = "resize_crop"\ninterpolation = "bicubic"\n'
        'value_range = "0-1"\n'
    )
    with pytest.raises(
        BundleError, match=r"takes 224x224 but profile wrong gives 256x256 \(preprocess.input_size\)"
    ):
        load_bundle(folder)


def test_a_misspelt_required_field_is_named():
    with pytest.raises(
        ConfigError, match=r"missing field preprocess.interpolation \(found preprocess.interpolaton"
    ):
        parse_profile(
            _profile_text(
                'input_size = 8\nresize_mode = "squash"\ninterpolaton = "bicubic"\nvalue_range = "0-1"\n'
            ),
            "p",
        )


def test_imported_profiles_drop_alpha_as_timm_and_hf_do(tmp_path):
    """convert("RGB") keeps the colour under transparent pixels; so does the import."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.image.imaging import DecodeOptions, decode_image

    folder = _timm_folder(tmp_path)
    profile = profile_from_data(profile_data(folder), "imported")
    rgba = np.zeros((300, 300, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # red under full transparency
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, "PNG")
    pixels = decode_image(out.getvalue(), profile.preprocess, DecodeOptions(exact=True)).pixels
    assert profile.preprocess.alpha_order.value == "drop" and (pixels[..., 0] == 200).all()
