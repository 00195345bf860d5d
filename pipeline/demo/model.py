"""A small tagger with CL Tagger v2's contract whose tags mean something checkable.

pixel_values [B,3,384,384] (RGB, (x/255 - 0.5)/0.5) -> logits [B,T] and embedding [B,D].
The embedding is a vector of pooled pixel statistics (channel means, chroma, luminance
spread, horizontal/vertical edge energy, 2x2 pooled colours); the head is one MatMul+Add
with hand-set weights, so "red_theme", "vertical_stripes" or "noise" fire when a person
would say so. All five CL side files are written in their real formats, weights live in
model.onnx.data (external data) as in the real bundle.

Why this module is long: the graph is written out node by node, in one place, so the
features each tag depends on can be read top to bottom next to the planted truth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import Field

from pipeline.core.settings import KeyRole, Setting, SettingsModel
from pipeline.demo.synthetic import KINDS, render
from pipeline.storage.filesystem import default_permissions

INPUT_SIZE = 384
FEATURES = [
    "mean_r",
    "mean_g",
    "mean_b",
    "chroma",
    "lum_std",
    "edge_x",
    "edge_y",
    "chroma_edge_x",
    "chroma_edge_y",
] + [f"pool_{c}{i}" for c in "rgb" for i in range(4)]
# The embedding (the head's input) holds the colour levels centred, 2 * level - 1, and a
# constant 1: uncentred levels made every colour of one lightness parallel (grey and
# white had cosine 1.0, black no direction at all), so cosine could not tell them apart.
CENTRED = [i for i, name in enumerate(FEATURES) if name.startswith(("mean_", "pool_"))]
EMBEDDING_FEATURES = FEATURES + ["one"]
EMBED_DIM = len(EMBEDDING_FEATURES)
LUMA = (0.299, 0.587, 0.114)
FILLER_TAGS = 234

# category -> tag -> {feature or derived name: weight}, "bias": b
_R, _G, _B = "mean_r", "mean_g", "mean_b"
RULES: dict[str, dict[str, dict[str, float]]] = {
    "general": {
        "red_theme": {_R: 12, _G: -6, _B: -6, "bias": -5.5},
        "green_theme": {_G: 12, _R: -6, _B: -6, "bias": -5.5},
        "blue_theme": {_B: 12, _R: -6, _G: -6, "bias": -5.5},
        "monochrome": {"chroma": -40, "bias": 4},
        "bright": {"luma": 20, "bias": -14},
        "dark": {"luma": -20, "bias": 5},
        "noise": {"edge_x": 60, "edge_y": 60, "bias": -9},
        "vertical_stripes": {"edge_x": 150, "edge_y": -150, "bias": -3},
        "horizontal_stripes": {"edge_y": 150, "edge_x": -150, "bias": -3},
    },
    # colourful vertical stripes: edges of the chroma map run across x, not y
    "character": {"stripe_chan_(tagpipe)": {"chroma_edge_x": 60, "chroma_edge_y": -60, "bias": -2.5}},
    "copyright": {"tagpipe_demo": {"chroma_edge_x": 60, "chroma_edge_y": -60, "bias": -2.0}},
    "artist": {"solid_painter": {"lum_std": -100, "edge_x": -100, "edge_y": -100, "bias": 6}},
    "meta": {"high_contrast": {"lum_std": 20, "bias": -7.6}},
    "rating": {
        "general": {"bias": 2},
        "sensitive": {_R: 10, _G: -5, _B: -5, "bias": -3},
        "questionable": {"luma": -20, "bias": 5},
        "explicit": {"edge_x": 80, "edge_y": 80, "bias": -12},
    },
    "quality": {
        "best_quality": {"lum_std": 20, "bias": -6.6},
        "high_quality": {"bias": -5},
        "normal_quality": {"bias": 1},
        "low_quality": {"bias": -5},
        "worst_quality": {"edge_x": 80, "edge_y": 80, "bias": -13},
    },
}
CATEGORY_NAMES = ["General", "Character", "Copyright", "Artist", "Meta", "Rating", "Quality"]


def vocabulary() -> tuple[list[str], list[str]]:
    """Tag names and lower-case categories, in output order."""
    tags, categories = [], []
    for category, rules in RULES.items():
        for tag in rules:
            tags.append(tag)
            categories.append(category)
    for i in range(FILLER_TAGS):
        tags.append(f"unused_tag_{i:03d}")
        categories.append("general")
    return tags, categories


def head_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """W [D, T] and b [T] of the classification head, over the embedding (centred levels
    and the constant): the same logits as the rules written over levels in [0, 1]."""
    weights, bias = _level_weights(seed)
    centred = weights.copy()
    centred[CENTRED] *= 0.5  # level = (centred + 1) / 2
    constant = 0.5 * weights[CENTRED].sum(axis=0, keepdims=True)
    return np.vstack([centred, constant]).astype(np.float32), bias


def _level_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """W [features, T] and b [T] written over the features with levels in [0, 1]."""
    tags, _ = vocabulary()
    weights = np.zeros((len(FEATURES), len(tags)), np.float32)
    bias = np.zeros(len(tags), np.float32)
    index = {name: i for i, name in enumerate(FEATURES)}
    column = 0
    for rules in RULES.values():
        for rule in rules.values():
            for name, value in rule.items():
                if name == "bias":
                    bias[column] = value
                elif name == "luma":  # luminance is linear in the channel means
                    for channel, coeff in zip((_R, _G, _B), LUMA):
                        weights[index[channel], column] += value * coeff
                else:
                    weights[index[name], column] += value
            column += 1
    rng = np.random.default_rng(seed)
    # unused tags: small random weights, logits well below any sensible threshold but
    # often above the 0.01 sparse-logit floor, so sparse storage has something to keep
    weights[:, column:] = rng.uniform(-0.3, 0.3, size=(len(FEATURES), len(tags) - column))
    bias[column:] = rng.uniform(-8.0, -5.0, size=len(tags) - column)
    return weights, bias


def features_numpy(pixel_values: np.ndarray) -> np.ndarray:
    """The embedding computed directly in numpy (the test oracle for the ONNX graph)."""
    u = (pixel_values.astype(np.float64) + 1.0) * 0.5
    means = u.mean(axis=(2, 3))
    chroma = (u.max(axis=1) - u.min(axis=1)).mean(axis=(1, 2))
    lum = np.tensordot(u, np.array(LUMA), axes=([1], [0]))  # [B,H,W]
    std = np.sqrt(((lum - lum.mean(axis=(1, 2), keepdims=True)) ** 2).mean(axis=(1, 2)))
    edge_x = np.abs(np.diff(lum, axis=2)).mean(axis=(1, 2))
    edge_y = np.abs(np.diff(lum, axis=1)).mean(axis=(1, 2))
    chroma_map = u.max(axis=1) - u.min(axis=1)
    chroma_edge_x = np.abs(np.diff(chroma_map, axis=2)).mean(axis=(1, 2))
    chroma_edge_y = np.abs(np.diff(chroma_map, axis=1)).mean(axis=(1, 2))
    b, c, h, w = u.shape
    pooled = u.reshape(b, c, 2, h // 2, 2, w // 2).mean(axis=(3, 5)).reshape(b, 12)
    columns = [chroma, std, edge_x, edge_y, chroma_edge_x, chroma_edge_y]
    levels = np.concatenate([means, *(c[:, None] for c in columns), pooled], axis=1)
    levels[:, CENTRED] = 2 * levels[:, CENTRED] - 1
    return np.concatenate([levels, np.ones((b, 1))], axis=1)


def build_graph(
    with_embedding_output: bool = True, seed: int = 0, input_size: int = INPUT_SIZE, slow_layers: int = 0
) -> onnx.ModelProto:
    """The demo tagger as an ONNX model (opset 17), taking input_size square pixels.
    slow_layers: 3x3 convolutions over the whole image whose result is added times zero
    (the same outputs, more work per image): a slower model, for busy-time tests and
    benchmarks."""
    weights, bias = head_weights(seed)
    tags, _ = vocabulary()
    half = input_size // 2
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(LUMA, np.float32).reshape(1, 3, 1, 1), "luma_kernel"),
        numpy_helper.from_array(np.array([1], np.int64), "i1"),
        numpy_helper.from_array(np.array([0], np.int64), "i0"),
        numpy_helper.from_array(np.array([-1], np.int64), "im1"),
        numpy_helper.from_array(np.array([2**62], np.int64), "imax"),
        numpy_helper.from_array(np.array([2], np.int64), "ax2"),
        numpy_helper.from_array(np.array([3], np.int64), "ax3"),
        numpy_helper.from_array(weights, "head.weight"),
        numpy_helper.from_array(bias, "head.bias"),
    ]
    n = helper.make_node
    nodes = [
        n("Add", ["pixel_values", "one"], ["u2"]),
        n("Mul", ["u2", "half"], ["u"]),
        n("ReduceMean", ["u"], ["channel_means"], axes=[2, 3], keepdims=0),
        n("ReduceMax", ["u"], ["cmax"], axes=[1], keepdims=0),
        n("ReduceMin", ["u"], ["cmin"], axes=[1], keepdims=0),
        n("Sub", ["cmax", "cmin"], ["chroma_map"]),
        n("ReduceMean", ["chroma_map"], ["chroma"], axes=[1, 2], keepdims=0),
        n("Conv", ["u", "luma_kernel"], ["lum"]),  # [B,1,H,W]
        n("ReduceMean", ["lum"], ["lum_mean"], axes=[1, 2, 3], keepdims=1),
        n("Sub", ["lum", "lum_mean"], ["lum_centred"]),  # centred first: no float32 cancellation
        n("Mul", ["lum_centred", "lum_centred"], ["lum_sq"]),
        n("ReduceMean", ["lum_sq"], ["lum_var"], axes=[1, 2, 3], keepdims=0),
        n("Sqrt", ["lum_var"], ["lum_std"]),
        n("Slice", ["lum", "i1", "imax", "ax3"], ["lum_right"]),
        n("Slice", ["lum", "i0", "im1", "ax3"], ["lum_left"]),
        n("Sub", ["lum_right", "lum_left"], ["dx"]),
        n("Abs", ["dx"], ["adx"]),
        n("ReduceMean", ["adx"], ["edge_x"], axes=[1, 2, 3], keepdims=0),
        n("Slice", ["lum", "i1", "imax", "ax2"], ["lum_down"]),
        n("Slice", ["lum", "i0", "im1", "ax2"], ["lum_up"]),
        n("Sub", ["lum_down", "lum_up"], ["dy"]),
        n("Abs", ["dy"], ["ady"]),
        n("ReduceMean", ["ady"], ["edge_y"], axes=[1, 2, 3], keepdims=0),
        n("Slice", ["chroma_map", "i1", "imax", "ax2"], ["cm_right"]),
        n("Slice", ["chroma_map", "i0", "im1", "ax2"], ["cm_left"]),
        n("Sub", ["cm_right", "cm_left"], ["cdx"]),
        n("Abs", ["cdx"], ["acdx"]),
        n("ReduceMean", ["acdx"], ["chroma_edge_x"], axes=[1, 2], keepdims=0),
        n("Slice", ["chroma_map", "i1", "imax", "i1"], ["cm_down"]),
        n("Slice", ["chroma_map", "i0", "im1", "i1"], ["cm_up"]),
        n("Sub", ["cm_down", "cm_up"], ["cdy"]),
        n("Abs", ["cdy"], ["acdy"]),
        n("ReduceMean", ["acdy"], ["chroma_edge_y"], axes=[1, 2], keepdims=0),
        n("Unsqueeze", ["chroma_edge_x", "i1"], ["chroma_edge_x_col"]),
        n("Unsqueeze", ["chroma_edge_y", "i1"], ["chroma_edge_y_col"]),
        n("Unsqueeze", ["chroma", "i1"], ["chroma_col"]),
        n("Unsqueeze", ["lum_std", "i1"], ["lum_std_col"]),
        n("Unsqueeze", ["edge_x", "i1"], ["edge_x_col"]),
        n("Unsqueeze", ["edge_y", "i1"], ["edge_y_col"]),
        n("AveragePool", ["u"], ["pool4"], kernel_shape=[half, half], strides=[half, half]),
        n("Flatten", ["pool4"], ["pooled"], axis=1),
        n("Mul", ["channel_means", "two"], ["means2"]),
        n("Sub", ["means2", "one"], ["means_centred"]),
        n("Mul", ["pooled", "two"], ["pooled2"]),
        n("Sub", ["pooled2", "one"], ["pooled_centred"]),
        n("Mul", ["chroma_col", "zero"], ["zero_col"]),
        n("Add", ["zero_col", "one"], ["one_col"]),
        n(
            "Concat",
            [
                "means_centred",
                "chroma_col",
                "lum_std_col",
                "edge_x_col",
                "edge_y_col",
                "chroma_edge_x_col",
                "chroma_edge_y_col",
                "pooled_centred",
                "one_col",
            ],
            ["pooled_features"],
            axis=1,
        ),
        n("MatMul", ["pooled_features", "head.weight"], ["head_out"]),
        n("Add", ["head_out", "head.bias"], ["logits" if not slow_layers else "fast_logits"]),
    ]
    if slow_layers:
        inits.append(numpy_helper.from_array(np.full((3, 3, 3, 3), 1 / 27, np.float32), "slow.weight"))
        nodes += _slow_layers(n, slow_layers)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(tags)])]
    if with_embedding_output:
        nodes.append(n("Identity", ["pooled_features"], ["embedding"]))
        outputs.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBED_DIM]))
    graph = helper.make_graph(
        nodes,
        "tagpipe_demo_tagger",
        [
            helper.make_tensor_value_info(
                "pixel_values", TensorProto.FLOAT, ["batch", 3, input_size, input_size]
            )
        ],
        outputs,
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tagpipe-demo"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _slow_layers(n, layers: int) -> list:
    """Convolutions from `u` to a [B,1] zero added to the logits (ORT does not fold x*0)."""
    names = ["u"] + [f"slow{i}" for i in range(layers)]
    convs = [n("Conv", [a, "slow.weight"], [b], pads=[1, 1, 1, 1]) for a, b in zip(names, names[1:])]
    return convs + [
        n("ReduceMean", [names[-1]], ["slow_means"], axes=[1, 2, 3], keepdims=0),
        n("Unsqueeze", ["slow_means", "i1"], ["slow_mean"]),
        n("Mul", ["slow_mean", "zero"], ["slow_zero"]),
        n("Add", ["fast_logits", "slow_zero"], ["logits"]),
    ]


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Save as model.onnx + model.onnx.data, as CL Tagger v2 ships.

    The weights go in the external file; shape constants stay inline.
    """
    data_name = path.name + ".data"
    (path.parent / data_name).unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    default_permissions(path.parent / data_name)  # onnx writes it 0600


