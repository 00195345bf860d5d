"""ONNX graph edits: expose the pooled embedding that feeds the classification head.

CL Tagger v2's ONNX outputs only logits, but its OOD reference is over the pooled
vector the head consumes. We walk back from the logits output through activations and
reshapes to the head (Gemm, or MatMul + bias Add) and add its input as a graph output
named `embedding`. External-data models (weights in model.onnx.data) stay external.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import onnx
from onnx import helper
from pydantic import Field

from pipeline.core.errors import BundleError, ConfigError
from pipeline.core.settings import KeyRole, Setting, SettingsModel
from pipeline.model.bundle import EMBEDDING_OUTPUT, detect_profile
from pipeline.model.profiles import load_profile
from pipeline.storage.filesystem import staged_folder

PASS_THROUGH_OPS = {"Sigmoid", "Softmax", "Identity", "Reshape", "Flatten", "Cast", "Squeeze", "Unsqueeze"}
TWO_GB = 2**31


def find_head_input(model: onnx.ModelProto, logits_name: str) -> tuple[str, int | None]:
    """(tensor feeding the head, its width if known) for the head producing logits_name."""
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name: t for t in model.graph.initializer}
    name = logits_name
    for _ in range(64):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type in PASS_THROUGH_OPS:
            name = node.input[0]
            continue
        if node.op_type == "Add":  # bias: follow the non-constant side
            side = [i for i in node.input if i not in initializers]
            if len(side) != 1:
                break
            name = side[0]
            continue
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            weight = initializers.get(node.input[1])
            width = None if weight is None else int(weight.dims[1] if trans_b else weight.dims[0])
            return node.input[0], width
        if node.op_type == "MatMul":
            data = [i for i in node.input if i not in initializers]
            if len(data) == 1 and node.input[1] in initializers:
                weight = initializers[node.input[1]]
                return data[0], int(weight.dims[0])
        break
    raise BundleError(
        f"cannot find a linear classification head behind {logits_name!r} "
        "(expected Gemm or MatMul(+Add) before any activation); name the tensor with --tensor"
    )


def expose_embedding(
    src: str | Path,
    dst: str | Path,
    tensor: str | None = None,
    logits_name: str | None = None,
    profile: str | None = None,
) -> Path:
    """Write a copy of a model (or a whole bundle directory) with an `embedding` output.

    A folder's model and logits output come from the profile given, else the one it
    would be tagged with, else (a bare folder) its only .onnx file and first output.
    Everything is built under a temporary name and moved into place at the end, so a
    failure leaves nothing behind; an existing destination is refused, never replaced."""
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        model_src, profile_logits = _folder_model(src, profile)
        logits_name = logits_name or profile_logits
        with staged_folder(dst) as staging:
            _copy_side_files(src, model_src, staging)
            _write_with_embedding(model_src, staging / model_src.name, tensor, logits_name)
        return dst / model_src.name
    model_dst = dst / src.name if dst.is_dir() else dst
    if model_dst.resolve() == src.resolve():
        raise BundleError("expose-embedding: the destination must differ from the source")
    if model_dst.exists() or Path(f"{model_dst}.data").exists():
        raise BundleError(f"{model_dst} already exists: write to a new path")
    with staged_folder(model_dst.parent / f".{model_dst.name}.build") as staging:
        _write_with_embedding(src, staging / model_dst.name, tensor, logits_name)
    built = model_dst.parent / f".{model_dst.name}.build"
    try:  # the weights first, then the graph that names them
        for name in sorted((p.name for p in built.iterdir()), key=lambda n: n.endswith(".onnx")):
            (built / name).rename(model_dst.parent / name)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return model_dst


def _folder_model(src: Path, profile: str | None) -> tuple[Path, str | None]:
    """(the folder's model file, the logits output to follow) for expose-embedding."""
    if profile is not None:
        chosen = load_profile(profile)
    else:
        try:
            chosen = detect_profile(src)
        except (BundleError, ConfigError):  # a bare folder: its only model, its first output
            models = sorted(src.glob("*.onnx"))
            if len(models) != 1:
                raise BundleError(
                    f"{src}: {'no' if not models else 'several'} .onnx files and no profile to say "
                    "which is the model; pass --profile"
                ) from None
            return models[0], None
    return src / chosen.files.model, chosen.output_name


def _copy_side_files(src: Path, model_src: Path, dst: Path) -> None:
    """Side files come along, so the destination is a complete bundle."""
    data_names = _external_locations(model_src)
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".onnx" and item.name not in data_names:
            shutil.copy2(item, dst / item.name)


def _write_with_embedding(
    model_src: Path, model_dst: Path, tensor: str | None, logits_name: str | None
) -> None:
    model = onnx.load(str(model_src), load_external_data=True)
    outputs = [o.name for o in model.graph.output]
    if EMBEDDING_OUTPUT in outputs:
        raise BundleError(f"{model_src}: already has an '{EMBEDDING_OUTPUT}' output")
    logits_name = logits_name or outputs[0]
    if logits_name not in outputs:
        raise BundleError(f"{model_src}: no output named {logits_name!r} (outputs: {outputs})")
    if tensor:
        known = {v for node in model.graph.node for v in node.output}
        if tensor not in known:
            raise BundleError(f"{model_src}: no tensor named {tensor!r} in the graph")
        source, width = tensor, None
    else:
        source, width = find_head_input(model, logits_name)
    model.graph.node.append(
        helper.make_node("Identity", [source], [EMBEDDING_OUTPUT], name="tagpipe_expose_embedding")
    )
    elem = onnx.TensorProto.FLOAT
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == source:
            elem = vi.type.tensor_type.elem_type
    model.graph.output.append(
        helper.make_tensor_value_info(EMBEDDING_OUTPUT, elem, ["batch", width if width else "embedding_dim"])
    )
    if _external_locations(model_src) or model.ByteSize() >= TWO_GB:
        data_name = model_dst.name + ".data"
        onnx.save_model(
            model,
            str(model_dst),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(model_dst))


def _external_locations(model_path: Path) -> set[str]:
    header = onnx.load(str(model_path), load_external_data=False)
    return {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}


UINT8_INPUT = "pixels_uint8"


def uint8_input_model(model_path: str | Path, preprocess, input_name: str) -> tuple[bytes, str]:
    """The model with its pixel input replaced by uint8 RGB NHWC, normalised in the graph.

    Prepends Cast -> (Gather for BGR) -> Mul/Add (x*scale + offset, the profile's
    mean/std/range) -> (Transpose to NCHW) -> (Cast to the model's float type), so the
    CPU stage ships 1 byte per channel to the GPU and normalisation runs on the device.
    Weights kept in external data stay there: only the graph is serialised; open the
    result with create_session(..., external_data_dir=<the model's folder>).
    Returns (serialised model, name of its uint8 input).
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    from pipeline.model.profiles import ChannelOrder, Layout, ValueRange

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    original = next((i for i in graph.input if i.name == input_name), None)
    if original is None:
        raise BundleError(f"{model_path}: no input named {input_name!r}")
    tensor_type = original.type.tensor_type
    dims = list(tensor_type.shape.dim)
    batch = dims[0] if dims else None
    batch_dim: int | str = "batch"
    if batch is not None and batch.HasField("dim_value"):
        batch_dim = batch.dim_value
    elif batch is not None and batch.dim_param:
        batch_dim = batch.dim_param
    taken = (
        {i.name for i in graph.input}
        | {o for n in graph.node for o in n.output}
        | {t.name for t in graph.initializer}
    )
    prefix = "tagpipe_norm"
    while any(name.startswith(prefix) for name in taken):
        prefix += "_"
    new_input = helper.make_tensor_value_info(
        UINT8_INPUT if UINT8_INPUT not in taken else prefix + "_in",
        TensorProto.UINT8,
        [batch_dim, preprocess.height, preprocess.width, 3],
    )

    std = np.asarray(preprocess.std, np.float64)
    mean = np.asarray(preprocess.mean, np.float64)
    unit = 255.0 if preprocess.value_range is ValueRange.UNIT else 1.0
    scale = (1.0 / (unit * std)).astype(np.float32)
    offset = (-mean / std).astype(np.float32)
    if preprocess.channel_order is ChannelOrder.BGR:  # mean and std are RGB-ordered; the Gather runs first
        scale, offset = scale[::-1].copy(), offset[::-1].copy()
    nodes: list = []
    inits: list = []
    current = new_input.name

    def step(op, inputs, **attrs):
        nonlocal current
        out = f"{prefix}_{len(nodes)}"
        nodes.append(helper.make_node(op, [current, *inputs], [out], name=out, **attrs))
        current = out

    step("Cast", [], to=TensorProto.FLOAT)
    if preprocess.channel_order is ChannelOrder.BGR:
        inits.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), f"{prefix}_bgr"))
        step("Gather", [f"{prefix}_bgr"], axis=3)
    inits.append(numpy_helper.from_array(scale, f"{prefix}_scale"))
    inits.append(numpy_helper.from_array(offset, f"{prefix}_offset"))
    step("Mul", [f"{prefix}_scale"])
    step("Add", [f"{prefix}_offset"])
    if preprocess.layout is Layout.NCHW:
        step("Transpose", [], perm=[0, 3, 1, 2])
    if tensor_type.elem_type != TensorProto.FLOAT:
        step("Cast", [], to=tensor_type.elem_type)
    nodes[-1].output[0] = input_name  # the model's own nodes read the old input name

    position = list(graph.input).index(original)
    graph.input.remove(original)
    graph.input.insert(position, new_input)
    graph.initializer.extend(inits)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    return model.SerializeToString(), new_input.name


class ExposeEmbeddingSettings(SettingsModel):
    """What `tagpipe model expose-embedding` takes (its arguments and options come from these fields)."""

    src: Annotated[
        Path,
        Field(description="the source model (.onnx) or bundle directory"),
        Setting(KeyRole.NONE, argument=True, metavar="SRC"),
    ]
    dst: Annotated[
        Path,
        Field(description="the destination model file or bundle directory"),
        Setting(KeyRole.NONE, argument=True, metavar="DST"),
    ]
    tensor: Annotated[
        str | None,
        Field(description="the tensor to expose"),
        Setting(KeyRole.NONE, default_text="the head's input"),
    ] = None
    profile: Annotated[
        str | None,
        Field(description="a profile name or .toml file naming the model and its logits"),
        Setting(KeyRole.NONE, default_text="detected, or a bare folder's only .onnx"),
    ] = None
