"""Each output_activation keeps its meaning, checked against the model's own outputs.

Small classifiers built here end in a Softmax, a Sigmoid or nothing (logits); each is
run through the real tagger stage on real photos and, separately, through a plain
ONNX Runtime session. A row's probability is read the way the README says (sigmoid
of the stored value for independent tags, exp for a softmax group) and must equal the
independent calculation to float16; tags must follow the documented rule.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from pipeline.image.decode import DecodeStage
from pipeline.model.profiles import Activation
from pipeline.model.rules import RuleSettings
from pipeline.model.runtime import ProviderChoice
from pipeline.model.session_runner import Normaliser
from pipeline.model.tagger import TaggerSettings, TaggerStage
from tests.helpers import tiny_tagger
from tests.sample_photos import photo_paths

CLASSES = 5
CASES = {  # activation -> (the graph's last op, how the model's raw output becomes probabilities)
    "softmax_probabilities": ("Softmax", lambda z: z),
    "sigmoid_probabilities": ("Sigmoid", lambda z: z),
    "softmax": (
        None,
        lambda z: (
            np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
        ),
    ),
    "sigmoid": (None, lambda z: 1 / (1 + np.exp(-z))),
}


def _bundle(folder, activation: str):
    op, _ = CASES[activation]
    tiny_tagger(folder / "model.onnx", size=64, nhwc=True, tags=CLASSES, activation=op, seed=4)
    (folder / "classes.txt").write_text("\n".join(f"class_{i}" for i in range(CLASSES)) + "\n")
    (folder / "tagpipe_profile.toml").write_text(
        'name = "tiny"\n[files]\nvocabulary = "classes.txt"\nvocabulary_format = "lines"\n[preprocess]\n'
        'input_size = 64\nresize_size = 73\nresize_mode = "resize_crop"\nrounding = "timm"\n'
        'interpolation = "bilinear"\nvalue_range = "0-255"\nmean = [104, 117, 123]\nmean_std_order = "BGR"\n'
        f'channel_order = "BGR"\nlayout = "NHWC"\n[model]\noutput_activation = "{activation}"\n'
        "[thresholds]\ndefault = 0.3\n"
    )
    return folder


def _photos_batch(stage: TaggerStage):
    uris = np.array([str(p) for p in photo_paths()][:12], object)
    return DecodeStage(stage.bundle.profile.preprocess)({"uri": uris})


def _row_probabilities(row_values, activation: Activation) -> np.ndarray:
    values = np.asarray(row_values, np.float32)
    with np.errstate(over="ignore"):
        return np.exp(values) if activation.is_group else 1 / (1 + np.exp(-values))


@pytest.mark.parametrize("activation", sorted(CASES))
def test_stored_probabilities_equal_the_models_own(tmp_path, activation):
    stage = TaggerStage(
        TaggerSettings(str(_bundle(tmp_path, activation)), provider=ProviderChoice.CPU, dense_logits=True)
    )
    batch = _photos_batch(stage)
    rows = stage(batch).to_pydict()
    # independently: a plain session on the numpy-normalised pixels, then the activation's definition
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = Normaliser(stage.bundle.profile.preprocess)(np.asarray(batch["pixels"]))
    want = CASES[activation][1](session.run(None, {"input": x})[0].astype(np.float64))
    kind = Activation(activation)
    got = np.stack([_row_probabilities(v, kind) for v in rows["logit_values"]])
    assert all(list(i) == list(range(CLASSES)) for i in rows["logit_indices"])
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)  # float16 storage
    assert want.std() > 0.01  # the photos give the classes different probabilities
    if kind.is_group:
        np.testing.assert_allclose(got.sum(1), 1.0, atol=5e-3)
    for i, tags in enumerate(rows["tags"]):  # the documented rule: probability >= threshold, by score
        expected = [f"class_{j}" for j in np.argsort(-got[i], kind="stable") if got[i, j] >= 0.3]
        assert tags == expected


def test_argmax_of_a_softmax_group(tmp_path):
    """threshold 0, logit floor 0 and max_tags 1 give each image its most probable class."""
    folder = _bundle(tmp_path, "softmax_probabilities")
    stage = TaggerStage(
        TaggerSettings(
            str(folder),
            provider=ProviderChoice.CPU,
            rules=RuleSettings(threshold=0.0, logit_floor=0.0, max_tags=1),
        )
    )
    batch = _photos_batch(stage)
    rows = stage(batch).to_pydict()
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    p = session.run(
        None, {"input": Normaliser(stage.bundle.profile.preprocess)(np.asarray(batch["pixels"]))}
    )[0]
    assert rows["tags"] == [[f"class_{int(np.argmax(r))}"] for r in p]
    assert len({t[0] for t in rows["tags"]}) > 1  # not one class for every photo


def test_sigmoid_on_probabilities_would_be_caught(tmp_path):
    """The mistake the issue names: reading softmax probabilities as sigmoid logits puts
    every probability at 0.5 or more, so every class becomes a tag."""
    folder = _bundle(tmp_path, "softmax_probabilities")
    text = (folder / "tagpipe_profile.toml").read_text().replace("softmax_probabilities", "sigmoid")
    (folder / "tagpipe_profile.toml").write_text(text)
    stage = TaggerStage(TaggerSettings(str(folder), provider=ProviderChoice.CPU))
    rows = stage(_photos_batch(stage)).to_pydict()
    assert all(len(tags) == CLASSES for tags in rows["tags"])


def test_old_none_still_reads_as_sigmoid_probabilities(tmp_path):
    folder = _bundle(tmp_path, "sigmoid_probabilities")
    text = (folder / "tagpipe_profile.toml").read_text().replace('"sigmoid_probabilities"', '"none"')
    (folder / "tagpipe_profile.toml").write_text(text)
    stage = TaggerStage(TaggerSettings(str(folder), provider=ProviderChoice.CPU))
    assert stage.bundle.profile.activation is Activation.SIGMOID_PROBABILITIES