def reference_pixels(count: int, seed: int) -> np.ndarray:
    """In-distribution images (the synthetic kinds, minus noise) at model size, normalised."""
    rng = np.random.default_rng(seed)
    kinds = [k for k in KINDS.values() if k.recipe != "noise"]
    batch = np.empty((count, 3, INPUT_SIZE, INPUT_SIZE), np.float32)
    for i in range(count):
        kind = kinds[i % len(kinds)]
        image = np.asarray(render(kind, INPUT_SIZE, INPUT_SIZE), np.float32)
        jitter = rng.normal(0, 6, size=(1, 1, 3))  # colour jitter: a full-rank covariance
        image = np.clip(image + jitter + rng.normal(0, 2, size=image.shape), 0, 255)
        batch[i] = (image.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return batch


def fit_ood_reference(embeddings: np.ndarray, shrinkage: float = 0.1) -> dict[str, np.ndarray]:
    """mu, cov_inv (shrunk towards a scaled identity), and p50/p95 of the reference's own distances."""
    mu = embeddings.mean(axis=0)
    centred = embeddings - mu
    cov = centred.T @ centred / max(len(embeddings) - 1, 1)
    target = np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    cov_inv = np.linalg.inv((1 - shrinkage) * cov + shrinkage * target)
    distances = np.sqrt(np.einsum("nd,de,ne->n", centred, cov_inv, centred))
    return {
        "mu": mu.astype(np.float32),
        "cov_inv": cov_inv.astype(np.float32),
        "p50": np.float32(np.percentile(distances, 50)),
        "p95": np.float32(np.percentile(distances, 95)),
    }


def write_demo_bundle(
    directory: str | Path,
    seed: int = 0,
    with_embedding_output: bool = True,
    input_size: int = INPUT_SIZE,
    resize_mode: str = "squash",
    name: str = "tagpipe-demo-tagger",
    slow_layers: int = 0,
) -> Path:
    """Write the five CL Tagger v2 files (plus external weights) into directory. Another
    input size or resize mode (`pad_square`, `fit_pad`) is written as the bundle's own
    profile (tagpipe_profile.toml): a second model of another geometry for tests of
    several models in one pass."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tags, categories = vocabulary()
    model = build_graph(
        with_embedding_output=with_embedding_output, seed=seed, input_size=input_size, slow_layers=slow_layers
    )
    if (input_size, resize_mode) != (INPUT_SIZE, "squash"):
        _write_own_profile(directory, input_size, resize_mode)
    save_with_external_data(model, directory / "model.onnx")

    vocab = {
        "tag_to_idx": {t: i for i, t in enumerate(tags)},
        "idx_to_tag": {str(i): t for i, t in enumerate(tags)},
        "tag_to_category": {t: c.capitalize() for t, c in zip(tags, categories)},
        "categories": CATEGORY_NAMES,
    }
    (directory / "model_vocabulary.json").write_text(json.dumps(vocab, indent=1), encoding="utf-8")

    rng = np.random.default_rng(seed + 1)
    gamma = rng.uniform(0.7, 1.5, size=len(tags))
    centres = (np.arange(100) + 0.5) / 100
    table = centres[None, :] ** gamma[:, None]
    table[:, 99] = rng.uniform(0.2, 0.6, size=len(tags))  # the noisy last bin real tables have
    np.savez(
        directory / "model_tag_metrics.npz",
        best_thr=rng.uniform(0.3, 0.7, size=len(tags)).astype(np.float32),
        best_f1=rng.uniform(0.4, 0.9, size=len(tags)).astype(np.float32),
        calibration_table=table.astype(np.float32),
    )

    embeddings = features_numpy(reference_pixels(96, seed + 2))
    np.savez(directory / "model_ood_ref.npz", **fit_ood_reference(embeddings))  # type: ignore[arg-type]

    metadata = {
        "name": name,
        "version": "demo-1",
        "architecture": "pooled pixel statistics + linear head (demo)",
        "num_tags": len(tags),
        "embedding_dim": EMBED_DIM,
        "input_size": input_size,
        "features": EMBEDDING_FEATURES,
        "note": "built in-process by tagpipe model demo; tags are checkable from pixel statistics",
    }
    (directory / "model_metadata.json").write_text(json.dumps(metadata, indent=1), encoding="utf-8")
    return directory


def _write_own_profile(directory: Path, input_size: int, resize_mode: str) -> None:
    """CL Tagger v2's shipped profile at another input size or resize mode."""
    from importlib import resources

    from pipeline.model.bundle import BUNDLE_PROFILE_FILE
    from pipeline.model.profiles import load_profile

    text = (resources.files("pipeline.model") / "profiles" / "cl_tagger_v2.toml").read_text(encoding="utf-8")
    text = text.replace('name = "cl_tagger_v2"', f'name = "demo_{resize_mode}_{input_size}"')
    text = text.replace("input_size = 384", f"input_size = {input_size}")
    text = text.replace('resize_mode = "squash"', f'resize_mode = "{resize_mode}"')
    (directory / BUNDLE_PROFILE_FILE).write_text(text, encoding="utf-8")
    load_profile(directory / BUNDLE_PROFILE_FILE)  # a profile that does not load fails here


class DemoBundleSettings(SettingsModel):
    """What `tagpipe model demo` takes (its argument comes from this field)."""

    directory: Annotated[
        Path,
        Field(description="where to write the demo bundle (a new folder)"),
        Setting(KeyRole.NONE, argument=True, metavar="DIR"),
    ]
