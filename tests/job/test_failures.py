"""Failures are data: transient storage errors are retried with backoff, permanent ones
are not; a model that rejects a batch costs only the rows it rejects."""

from __future__ import annotations

import fsspec
import numpy as np
import onnx
from fsspec.implementations.memory import MemoryFileSystem
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from pipeline.demo.synthetic import encode
from pipeline.image.decode import DecodeStage
from pipeline.model.profiles import load_profile
from pipeline.model.runtime import ProviderChoice
from pipeline.storage.filesystem import is_transient


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
    uris = [
        "flaky:///bucket/ok.png",
        "flaky:///bucket/flaky.png",
        "flaky:///bucket/dead.png",
        "flaky:///bucket/missing.png",
    ]
    out = DecodeStage(load_profile("cl_tagger_v2").preprocess)({"uri": np.array(uris, object)})
    assert list(out["error_kind"]) == [None, None, "read_error", "not_found"]
    assert FlakyFileSystem.calls == {
        "/bucket/ok.png": 1,
        "/bucket/flaky.png": 3,
        "/bucket/dead.png": 5,
        "/bucket/missing.png": 1,
    }
    assert "connection reset" in out["error"][2]


def test_transient_error_classification():
    assert is_transient(ConnectionError("reset")) and is_transient(TimeoutError())
    assert is_transient(OSError("An error occurred (SlowDown) when calling the GetObject operation"))
    assert is_transient(OSError("503 Service Unavailable"))
    # what a dropped connection looks like through s3fs (tests/faults.py drops them)
    assert is_transient(
        OSError("An HTTP Client raised an unhandled exception: 400, message='Bad status line:\n  '")
    )
    assert is_transient(OSError("Server disconnected")) and is_transient(OSError("Connection closed by peer"))
    assert not is_transient(FileNotFoundError("nope")) and not is_transient(PermissionError("denied"))
    assert not is_transient(ValueError("bad request"))


def _joytag_contract_bundle(directory, name: str, nodes: list, inits: list, size: int = 448, tags: int = 10):
    """A JoyTag-layout bundle (model.onnx + top_tags.txt) around a graph from `input`
    [B,3,size,size] to `output` [B,tags]."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", tags])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir()
    onnx.save(model, str(directory / "model.onnx"))
    (directory / "top_tags.txt").write_text("\n".join(f"t{i}" for i in range(tags)) + "\n")
    return directory


def _picky_bundle(directory, tags: int = 10):
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
    return _joytag_contract_bundle(directory, "picky", nodes, inits, tags=tags)


def test_a_batch_the_model_rejects_costs_only_the_rejected_rows(tmp_path):
    from pipeline.model.tagger import TaggerSettings, TaggerStage

    bundle = _picky_bundle(tmp_path / "picky")
    images = {
        "grey.png": (120, 120, 120),
        "white.png": (255, 255, 255),
        "blue.png": (20, 40, 160),
        "broken.png": None,
    }
    for name, colour in images.items():
        (tmp_path / name).write_bytes(
            encode(Image.new("RGB", (300, 300), colour), "PNG") if colour else b"junk"
        )
    uris = np.array([str(tmp_path / n) for n in images], object)
    stage = TaggerStage(TaggerSettings(str(bundle), provider=ProviderChoice.CPU))
    table = stage(DecodeStage(stage.bundle.profile.preprocess)({"uri": uris})).to_pydict()
    assert table["error_kind"] == [None, "model_error", None, "not_an_image"]
    assert "Gather" in table["error"][1] or "indices" in table["error"][1].lower()
    assert table["tags"][0] is not None and table["tags"][2] is not None and table["tags"][1] is None
    assert table["phash_hex"][1] is not None  # the decode facts of a rejected row are kept


def _slow_bundle(directory, layers: int, size: int = 448, tags: int = 10):
    """A JoyTag-contract tagger that takes a while: `layers` chained 448x448 MatMuls over
    the image rows before the head."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.normal(size=(size, size)) / size).astype(np.float32), "m"),
        numpy_helper.from_array(rng.normal(size=(3, tags)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(tags, np.float32), "b"),
    ]
    n = helper.make_node
    nodes, x = [], "input"
    for i in range(layers):
        nodes.append(n("MatMul", [x, "m"], [f"h{i}"]))
        x = f"h{i}"
    nodes += [
        n("ReduceMean", [x], ["pooled"], axes=[2, 3], keepdims=0),
        n("Gemm", ["pooled", "w", "b"], ["output"]),
    ]
    return _joytag_contract_bundle(directory, "slow", nodes, inits, size, tags)


