"""Profiles from timm and Hugging Face configs: the CLI command, automatic use by
`tag`/`inspect`, refusals by field name, and keys of existing tables left unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import tiny_tagger, wd_bundle
from typer.testing import CliRunner

from pipeline.bundle import load_bundle
from pipeline.cli import app
from pipeline.errors import ConfigError
from pipeline.incremental import profile_key
from pipeline.profile_import import profile_data
from pipeline.profiles import (
    Activation,
    ResizeMode,
    Rounding,
    load_profile,
    parse_profile,
    profile_from_data,
)

runner = CliRunner()
TIMM_CFG = {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 3}  # fmt: skip


def _timm_folder(tmp_path: Path, cfg: dict = TIMM_CFG, activation: str | None = "Sigmoid") -> Path:
    folder = tmp_path / "timm"
    tiny_tagger(folder / "model.onnx", size=224, nhwc=False, tags=3, activation=activation)
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny", "pretrained_cfg": cfg,
                                                    "label_names": ["cat", "dog", "fox"]}))  # fmt: skip
    return folder


def test_model_profile_writes_a_profile_that_tag_and_inspect_then_use(tmp_path):
    folder = _timm_folder(tmp_path)
    result = runner.invoke(app, ["model", "profile", "--from", str(folder)])
    assert result.exit_code == 0, result.output
    written = tomllib.loads((folder / "tagpipe_profile.toml").read_text())
    assert written["preprocess"]["crop_pct"] == 0.875 and written["model"]["output_activation"] == "sigmoid_probabilities"
    profile = load_bundle(folder).profile
    assert profile.preprocess.resize_size == (256, 256) and profile.preprocess.rounding is Rounding.TIMM
    assert profile.preprocess.resize_mode is ResizeMode.RESIZE_CROP and profile.input_size == (224, 224)
    again = subprocess.run([sys.executable, "-m", "pipeline.cli", "model", "profile", "--from", str(folder)],
                           capture_output=True, text=True, env=dict(os.environ), timeout=120)  # fmt: skip
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
    assert result.exit_code == 0 and "imported from" in result.output and "resize_crop to 256x256" in result.output


def test_a_shipped_family_wins_over_its_pytorch_config(tmp_path):
    """WD v3 folders carry timm's config.json, but the ONNX export takes BGR 0-255 pad-square."""
    folder = wd_bundle(tmp_path / "wd")
    (folder / "config.json").write_text(json.dumps({"pretrained_cfg": {**TIMM_CFG, "input_size": [3, 448, 448]}}))
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
    ],
)
def test_hf_settings_tagpipe_cannot_reproduce_stop_the_import_by_name(tmp_path, config, field):
    folder = tmp_path / "hf"
    tiny_tagger(folder / "model.onnx", size=224, nhwc=False, tags=2, activation=None)
    base = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224}, "do_center_crop": True,
            "crop_size": {"height": 224, "width": 224}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # fmt: skip
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
        ('input_size = 224\nresize_size = 256\nresize_mode = "resize_crop"\n', ((256, 256), ResizeMode.RESIZE_CROP)),
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
    pre = parse_profile(_profile_text(preprocess + 'interpolation = "bicubic"\nvalue_range = "0-1"\n'), "p").preprocess
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


LEGACY_KEYS = json.loads((Path(__file__).parent / "data" / "legacy_profile_keys.json").read_text())


@pytest.mark.parametrize("name", sorted(LEGACY_KEYS))
def test_shipped_profiles_keep_the_keys_existing_tables_were_written_with(name):
    """Recorded from 0.2's code: a changed key would re-tag every table on upgrade."""
    profile = load_profile(name)
    assert profile_key(profile) == LEGACY_KEYS[name]
    assert profile.preprocess.extra_key() == {}


def test_new_geometry_joins_the_key():
    text = _profile_text('input_size = 224\nresize_size = 256\nresize_mode = "resize_crop"\ninterpolation = "bicubic"\n'
                         'value_range = "0-1"\n')  # fmt: skip
    assert parse_profile(text, "p").preprocess.extra_key() == {"resize_size": [256, 256]}
    assert profile_from_data(tomllib.loads(text), "p").activation is Activation.SIGMOID


def test_fast_decode_drafts_for_the_resize_size_and_stays_close_to_exact():
    """The DCT-scaled decode keeps draft_ratio times the size the image is resized to
    (256 for "resize 256, crop 224"), not the crop size."""
    from pipeline.imaging import DecodeOptions, decode_image, draft_request
    from pipeline.sample_photos import photo_paths

    text = _profile_text('input_size = 224\nresize_size = 448\nresize_mode = "resize_crop"\nrounding = "timm"\n'
                         'interpolation = "bicubic"\nvalue_range = "0-1"\n')  # fmt: skip
    pre = parse_profile(text, "p").preprocess
    cropped_only = parse_profile(text.replace("resize_size = 448\n", ""), "p").preprocess
    assert draft_request(pre, 4000, 3000, 2.0)[1] >= 2 * 448 > draft_request(cropped_only, 4000, 3000, 2.0)[1]
    data = next(p for p in photo_paths() if p.name == "retina.jpg").read_bytes()
    fast = decode_image(data, pre, DecodeOptions(exact=False)).pixels.astype(float)
    exact = decode_image(data, pre, DecodeOptions(exact=True)).pixels.astype(float)
    assert fast.shape == exact.shape == (224, 224, 3) and abs(fast - exact).mean() < 2.0


def test_the_readme_caffe_profile_parses_to_resize_256_crop_224():
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = next(b.split("```", 1)[0] for b in readme.split("```toml\n")[1:] if "caffe-resnet" in b)
    profile = parse_profile(block, "README")
    pre = profile.preprocess
    assert (pre.resize_size, (pre.width, pre.height)) == ((256, 256), (224, 224))
    assert pre.resize_mode is ResizeMode.SQUASH and pre.mean == (123.0, 117.0, 104.0)
    assert profile.activation is Activation.SOFTMAX_PROBABILITIES
