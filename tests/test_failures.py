"""Failures are data: transient storage errors are retried with backoff, permanent ones
are not; a model that rejects a batch costs only the rows it rejects."""

from __future__ import annotations

import fsspec
import numpy as np
import onnx
from fsspec.implementations.memory import MemoryFileSystem
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from pipeline.decode import DecodeStage
from pipeline.profiles import load_profile
from pipeline.runtime import ProviderChoice
from pipeline.storage import is_transient
from pipeline.synthetic import encode


class FlakyFileSystem(MemoryFileSystem):
    """In-memory store whose reads fail with a connection error the first N times per path."""

    protocol = "flaky"
    failures: dict[str, int] = {}
    calls: dict[str, int] = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://"))

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        FlakyFileSystem.calls[path] = FlakyFileSystem.calls.get(path, 0) + 1
        if FlakyFileSystem.failures.get(path, 0) > 0:
            FlakyFileSystem.failures[path] -= 1
            raise ConnectionError(f"connection reset by peer reading {path}")
        return super().cat_file(path, start, end, **kwargs)


def test_transient_read_errors_are_retried_and_permanent_ones_are_not():
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    fs = fsspec.filesystem("flaky")
    data = encode(Image.new("RGB", (64, 48), (200, 30, 30)), "PNG")
    fs.pipe("/bucket/ok.png", data)
    fs.pipe("/bucket/flaky.png", data)
    fs.pipe("/bucket/dead.png", data)
    FlakyFileSystem.failures.update({"/bucket/flaky.png": 2, "/bucket/dead.png": 99})
    FlakyFileSystem.calls.clear()
    uris = ["flaky:///bucket/ok.png", "flaky:///bucket/flaky.png", "flaky:///bucket/dead.png", "flaky:///bucket/missing.png"]
    out = DecodeStage(load_profile("cl_tagger_v2").preprocess)({"uri": np.array(uris, object)})
    assert list(out["error_kind"]) == [None, None, "read_error", "not_found"]
    assert FlakyFileSystem.calls == {"/bucket/ok.png": 1, "/bucket/flaky.png": 3, "/bucket/dead.png": 5, "/bucket/missing.png": 1}
    assert "connection reset" in out["error"][2]


def test_transient_error_classification():
    assert is_transient(ConnectionError("reset")) and is_transient(TimeoutError())
    assert is_transient(OSError("An error occurred (SlowDown) when calling the GetObject operation"))
    assert is_transient(OSError("503 Service Unavailable"))
    # what a dropped connection looks like through s3fs (tests/faults.py drops them)
    assert is_transient(OSError("An HTTP Client raised an unhandled exception: 400, message='Bad status line:\n  '"))
    assert is_transient(OSError("Server disconnected")) and is_transient(OSError("Connection closed by peer"))
    assert not is_transient(FileNotFoundError("nope")) and not is_transient(PermissionError("denied"))
    assert not is_transient(ValueError("bad request"))


def _picky_model(path, size: int = 448, tags: int = 10):
    """A JoyTag-contract tagger that fails at run time on any batch holding a pure-white
    pixel: ReduceMax of the input picks an index into a 9-long table (white -> 9)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(3, tags)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(tags, np.float32), "b"),
        numpy_helper.from_array(np.zeros(9, np.float32), "table"),
        numpy_helper.from_array(np.array(4.5, np.float32), "scale"),
        numpy_helper.from_array(np.array(4.5, np.float32), "shift"),
    ]
    n = helper.make_node
    nodes = [
        n("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
        n("Gemm", ["pooled", "w", "b"], ["head"]),
        n("ReduceMax", ["input"], ["peak"], keepdims=0),  # the profile maps 255 to 1.0 (CLIP stats: >1)
        n("Clip", ["peak"], ["peak_clipped"]),
        n("Mul", ["peak_clipped", "scale"], ["peak_scaled"]),
        n("Add", ["peak_scaled", "shift"], ["peak_shifted"]),
        n("Floor", ["peak_shifted"], ["peak_floor"]),
        n("Cast", ["peak_floor"], ["index"], to=TensorProto.INT64),
        n("Gather", ["table", "index"], ["zero"]),  # out of bounds (index >= 9) -> runtime error
        n("Add", ["head", "zero"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "picky",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", tags])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_a_batch_the_model_rejects_costs_only_the_rejected_rows(tmp_path):
    from pipeline.tagger import TaggerSettings, TaggerStage

    bundle = tmp_path / "picky"
    bundle.mkdir()
    _picky_model(bundle / "model.onnx")
    (bundle / "top_tags.txt").write_text("\n".join(f"t{i}" for i in range(10)) + "\n")
    images = {"grey.png": (120, 120, 120), "white.png": (255, 255, 255), "blue.png": (20, 40, 160), "broken.png": None}
    for name, colour in images.items():
        (tmp_path / name).write_bytes(encode(Image.new("RGB", (300, 300), colour), "PNG") if colour else b"junk")
    uris = np.array([str(tmp_path / n) for n in images], object)
    stage = TaggerStage(TaggerSettings(str(bundle), provider=ProviderChoice.CPU))
    table = stage(DecodeStage(stage.bundle.profile.preprocess)({"uri": uris})).to_pydict()
    assert table["error_kind"] == [None, "model_error", None, "not_an_image"]
    assert "Gather" in table["error"][1] or "indices" in table["error"][1].lower()
    assert table["tags"][0] is not None and table["tags"][2] is not None and table["tags"][1] is None
    assert table["phash_hex"][1] is not None  # the decode facts of a rejected row are kept
