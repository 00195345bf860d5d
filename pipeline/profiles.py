"""Preprocessing profiles: how a model family wants its pixels, as data.

A profile is a TOML file. The shipped ones live in pipeline/profiles/; a new model
family needs only a new file (``--profile path/to/family.toml``), no code change.
Every field is checked once here, and errors name the file and the field.
"""

from __future__ import annotations

import enum
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.errors import ConfigError


class ResizeMode(enum.Enum):
    SQUASH = "squash"  # resize both sides to the input size, ignoring aspect
    PAD_SQUARE = "pad_square"  # pad to a square of the longest side, then resize
    FIT_PAD = "fit_pad"  # fit the longest side to the input size, then pad
    RESIZE_CROP = "resize_crop"  # fit the shortest side, then centre crop


class Interpolation(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"
    BOX = "box"
    HAMMING = "hamming"

    @property
    def pil(self) -> Image.Resampling:
        return Image.Resampling[self.name]


class AlphaOrder(enum.Enum):
    BEFORE_RESIZE = "before_resize"  # composite over the background, then geometry (WD, JoyTag)
    AFTER_RESIZE = "after_resize"  # resize RGBA (premultiplied), then composite (JTP-1)


class ValueRange(enum.Enum):
    UNIT = "0-1"
    BYTE = "0-255"


class ChannelOrder(enum.Enum):
    RGB = "RGB"
    BGR = "BGR"


class Layout(enum.Enum):
    NCHW = "NCHW"
    NHWC = "NHWC"


class Activation(enum.Enum):
    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"
    NONE = "none"  # the model already outputs probabilities


class VocabularyFormat(enum.Enum):
    CL_JSON = "cl_json"  # model_vocabulary.json {idx_to_tag, tag_to_category, ...}
    WD_CSV = "wd_csv"  # selected_tags.csv tag_id,name,category,count
    LINES = "lines"  # one tag per line, index = line number
    TAG_INDEX_JSON = "tag_index_json"  # {tag: index}


Color = tuple[int, int, int]


@dataclass(frozen=True)
class Preprocess:
    width: int
    height: int
    resize_mode: ResizeMode
    interpolation: Interpolation
    pad_color: Color
    alpha_background: Color
    value_range: ValueRange
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: ChannelOrder
    layout: Layout
    alpha_order: AlphaOrder = AlphaOrder.BEFORE_RESIZE


@dataclass(frozen=True)
class Thresholds:
    default: float
    by_category: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BundleFiles:
    """Which files of a model directory hold what; names are relative to the directory."""

    model: str
    vocabulary: str
    vocabulary_format: VocabularyFormat
    tag_metrics: str | None = None
    ood_reference: str | None = None
    metadata: str | None = None


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    source: str  # the file it came from
    files: BundleFiles
    preprocess: Preprocess
    input_name: str | None  # None: the model's first input
    output_name: str | None  # None: the model's first output
    embedding_name: str | None
    activation: Activation
    thresholds: Thresholds

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.preprocess.width, self.preprocess.height)


def _profiles_dir():
    return resources.files("pipeline") / "profiles"