def test_a_model_call_past_its_time_limit_becomes_retryable_error_rows(tmp_path):
    import time

    from pipeline.job.incremental import RETRY_ERROR_KINDS
    from pipeline.model.tagger import TaggerSettings, TaggerStage

    bundle = _slow_bundle(tmp_path / "slow", layers=60)
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(encode(Image.new("RGB", (64, 64), (40 * i, 90, 200)), "PNG"))
    uris = np.array([str(tmp_path / f"{i}.png") for i in range(4)], object)
    decoded = DecodeStage(load_profile("joytag").preprocess)({"uri": uris})

    untimed = TaggerStage(TaggerSettings(str(bundle), provider=ProviderChoice.CPU, intra_op_threads=1))
    started = time.monotonic()
    assert untimed(decoded).column("error_kind").null_count == 4  # without a limit it finishes...
    full = time.monotonic() - started
    limited = TaggerStage(
        TaggerSettings(str(bundle), provider=ProviderChoice.CPU, intra_op_threads=1, batch_timeout=full / 10)
    )
    started = time.monotonic()
    table = limited(decoded).to_pydict()
    assert time.monotonic() - started < full * 0.6  # ...with one, it stops early
    assert table["error_kind"] == ["model_timeout"] * 4 and "limit" in table["error"][0]
    assert table["tags"] == [None] * 4 and all(h is not None for h in table["phash_hex"])
    assert "model_timeout" in RETRY_ERROR_KINDS  # the next run tries them again


def _slow_png(size: int = 6000) -> bytes:
    """Slow to decode (36 MP), small to read and hash (a gradient compresses well)."""
    ramp = (np.add.outer(np.arange(size), np.arange(size)) % 256).astype(np.uint8)
    return encode(Image.fromarray(np.stack([ramp, ramp.T, ramp], axis=-1)), "PNG")


def test_an_image_past_the_decode_time_limit_becomes_an_error_row(tmp_path):
    import time

    (tmp_path / "slow.png").write_bytes(_slow_png())
    (tmp_path / "quick.png").write_bytes(encode(Image.new("RGB", (64, 64), (200, 10, 10)), "PNG"))
    uris = np.array([str(tmp_path / "slow.png"), str(tmp_path / "quick.png")], object)
    pre = load_profile("joytag").preprocess
    started = time.monotonic()
    unlimited = DecodeStage(pre, timeout=0)({"uri": uris})
    full = time.monotonic() - started
    assert list(unlimited["error_kind"]) == [None, None]  # it does decode, given time
    # Pillow decodes in 64 KiB input chunks, each one C call: the limit is checked
    # between them, so an image stops within a chunk's work of its limit, not exactly
    limited = DecodeStage(pre, timeout=full / 10)({"uri": uris})
    assert list(limited["error_kind"]) == ["decode_timeout", None] and "limit" in limited["error"][0]
    assert limited["sha256"][0] == unlimited["sha256"][0]  # the bytes' facts are kept
    assert np.array_equal(limited["pixels"][1], unlimited["pixels"][1])


def test_decode_time_limit_holds_inside_ray_tasks(ray_session, tmp_path):
    """Ray runs a task on its worker's main thread, where the SIGALRM limit works."""
    import ray.data

    from pipeline.image.imaging import DecodeOptions
    from pipeline.job.graph import decode_batch

    (tmp_path / "slow.png").write_bytes(_slow_png())
    ds = ray.data.from_items([{"uri": str(tmp_path / "slow.png")}])
    rows = ds.map_batches(
        decode_batch,
        fn_kwargs=dict(
            preprocess=load_profile("joytag").preprocess,
            options=DecodeOptions(),
            storage_options={},
            timeout=0.01,
            max_file_bytes=10**9,
        ),
        batch_format="numpy",
    ).take_all()
    assert [r["error_kind"] for r in rows] == ["decode_timeout"]


def test_a_huge_non_image_file_is_read_only_up_to_the_limit(tmp_path):
    """A 100 MB file of junk: under the default limit it is read once and refused as
    not an image (memory about its size, not a multiple); under a 10 MB limit only
    10 MB of it is ever read."""
    import subprocess
    import sys

    junk = tmp_path / "huge.jpg"
    with junk.open("wb") as handle:
        for _ in range(100):
            handle.write(np.random.default_rng(1).bytes(1 << 20))
    probe = (
        "import sys, tracemalloc, numpy as np\n"
        "from pipeline.image.decode import DecodeStage\nfrom pipeline.model.profiles import load_profile\n"
        "tracemalloc.start()\n"
        "out = DecodeStage(load_profile('joytag').preprocess, max_file_bytes=int(sys.argv[2]))"
        "({'uri': np.array([sys.argv[1]], object)})\n"
        "print(out['error_kind'][0], tracemalloc.get_traced_memory()[1])\n"
    )
    for limit, kind, most in (
        (512 * 2**20, "not_an_image", 250 * 2**20),
        (10 * 2**20, "too_large", 25 * 2**20),
    ):
        done = subprocess.run(
            [sys.executable, "-c", probe, str(junk), str(limit)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        got_kind, peak = done.stdout.split()
        assert got_kind == kind and int(peak) < most, (limit, got_kind, int(peak) / 2**20)
