"""Profiles from a model's own config: timm's pretrained_cfg or a Hugging Face
preprocessor_config.json, read beside the ONNX file it describes.

The config says how pixels were prepared in training (size, crop, interpolation,
mean/std); the ONNX graph says what it takes now (input name, layout, size) and,
when it ends in a Sigmoid or Softmax, what its output holds. Settings that would
change pixels but have no profile field stop the import by name: a profile that
silently differs from its reference is the failure this module exists to prevent.

Why this module is long: two foreign formats (timm's pretrained_cfg, Hugging Face's
preprocessor_config.json) are read here, and each of their fields is either mapped or
refused by name.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import onnx
from pydantic import Field

from pipeline.core.errors import ConfigError
from pipeline.core.settings import KeyRole, Setting, SettingsModel
from pipeline.model.profiles import Activation, Profile, VocabularyFormat, profile_from_data
from pipeline.storage.filesystem import write_atomic

HF_CONFIG = "preprocessor_config.json"
MODEL_CONFIG = "config.json"  # timm: pretrained_cfg inside; Hugging Face: the model's (id2label)
BUNDLE_PROFILE_NAME = "tagpipe_profile.toml"  # pipeline/model/bundle.py reads it first

# timm's PretrainedCfg fields that do not change eval pixels (timm/models/_pretrained.py)
TIMM_IGNORED = {
    "url",
    "file",
    "state_dict",
    "hf_hub_id",
    "hf_hub_filename",
    "source",
    "architecture",
    "tag",
    "custom_load",
    "test_input_size",
    "min_input_size",
    "fixed_input_size",
    "test_crop_pct",
    "num_classes",
    "label_names",
    "label_descriptions",
    "pool_size",
    "test_pool_size",
    "first_conv",
    "classifier",
    "license",
    "description",
    "origin_url",
    "paper_name",
    "paper_ids",
    "notes",
}
TIMM_DEFAULTS = {  # what timm.data.resolve_data_config uses when pretrained_cfg leaves a field out
    "input_size": [3, 224, 224],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
# Hugging Face processor keys that carry no pixel setting of their own
HF_IGNORED = {
    "image_processor_type",
    "feature_extractor_type",
    "processor_class",
    "do_convert_rgb",
    "auto_map",
}
HF_IGNORED_WHEN_FALSE = {
    "do_pad",
    "do_reduce_labels",
    "do_flip_channel_order",
    "do_thumbnail",
    "do_align_long_axis",
}
HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
HF_PROCESSORS_WITH_CROP_PCT = {"ConvNextImageProcessor", "ConvNextFeatureExtractor"}
# What an integer `size` means differs by processor (transformers' get_size_dict with the
# class's default_to_square): a shortest edge for these, a square for the ViT family
HF_INT_SIZE_IS_SHORTEST_EDGE = {
    "CLIPImageProcessor",
    "CLIPFeatureExtractor",
    "ConvNextImageProcessor",
    "ConvNextFeatureExtractor",
    "BitImageProcessor",
    "ChineseCLIPImageProcessor",
    "MobileNetV1ImageProcessor",
    "MobileNetV2ImageProcessor",
    "EfficientNetImageProcessor",
    "PoolFormerImageProcessor",
    "LevitImageProcessor",
}
HF_INT_SIZE_IS_SQUARE = {
    "ViTImageProcessor",
    "ViTFeatureExtractor",
    "DeiTImageProcessor",
    "BeitImageProcessor",
    "SiglipImageProcessor",
    "Siglip2ImageProcessor",
    "Dinov2ImageProcessor",
}


@dataclass(frozen=True)
class OnnxFacts:
    """What the ONNX graph itself says about its input and output."""

    model_file: str
    input_name: str
    layout: str  # NCHW or NHWC
    size: tuple[int, int] | None  # (width, height) when static
    output_name: str
    ends_in: str | None  # "Softmax" or "Sigmoid" when the output is produced by one


def find_config(directory: Path) -> Path | None:
    """The config a folder's profile can be imported from, Hugging Face's first."""
    if (directory / HF_CONFIG).is_file():
        return directory / HF_CONFIG
    config = directory / MODEL_CONFIG
    if config.is_file() and "pretrained_cfg" in _read_json(config):
        return config
    return None


def onnx_facts(directory: Path, model_file: str | None = None) -> OnnxFacts:
    path = directory / model_file if model_file else _only_onnx(directory)
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if not inputs or not graph.output:
        raise ConfigError(f"{path}: the model has no input or no output")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ConfigError(
            f"{path}: input {inputs[0].name!r} has {len(dims)} dimensions; an image model takes 4"
        )
    nhwc = dims[3] == 3 and dims[1] != 3
    height, width = (dims[1], dims[2]) if nhwc else (dims[2], dims[3])
    output = graph.output[0].name
    producer = next((n for n in graph.node if output in n.output), None)
    ends_in = (
        producer.op_type if producer is not None and producer.op_type in ("Softmax", "Sigmoid") else None
    )
    return OnnxFacts(
        model_file=path.name,
        input_name=inputs[0].name,
        layout="NHWC" if nhwc else "NCHW",
        size=(width, height) if width and height else None,
        output_name=output,
        ends_in=ends_in,
    )


def _only_onnx(directory: Path) -> Path:
    if (directory / "model.onnx").is_file():
        return directory / "model.onnx"
    found = sorted(directory.glob("*.onnx"))
    if len(found) != 1:
        raise ConfigError(
            f"{directory}: {'no' if not found else 'several'} .onnx files; name one with --model-file"
        )
    return found[0]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def timm_preprocess(pretrained_cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """[preprocess] in timm's own terms from a pretrained_cfg (mapping in the README)."""
    unknown = sorted(set(pretrained_cfg) - TIMM_IGNORED - set(TIMM_DEFAULTS) - {"label_offset"})
    if unknown:
        raise ConfigError(
            f"{where}: field pretrained_cfg.{unknown[0]} is not a timm setting tagpipe knows; "
            "it may change the pixels, so the import stops"
        )
    if pretrained_cfg.get("label_offset"):
        raise ConfigError(
            f"{where}: field pretrained_cfg.label_offset = {pretrained_cfg['label_offset']}: the "
            "output has a background class; write the profile by hand"
        )
    cfg = {**TIMM_DEFAULTS, **{k: v for k, v in pretrained_cfg.items() if v is not None}}
    size = cfg["input_size"]
    if not (isinstance(size, list) and len(size) == 3 and size[0] == 3):
        raise ConfigError(
            f"{where}: field pretrained_cfg.input_size must be [3, height, width]; got {size!r}"
        )
    return {
        "input_size": [size[2], size[1]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": cfg["crop_mode"],
        "interpolation": cfg["interpolation"],
        "value_range": "0-1",
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
    }


def hf_preprocess(config: dict[str, Any], where: str) -> dict[str, Any]:
    """[preprocess] from a Hugging Face image processor config, as its slow (PIL)
    processor computes: resize (size.shortest_edge or size.height/width), optional
    centre crop, rescale, normalise. ConvNext's crop_pct is turned into sizes."""
    kind = config.get("image_processor_type") or config.get("feature_extractor_type") or ""
    known = (
        {
            "do_resize",
            "size",
            "resample",
            "do_center_crop",
            "crop_size",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "image_mean",
            "image_std",
        }
        | HF_IGNORED
        | HF_IGNORED_WHEN_FALSE
    )
    if kind in HF_PROCESSORS_WITH_CROP_PCT:
        known.add("crop_pct")
    for key, value in config.items():
        if key not in known or (key in HF_IGNORED_WHEN_FALSE and value):
            raise ConfigError(
                f"{where}: field {key} = {value!r} is not a setting tagpipe can reproduce "
                f"({kind or 'image processor'}); the import stops"
            )
    if not config.get("do_resize", True):
        raise ConfigError(f"{where}: field do_resize = false: images would reach the model at any size")
    # defaults differ by processor class: a setting left out is asked for, never guessed
    needed = ["size", "resample"] + (["image_mean", "image_std"] if config.get("do_normalize", True) else [])
    needed += ["do_center_crop"] if "crop_size" in config else []
    missing = [key for key in needed if key not in config]
    if missing:
        raise ConfigError(
            f"{where}: field {missing[0]} is missing; its default differs between {kind or 'image'} "
            "processors, so tagpipe does not guess it: add it to the config"
        )
    resample = config["resample"]
    if resample not in HF_RESAMPLE:
        raise ConfigError(f"{where}: field resample = {resample!r}; known: PIL codes 0-5")
    out: dict[str, Any] = {"interpolation": HF_RESAMPLE[resample], **_hf_geometry(config, kind, where)}
    out["value_range"] = _hf_value_range(config, where)
    normalise = config.get("do_normalize", True)
    out["mean"] = list(config["image_mean"]) if normalise else [0.0] * 3
    out["std"] = list(config["image_std"]) if normalise else [1.0] * 3
    return out


def _hf_geometry(config: dict, kind: str, where: str) -> dict[str, Any]:
    size = config["size"]
    if isinstance(size, int) and not isinstance(size, bool):
        if kind in HF_INT_SIZE_IS_SHORTEST_EDGE:
            size = {"shortest_edge": size}
        elif kind in HF_INT_SIZE_IS_SQUARE:
            size = {"height": size, "width": size}
        else:
            raise ConfigError(
                f"{where}: field size = {size}: an integer means a shortest edge or a square "
                f"depending on the processor ({kind or 'not named'}); write it as "
                '{"shortest_edge": N} or {"height": N, "width": N}'
            )
    if not isinstance(size, dict) or set(size) not in ({"shortest_edge"}, {"height", "width"}):
        raise ConfigError(
            f"{where}: field size = {size!r}: tagpipe reproduces {{shortest_edge}} or {{height, width}}"
        )
    if kind in HF_PROCESSORS_WITH_CROP_PCT:  # ConvNext: below 384, resize to edge/crop_pct then crop
        if "shortest_edge" not in size:
            raise ConfigError(f"{where}: field size = {size!r}: {kind} takes {{shortest_edge}}")
        edge = size["shortest_edge"]
        if edge >= 384:
            return {"size": {"height": edge, "width": edge}}
        if not config.get("crop_pct"):
            raise ConfigError(f"{where}: field crop_pct is missing; {kind} needs it below 384 px")
        crop_pct = config["crop_pct"]
        return {"size": {"shortest_edge": int(edge / crop_pct)}, "crop_size": edge, "do_center_crop": True}
    out: dict[str, Any] = {"size": size}
    if config.get("do_center_crop", False):
        crop = config.get("crop_size")
        if isinstance(crop, int) and not isinstance(crop, bool):
            crop = {"height": crop, "width": crop}
        if not isinstance(crop, dict) or set(crop) != {"height", "width"}:
            raise ConfigError(f"{where}: field crop_size = {crop!r}: expected {{height, width}}")
        out.update(crop_size=crop, do_center_crop=True)
    return out


def _hf_value_range(config: dict, where: str) -> str:
    if not config.get("do_rescale", True):
        return "0-255"
    factor = config.get("rescale_factor", 1 / 255)
    if not math.isclose(factor, 1 / 255, rel_tol=1e-6):
        raise ConfigError(f"{where}: field rescale_factor = {factor}: tagpipe scales by 1/255 or not at all")
    return "0-1"


def _activation(facts: OnnxFacts, model_config: dict, given: str | None, where: str) -> str:
    """What the output holds: as given, else what the graph ends in, else the Hugging
    Face problem_type; a bare logits output of unknown kind stops the import."""
    if given:
        return given
    if facts.ends_in == "Softmax":
        return Activation.SOFTMAX_PROBABILITIES.value
    if facts.ends_in == "Sigmoid":
        return Activation.SIGMOID_PROBABILITIES.value
    problem = model_config.get("problem_type")
    if problem == "multi_label_classification":
        return Activation.SIGMOID.value
    if problem == "single_label_classification" or "id2label" in model_config:
        return Activation.SOFTMAX.value
    raise ConfigError(
        f"{where}: cannot tell whether {facts.output_name!r} holds sigmoid (tags) or softmax "
        f"(classes) logits: run `tagpipe model profile --from {where} --activation sigmoid` (or "
        "softmax) to write the profile"
    )


def profile_data(
    source: Path,
    *,
    activation: str | None = None,
    vocabulary: str | None = None,
    vocabulary_format: str | None = None,
    model_file: str | None = None,
) -> dict[str, Any]:
    """Profile tables for the bundle at source (a folder, or its config file)."""
    directory = source if source.is_dir() else source.parent
    config_path = source if source.is_file() else find_config(directory)
    if config_path is None:
        raise ConfigError(f"{directory}: no {HF_CONFIG}, and no {MODEL_CONFIG} with a timm pretrained_cfg")
    config = _read_json(config_path)
    model_config = _read_json(directory / MODEL_CONFIG) if (directory / MODEL_CONFIG).is_file() else {}
    where = str(config_path)
    if config_path.name == MODEL_CONFIG and "pretrained_cfg" not in config:
        raise ConfigError(
            f"{where}: no pretrained_cfg (a timm config); for a Hugging Face model give its {HF_CONFIG}"
        )
    if "pretrained_cfg" in config:
        pretrained = config["pretrained_cfg"]
        preprocess, origin = (
            timm_preprocess(pretrained if isinstance(pretrained, dict) else {}, where),
            "timm",
        )
    else:
        preprocess, origin = hf_preprocess(config, where), "Hugging Face"
    facts = onnx_facts(directory, model_file)
    preprocess["layout"] = facts.layout
    preprocess["channel_order"] = "RGB"
    preprocess["alpha_order"] = "drop"  # timm and HF load images with convert("RGB")
    files = {
        "model": facts.model_file,
        **_vocabulary(directory, model_config, vocabulary, vocabulary_format, where),
    }
    data = {
        "name": _model_name(config, model_config),
        "description": f"imported from {config_path.name} ({origin})",
        "files": files,
        "preprocess": preprocess,
        "model": {
            "input_name": facts.input_name,
            "output_name": facts.output_name,
            "output_activation": _activation(facts, model_config, activation, where),
        },
        "thresholds": {"default": 0.5},
    }
    profile = profile_from_data(
        json.loads(json.dumps(data)), f"{where} (imported)"
    )  # validated as a file would be
    if facts.size is not None and facts.size != profile.input_size:
        raise ConfigError(
            f"{where}: the config's input size {profile.input_size} differs from the ONNX input "
            f"{facts.size} of {facts.model_file}: model and config do not belong together"
        )
    return data


def _model_name(config: dict, model_config: dict) -> str:
    """The architecture the configs name, never the folder (a renamed folder is the
    same model, and the name is part of a table's inference key)."""
    architectures = model_config.get("architectures")
    named = model_config.get("architecture") or (
        architectures[0] if isinstance(architectures, list) and architectures else None
    )
    return str(named or config.get("image_processor_type") or "imported")


def _vocabulary(directory: Path, model_config: dict, path: str | None, fmt: str | None, where: str) -> dict:
    if path:
        return {"vocabulary": path, "vocabulary_format": fmt or "lines"}
    if "id2label" in model_config or "label_names" in model_config:
        return {"vocabulary": MODEL_CONFIG, "vocabulary_format": "config_labels"}
    raise ConfigError(
        f"{where}: no class names (id2label or label_names in {MODEL_CONFIG}): "
        "give --vocabulary FILE and --vocabulary-format"
    )


def import_profile(directory: Path, config: Path) -> Profile:
    """The profile of a bundle folder that carries a model config and no profile."""
    return profile_from_data(profile_data(config), f"imported from {config}")


def write_profile(
    source: Path, output: Path | None, *, overwrite: bool = False, **options: Any
) -> Path | None:
    """`tagpipe model profile`: the imported profile as TOML, to a file (never over an
    existing one unless overwrite) or to stdout ('-'); returns the file written."""
    import tomli_w

    data = profile_data(source, **options)
    text = (
        f"# {data['description']}; fields and the timm/Hugging Face mapping: README, Profiles\n"
        + tomli_w.dumps(data)
    )
    if output is not None and str(output) == "-":
        sys.stdout.write(text)
        return None
    target = output or (source if source.is_dir() else source.parent) / BUNDLE_PROFILE_NAME
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists: pass --overwrite to replace it, or --output elsewhere")
    write_atomic(str(target), text.encode("utf-8"))
    return target


class ProfileImportSettings(SettingsModel):
    """What `tagpipe model profile` takes (its options come from these fields)."""

    source: Annotated[
        Path,
        Field(
            description="a bundle folder, or its config: timm's config.json (pretrained_cfg) or "
            "preprocessor_config.json"
        ),
        Setting(KeyRole.NONE, flags=("--from",), metavar="DIR_OR_CONFIG"),
    ]
    output: Annotated[
        Path | None,
        Field(description="where to write the profile; `-` prints it"),
        Setting(KeyRole.NONE, flags=("--output", "-o"), default_text="tagpipe_profile.toml in the folder"),
    ] = None
    activation: Annotated[
        Activation | None,
        Field(description="what the model outputs: " + ", ".join(a.value for a in Activation)),
        Setting(KeyRole.NONE, default_text="from the graph or config"),
    ] = None
    vocabulary: Annotated[
        str | None,
        Field(description="the class names file, relative to the folder"),
        Setting(KeyRole.NONE, default_text="config.json's labels"),
    ] = None
    vocabulary_format: Annotated[
        VocabularyFormat | None,
        Field(
            description="how the class names file is written: " + ", ".join(f.value for f in VocabularyFormat)
        ),
        Setting(KeyRole.NONE, default_text="from the file"),
    ] = None
    model_file: Annotated[
        str | None,
        Field(description="the .onnx file, when the folder holds several"),
        Setting(KeyRole.NONE, default_text="the only one"),
    ] = None
    overwrite: Annotated[
        bool, Field(description="replace an existing profile file"), Setting(KeyRole.NONE)
    ] = False

    def import_options(self) -> dict[str, str | None]:
        """profile_data's keywords: the options given, as the profile's own words."""
        return {
            "activation": self.activation.value if self.activation else None,
            "vocabulary": self.vocabulary,
            "vocabulary_format": self.vocabulary_format.value if self.vocabulary_format else None,
            "model_file": self.model_file,
        }