def shipped_profile_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in _profiles_dir().iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a shipped profile by name (``wd_v3``) or any profile file by path."""
    text_path = Path(name_or_path)
    if text_path.suffix == ".toml" or text_path.exists():
        if not text_path.is_file():
            raise ConfigError(f"profile file not found: {text_path}")
        return parse_profile(text_path.read_text(encoding="utf-8"), str(text_path))
    resource = _profiles_dir() / f"{name_or_path}.toml"
    if not resource.is_file():
        raise ConfigError(
            f"unknown profile {name_or_path!r}: shipped profiles are {', '.join(shipped_profile_names())}, "
            "or give the path of a .toml profile file"
        )
    return parse_profile(resource.read_text(encoding="utf-8"), f"profile {name_or_path}")


class _Fields:
    """Reads one TOML table and reports bad or unknown keys by their dotted name."""

    def __init__(self, table: dict[str, Any], where: str, prefix: str):
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{prefix}] must be a table")
        self.table, self.where, self.prefix = table, where, prefix
        self.seen: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.seen.add(key)
        if key not in self.table:
            if default is ...:
                raise ConfigError(f"{self.where}: missing field {self._name(key)}")
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"{self.where}: field {self._name(key)} has the wrong type ({value!r})")
        return value

    def enum(self, key: str, kind: type[enum.Enum], default: Any = ...) -> Any:
        raw = self.get(key, str, default if default is ... else default.value)
        try:
            return kind(raw)
        except ValueError:
            allowed = ", ".join(m.value for m in kind)
            raise ConfigError(f"{self.where}: field {self._name(key)} = {raw!r}; allowed: {allowed}") from None

    def triple(self, key: str, kind: type, default: Any = ...) -> tuple:
        value = self.get(key, (list, int, float), default)
        values = [value] * 3 if isinstance(value, (int, float)) else list(value)
        if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{self.where}: field {self._name(key)} must be a number or 3 numbers")
        if kind is int and not all(float(v).is_integer() and 0 <= v <= 255 for v in values):
            raise ConfigError(f"{self.where}: field {self._name(key)} must hold integers 0-255")
        return tuple(kind(v) for v in values)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise ConfigError(f"{self.where}: unknown field(s) {', '.join(self._name(k) for k in unknown)}")


def parse_profile(text: str, where: str) -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    top = _Fields(data, where, "")
    name = top.get("name", str)
    description = top.get("description", str, "")

    files = _Fields(top.get("files", dict), where, "files")
    bundle_files = BundleFiles(
        model=files.get("model", str, "model.onnx"),
        vocabulary=files.get("vocabulary", str),
        vocabulary_format=files.enum("vocabulary_format", VocabularyFormat),
        tag_metrics=files.get("tag_metrics", str, None),
        ood_reference=files.get("ood_reference", str, None),
        metadata=files.get("metadata", str, None),
    )
    files.done()

    pre = _Fields(top.get("preprocess", dict), where, "preprocess")
    size = pre.get("input_size", (int, list))
    if isinstance(size, int):
        size = [size, size]
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ConfigError(f"{where}: field preprocess.input_size must be a positive integer or [width, height]")
    std = pre.triple("std", float, 1.0)
    if any(s <= 0 for s in std):
        raise ConfigError(f"{where}: field preprocess.std must be positive")
    preprocess = Preprocess(
        width=size[0],
        height=size[1],
        resize_mode=pre.enum("resize_mode", ResizeMode),
        interpolation=pre.enum("interpolation", Interpolation),
        pad_color=pre.triple("pad_color", int, [255, 255, 255]),
        alpha_background=pre.triple("alpha_background", int, [255, 255, 255]),
        value_range=pre.enum("value_range", ValueRange),
        mean=pre.triple("mean", float, 0.0),
        std=std,
        channel_order=pre.enum("channel_order", ChannelOrder, ChannelOrder.RGB),
        layout=pre.enum("layout", Layout, Layout.NCHW),
        alpha_order=pre.enum("alpha_order", AlphaOrder, AlphaOrder.BEFORE_RESIZE),
    )
    pre.done()

    model = _Fields(top.get("model", dict, {}), where, "model")
    input_name = model.get("input_name", str, None)
    output_name = model.get("output_name", str, None)
    embedding_name = model.get("embedding_name", str, None)
    activation = model.enum("output_activation", Activation, Activation.SIGMOID)
    model.done()

    thr = _Fields(top.get("thresholds", dict, {}), where, "thresholds")
    default = thr.get("default", float, 0.5)
    by_category = thr.get("category", dict, {})
    for key, value in list(by_category.items()):
        if isinstance(value, int) and not isinstance(value, bool):
            by_category[key] = value = float(value)
        if not isinstance(value, float) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}: field thresholds.category.{key} must be a number in [0, 1]")
    if not 0.0 <= default <= 1.0:
        raise ConfigError(f"{where}: field thresholds.default must be in [0, 1]")
    thr.done()
    top.done()
    return Profile(
        name=name,
        description=description,
        source=where,
        files=bundle_files,
        preprocess=preprocess,
        input_name=input_name,
        output_name=output_name,
        embedding_name=embedding_name,
        activation=activation,
        thresholds=Thresholds(default=default, by_category=dict(by_category)),
    )
