"""`tagpipe model inspect`: what a bundle holds, as text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import onnx
from pydantic import Field

from pipeline.core.settings import KeyRole, Setting, SettingsModel
from pipeline.model.bundle import load_bundle
from pipeline.model.profiles import ResizeMode

PROFILE_TEXT = "a profile name or .toml file"


class InspectSettings(SettingsModel):
    """What `tagpipe model inspect` takes (its arguments and options come from these fields)."""

    directory: Annotated[
        Path,
        Field(description="the model bundle directory"),
        Setting(KeyRole.NONE, argument=True, metavar="DIR"),
    ]
    profile: Annotated[
        str | None, Field(description=PROFILE_TEXT), Setting(KeyRole.NONE, default_text="detected")
    ] = None


def _shape(value_info) -> str:
    dims = value_info.type.tensor_type.shape.dim
    parts = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    elem = onnx.TensorProto.DataType.Name(value_info.type.tensor_type.elem_type).lower()
    return f"{elem}[{', '.join(parts)}]"


def describe_bundle(directory: str | Path, profile: str | None = None) -> str:
    bundle = load_bundle(directory, profile)
    graph = onnx.load(str(bundle.model_path), load_external_data=False).graph
    init = {t.name for t in graph.initializer}
    lines = [
        f"bundle:      {bundle.directory}",
        f"name:        {bundle.name}",
        f"profile:     {bundle.profile.name} ({bundle.profile.source})",
        f"model file:  {bundle.model_path.name}"
        + (f" + {', '.join(p.name for p in bundle.data_files)}" if bundle.data_files else ""),
        "inputs:",
        *[f"  {i.name}: {_shape(i)}" for i in graph.input if i.name not in init],
        "outputs:",
        *[f"  {o.name}: {_shape(o)}" for o in graph.output],
        f"tags:        {len(bundle.vocabulary)}",
        *[f"  {name}: {count}" for name, count in sorted(bundle.vocabulary.counts_by_category().items())],
        "optional files:",
        *[
            f"  {name}: {'present' if present else 'missing (feature off)'}"
            for name, present in bundle.optional_files().items()
        ],
        "embedding output: "
        + (
            f"yes ({bundle.embedding_output})"
            if bundle.embedding_output
            else "no (tagpipe model expose-embedding adds it)"
        ),
        f"model sha256:       {bundle.fingerprint.model_sha256}",
        f"calibration sha256: {bundle.fingerprint.calibration_sha256}",
    ]
    pre = bundle.profile.preprocess
    resize = pre.resize_size
    if resize == (pre.width, pre.height):
        crop = ""
    elif pre.resize_mode is ResizeMode.RESIZE_CROP and resize[0] == resize[1]:
        crop = f" (shortest side to {resize[0]}, centre crop to)"
    else:
        crop = f" (to {resize[0]}x{resize[1]}, centre crop or pad to)"
    lines.append(
        f"preprocess:  {pre.resize_mode.value}{crop} {pre.width}x{pre.height} {pre.interpolation.value} "
        f"({pre.rounding.value} rounding), {pre.value_range.value} "
        f"mean {pre.mean} std {pre.std} (RGB order), "
        f"{pre.channel_order.value} {pre.layout.value}; "
        f"activation {bundle.profile.activation.value}; threshold {bundle.profile.thresholds.default}"
    )
    return "\n".join(lines)
