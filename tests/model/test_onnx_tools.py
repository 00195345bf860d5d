import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from pipeline.core.errors import BundleError
from pipeline.demo.model import (
    build_graph,
    features_numpy,
    reference_pixels,
    save_with_external_data,
    write_demo_bundle,
)
from pipeline.model.bundle import load_bundle
from pipeline.model.onnx_tools import expose_embedding, uint8_input_model
from pipeline.model.profiles import load_profile
from pipeline.model.runtime import ProviderChoice, create_session
from pipeline.model.session_runner import Normaliser
from tests.helpers import identity_model, tiny_tagger, wd_bundle


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
    assert embedding.shape == (4, 22)
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


def test_expose_embedding_on_a_bare_folder_or_with_a_profile_and_inspect_sees_it(tmp_path):
    """A folder with only a model: its .onnx and first output. A WD model's exposed
    embedding is used although the wd_v3 profile names none, and inspect says so."""

    from pipeline.model.describe import describe_bundle

    bare = tmp_path / "bare"
    tiny_tagger(bare / "only.onnx", size=32, nhwc=False, tags=4, activation="Sigmoid")
    out = expose_embedding(bare, tmp_path / "bare_out")
    assert out.name == "only.onnx" and "embedding" in [o.name for o in onnx.load(str(out)).graph.output]
    wd = wd_bundle(tmp_path / "wd")
    (wd / "selected_tags.csv").rename(wd / "tags.csv")  # no longer recognisable: the profile must be given
    with pytest.raises(BundleError, match="--profile"):
        (wd / "extra.onnx").write_bytes((wd / "model.onnx").read_bytes())
        expose_embedding(wd, tmp_path / "nowhere")
    (wd / "extra.onnx").unlink()
    (wd / "tags.csv").rename(wd / "selected_tags.csv")
    expose_embedding(wd, tmp_path / "wd_out", profile="wd_v3")
    bundle = load_bundle(tmp_path / "wd_out")
    assert bundle.profile.embedding_name is None and bundle.embedding_output == "embedding"
    assert "embedding output: yes (embedding)" in describe_bundle(tmp_path / "wd_out")
    assert "embedding output: no" in describe_bundle(wd)


@pytest.mark.parametrize("profile_name", ["wd_v3", "cl_tagger_v2", "joytag", "jtp1"])
@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_uint8_input_graph_normalises_like_the_profile(profile_name, elem_type, tmp_path):
    """The prepended Cast/scale nodes feed the model exactly what numpy normalisation would."""
    pre = load_profile(profile_name).preprocess
    model = identity_model(
        tmp_path / "m.onnx", pre, elem_type=elem_type, batch=2 if profile_name == "wd_v3" else "batch"
    )
    pixels = np.random.default_rng(0).integers(0, 256, (2, pre.height, pre.width, 3), dtype=np.uint8)
    graph, name = uint8_input_model(model, pre, "input")
    session, _ = create_session(graph, ProviderChoice.CPU, 1)
    (info,) = session.get_inputs()
    assert info.name == name and info.type == "tensor(uint8)" and info.shape[1:] == [pre.height, pre.width, 3]
    got = session.run(None, {name: pixels})[0]
    want = Normaliser(pre)(pixels)
    assert got.dtype == (np.float16 if elem_type == TensorProto.FLOAT16 else np.float32)
    np.testing.assert_allclose(
        got.astype(np.float32),
        want,
        rtol=1e-3 if elem_type == TensorProto.FLOAT16 else 1e-6,
        atol=1e-3 if elem_type == TensorProto.FLOAT16 else 1e-5,
    )


def test_tagger_gives_the_same_tags_with_numpy_or_in_graph_normalisation(demo_bundle, demo_corpus):
    """The demo bundle keeps its weights in external data: the in-graph model must find them."""
    from pipeline.image.decode import DecodeStage
    from pipeline.model.tagger import TaggerSettings, TaggerStage

    uris = sorted(str(p) for p in (demo_corpus / "images").rglob("*.jpg"))[:12]
    stage_in = TaggerStage(TaggerSettings(str(demo_bundle), provider=ProviderChoice.CPU))
    batch = DecodeStage(stage_in.bundle.profile.preprocess)({"uri": np.array(uris, object)})
    stage_np = TaggerStage(
        TaggerSettings(str(demo_bundle), provider=ProviderChoice.CPU, normalise_in_graph=False)
    )
    assert stage_in.normalise is None and stage_np.normalise is not None
    a, b = stage_in(batch).to_pydict(), stage_np(batch).to_pydict()
    assert a["tags"] == b["tags"] and any(a["tags"])
    np.testing.assert_allclose(
        np.asarray(a["ood_distance"], float), np.asarray(b["ood_distance"], float), rtol=1e-4
    )


def test_expose_embedding_is_atomic_and_readable_by_others(tmp_path):
    """A failure leaves nothing; an existing destination is refused; files are 0644
    (ONNX writes external data 0600, which a container's other user cannot read)."""
    import os
    import stat

    from pipeline.core.errors import BundleError, TagpipeError

    with_embedding = write_demo_bundle(tmp_path / "has_embedding")
    with pytest.raises(BundleError, match="already has an 'embedding' output"):
        expose_embedding(with_embedding, tmp_path / "out" / "bundle")
    assert not (tmp_path / "out" / "bundle").exists() and not [p for p in (tmp_path / "out").iterdir()]

    plain = write_demo_bundle(tmp_path / "plain", with_embedding_output=False)
    os.umask(0o022)
    made = expose_embedding(plain, tmp_path / "out" / "bundle")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in made.parent.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("x")
    with pytest.raises(TagpipeError, match="already exists"):
        expose_embedding(plain, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
