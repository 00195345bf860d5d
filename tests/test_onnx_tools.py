import numpy as np
import onnxruntime as ort
import pytest

from pipeline.bundle import load_bundle
from pipeline.demo_model import build_graph, features_numpy, reference_pixels, save_with_external_data, write_demo_bundle
from pipeline.errors import BundleError
from pipeline.onnx_tools import expose_embedding


def test_exposed_embedding_equals_the_heads_input(tmp_path):
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    save_with_external_data(build_graph(with_embedding_output=False), src)
    assert [o.name for o in ort.InferenceSession(str(src)).get_outputs()] == ["logits"]
    dst = expose_embedding(src, tmp_path / "dst" / "model.onnx")
    assert (dst.parent / "model.onnx.data").is_file()  # weights stay external
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    x = reference_pixels(4, seed=5)
    logits, embedding = session.run(["logits", "embedding"], {"pixel_values": x})
    assert embedding.shape == (4, 21)
    np.testing.assert_allclose(embedding, features_numpy(x), atol=2e-3)  # independent numpy oracle
    original = ort.InferenceSession(str(src)).run(["logits"], {"pixel_values": x})[0]
    np.testing.assert_allclose(logits, original, rtol=1e-6)


def test_expose_embedding_on_a_bundle_directory(tmp_path):
    src = write_demo_bundle(tmp_path / "bundle", with_embedding_output=False)
    assert not load_bundle(src).has_embedding_output
    expose_embedding(src, tmp_path / "with_embedding")
    bundle = load_bundle(tmp_path / "with_embedding")
    assert bundle.has_embedding_output and bundle.ood_reference is not None
    with pytest.raises(BundleError, match="already has"):
        expose_embedding(tmp_path / "with_embedding", tmp_path / "again")
