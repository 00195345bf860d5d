"""Tiny ONNX taggers with each family's input/output contract, built in-process; and the
tagpipe command run in-process (run_cli)."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_tagger(
    path: Path,
    *,
    size: int,
    nhwc: bool,
    tags: int,
    activation: str | None,
    batch: int | str = "batch",
    seed: int = 0,
) -> Path:
    """Global average pool -> Gemm head (-> optional Sigmoid). Input float [B,3,S,S] or [B,S,S,3]."""
    rng = np.random.default_rng(seed)
    shape = [batch, size, size, 3] if nhwc else [batch, 3, size, size]
    axes = [1, 2] if nhwc else [2, 3]
    inits = [
        numpy_helper.from_array(rng.normal(size=(3, tags)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=tags).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["pooled"], axes=axes, keepdims=0),
        helper.make_node("Gemm", ["pooled", "w", "b"], ["head" if activation else "output"]),
    ]
    if activation:
        nodes.append(helper.make_node(activation, ["head"], ["output"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, tags])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def wd_bundle(directory: Path, tags: int = 12, vocab_size: int | None = None) -> Path:
    """WD v3 layout: model.onnx (NHWC, fixed batch 1, probabilities) + selected_tags.csv."""
    tiny_tagger(directory / "model.onnx", size=448, nhwc=True, tags=tags, activation="Sigmoid", batch=1)
    categories = [9, 9, 9, 9] + [4, 4] + [0] * (tags - 6)
    with (directory / "selected_tags.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i in range(vocab_size or tags):
            writer.writerow([1000 + i, f"tag_{i}", categories[i % tags], 100 - i])
    return directory


def joytag_bundle(directory: Path, tags: int = 10) -> Path:
    tiny_tagger(directory / "model.onnx", size=448, nhwc=False, tags=tags, activation=None)
    (directory / "top_tags.txt").write_text("\n".join(f"joy_{i}" for i in range(tags)) + "\n")
    return directory


def jtp_bundle(directory: Path, tags: int = 9) -> Path:
    tiny_tagger(directory / "jtp_pilot.onnx", size=384, nhwc=False, tags=tags, activation=None)
    (directory / "tags.json").write_text(json.dumps({f"e6_{i}": i for i in range(tags)}))
    return directory


def identity_model(
    path: Path, pre, *, elem_type: int = TensorProto.FLOAT, batch: int | str = "batch"
) -> Path:
    """A model whose output is its pixel input, in the profile's layout: shows exactly what
    a real model of that family would be fed."""
    nhwc = pre.layout.value == "NHWC"
    shape = [batch, pre.height, pre.width, 3] if nhwc else [batch, 3, pre.height, pre.width]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", elem_type, shape)],
        [helper.make_tensor_value_info("output", elem_type, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def feed_through_graph(model_path: Path, pre, pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> the float tensor the model receives, via the in-graph normalisation."""
    from pipeline.model.onnx_tools import uint8_input_model
    from pipeline.model.runtime import ProviderChoice, create_session

    graph, name = uint8_input_model(model_path, pre, "input")
    session, _ = create_session(graph, ProviderChoice.CPU, 1)
    return session.run(None, {name: pixels})[0]


@dataclass(frozen=True)
class CliRun:
    """What a command run left: named as subprocess.CompletedProcess names it, so a test
    reads the same whether the command ran in a process of its own or in this one."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> CliRun:
    """`tagpipe ARGS` in this process, through the same main() as `python -m pipeline.cli`
    (one-line errors, exit statuses), for tests where the process itself is not under
    test: a fresh interpreter and a cold Ray cost seconds each.

    It joins the test session's Ray when one runs (the `ray_session` fixture), and shuts
    down a Ray the command started itself, so no later ray.init finds one running. The
    logging the command configured (handlers on the captured stderr) and the environment
    it set (logs.configure's RAY_COLOR_PREFIX) are put back as they were. Not for what
    only a process shows: Ray's start-up lines, worker output (log_to_driver is off),
    signals, a terminal, edit calibration (tests/conftest.py).
    env: variables set for the run's duration only."""
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.core import logs

    root, package = logging.getLogger(), logging.getLogger("pipeline")
    handlers, root_level, package_level = root.handlers[:], root.level, package.level
    state, argv, environ, ray_before = dict(logs._state), sys.argv, dict(os.environ), _ray_running()
    code = 0
    with CliRunner().isolation(env=env) as (stdout, stderr, _):
        sys.argv = ["tagpipe", *map(str, args)]
        try:
            main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        finally:
            sys.argv = argv
            root.handlers[:] = handlers
            root.setLevel(root_level)
            package.setLevel(package_level)
            logs._state.update(state)
            os.environ.clear()
            os.environ.update(environ)
            sys.stdout.flush()
            sys.stderr.flush()
            out, err = stdout.getvalue().decode(), stderr.getvalue().decode()
    if not ray_before and _ray_running():
        import ray

        ray.shutdown()
    return CliRun(code, out, err)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()
