import pytest

from pipeline.core.errors import ConfigError
from pipeline.model.bundle import load_bundle
from pipeline.model.profiles import (
    ChannelOrder,
    Layout,
    ResizeMode,
    ValueRange,
    load_profile,
    shipped_profile_names,
)
from tests.helpers import tiny_tagger


def test_shipped_profiles_hold_each_family_recipe():
    assert shipped_profile_names() == ["cl_tagger_v2", "joytag", "jtp1", "wd_v3"]
    cl, wd, joy, jtp = (load_profile(n) for n in ("cl_tagger_v2", "wd_v3", "joytag", "jtp1"))
    assert (cl.input_size, cl.preprocess.resize_mode, cl.preprocess.mean, cl.thresholds.default) == (
        (384, 384),
        ResizeMode.SQUASH,
        (0.5,) * 3,
        0.55,
    )
    assert wd.preprocess.channel_order is ChannelOrder.BGR and wd.preprocess.layout is Layout.NHWC
    assert wd.preprocess.value_range is ValueRange.BYTE and wd.thresholds.by_category == {
        "general": 0.35,
        "character": 0.85,
    }
    assert joy.preprocess.std == (0.26862954, 0.26130258, 0.27577711) and joy.thresholds.default == 0.4
    assert (
        jtp.preprocess.resize_mode is ResizeMode.FIT_PAD and jtp.preprocess.interpolation.value == "lanczos"
    )
    assert jtp.thresholds.default == 0.2


@pytest.mark.parametrize(
    "edit, field",
    [
        (('resize_mode = "squash"', 'resize_mode = "stretch"'), "preprocess.resize_mode"),
        (("input_size = 384", "input_size = -4"), "preprocess.input_size"),
        (("[preprocess]", "[preprocess]\ngamma = 2.2"), "preprocess.gamma"),
        (("default = 0.55", "default = 1.5"), "thresholds.default"),
        (('vocabulary_format = "cl_json"', 'vocabulary_format = "xml"'), "files.vocabulary_format"),
        (("std = [0.5, 0.5, 0.5]", "std = [0.5, 0.5]"), "preprocess.std"),
    ],
)
def test_bad_profile_names_the_field(tmp_path, edit, field):
    from importlib import resources

    text = (resources.files("pipeline.model") / "profiles" / "cl_tagger_v2.toml").read_text()
    assert edit[0] in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_profile(path)


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="wd_v3"):
        load_profile("no_such_family")


def test_a_new_family_needs_only_a_profile_file(tmp_path):
    """Odd file names, NHWC, softmax, custom vocabulary file: no code change."""
    bundle = tmp_path / "newfam"
    tiny_tagger(bundle / "weights.onnx", size=224, nhwc=True, tags=5, activation=None)
    (bundle / "labels.txt").write_text("a\nb\nc\nd\ne\n")
    profile = tmp_path / "newfam.toml"
    profile.write_text(
        """
name = "newfam"
[files]
model = "weights.onnx"
vocabulary = "labels.txt"
vocabulary_format = "lines"
[preprocess]
input_size = 224
resize_mode = "resize_crop"
interpolation = "bilinear"
value_range = "0-1"
mean = 0.5
std = 0.25
layout = "NHWC"
[model]
output_activation = "softmax"
[thresholds]
default = 0.3
"""
    )
    loaded = load_bundle(bundle, profile)
    assert loaded.profile.name == "newfam" and loaded.vocabulary.tags == ("a", "b", "c", "d", "e")
    assert (
        loaded.profile.preprocess.mean == (0.5, 0.5, 0.5) and loaded.profile.preprocess.layout is Layout.NHWC
    )
