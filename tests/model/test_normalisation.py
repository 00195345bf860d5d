"""mean and std have one meaning: RGB order (timm's and Hugging Face's), whatever the
model's channel order, or the order mean_std_order names. Both normalisation paths
(in the graph, in numpy) must give the tensor the definition gives, for fp32 and fp16
models, NCHW and NHWC, RGB and BGR, with uneven mean and std where a mistake shows."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from pipeline.core.errors import ConfigError
from pipeline.model.profiles import parse_profile
from pipeline.model.session_runner import Normaliser
from tests.helpers import feed_through_graph, identity_model

MEAN_RGB, STD_RGB = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # uneven: a channel swap shows


def _profile(channel_order: str, layout: str, mean_std_order: str | None, value_range: str = "0-1"):
    mean, std = MEAN_RGB, STD_RGB
    if mean_std_order == "BGR":
        mean, std = mean[::-1], std[::-1]
    if value_range == "0-255":
        mean = [m * 255 for m in mean]
    order = f'mean_std_order = "{mean_std_order}"\n' if mean_std_order else ""
    return parse_profile(
        f'name = "n"\n[files]\nvocabulary = "v"\nvocabulary_format = "lines"\n[preprocess]\ninput_size = 8\n'
        f'resize_mode = "squash"\ninterpolation = "bilinear"\nvalue_range = "{value_range}"\nmean = {mean}\n'
        f'std = {std}\nchannel_order = "{channel_order}"\nlayout = "{layout}"\n{order}',
        "test profile",
    )


def definition(pixels: np.ndarray, channel_order: str, layout: str, value_range: str) -> np.ndarray:
    """Straight from the README: x = (v / 255 - mean) / std per RGB channel (or v - 255 * mean
    over 255 * std for 0-255 models), then the model's channel order, then its layout."""
    v = pixels.astype(np.float64)
    mean, std = np.asarray(MEAN_RGB), np.asarray(STD_RGB)
    x = (v / 255.0 - mean) / std if value_range == "0-1" else (v - 255 * mean) / std
    if channel_order == "BGR":
        x = x[..., ::-1]
    return x.transpose(0, 3, 1, 2) if layout == "NCHW" else x


@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("channel_order,mean_std_order", [("RGB", None), ("BGR", "RGB"), ("BGR", "BGR")])
@pytest.mark.parametrize("value_range", ["0-1", "0-255"])
def test_both_paths_equal_the_definition(
    tmp_path, elem_type, layout, channel_order, mean_std_order, value_range
):
    profile = _profile(channel_order, layout, mean_std_order, value_range)
    pre = profile.preprocess
    pixels = np.random.default_rng(3).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    want = definition(pixels, channel_order, layout, value_range)
    model = identity_model(tmp_path / "id.onnx", pre, elem_type=elem_type)
    in_graph = feed_through_graph(model, pre, pixels).astype(np.float64)
    in_numpy = Normaliser(pre)(pixels).astype(np.float64)
    rtol = 1e-5 if elem_type == TensorProto.FLOAT else 2e-3  # fp16 keeps 11 bits
    np.testing.assert_allclose(in_numpy, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(in_graph, want, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(in_graph, in_numpy, rtol=rtol, atol=rtol)


def test_a_bgr_model_with_uneven_mean_must_say_the_order():
    """Before mean_std_order the two paths read such a mean in different orders; now the
    profile must say which it means."""
    with pytest.raises(ConfigError, match="preprocess.mean_std_order"):
        _profile("BGR", "NHWC", None)
    with pytest.raises(ConfigError, match="mean_std_order = 'GBR'"):
        parse_profile(
            'name = "n"\n[files]\nvocabulary = "v"\nvocabulary_format = "lines"\n'
            "[preprocess]\ninput_size = 8\n"
            'resize_mode = "squash"\ninterpolation = "bilinear"\nvalue_range = "0-1"\n'
            'mean_std_order = "GBR"\n',
            "p",
        )
