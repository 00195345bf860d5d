"""Preprocessing profiles: how a model family wants its pixels, as data.

A profile is a TOML file. The shipped ones live in pipeline/model/profiles/; a new model
family needs only a new file (``--profile path/to/family.toml``), no code change.
A file is read table by table (`_Fields`: names, types, misspellings, the three
vocabularies of geometry) into frozen pydantic records whose constraints are declared on
their fields, so a profile built in code (profile_import) is checked as a file's is.
Every error names the file and the field.

Why this module is long: the profile schema in tagpipe's, timm's and Hugging Face's
terms, with the checks that name the file and field of each mistake.
"""

from __future__ import annotations

import enum
import math
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from PIL import Image
from pydantic import Field, PositiveFloat

from pipeline.core.errors import ConfigError


class ResizeMode(enum.Enum):
    SQUASH = "squash"  # resize both sides to the resize size, ignoring aspect, then centre crop
    PAD_SQUARE = "pad_square"  # pad to a square of the longest side, then resize
    FIT_PAD = "fit_pad"  # fit the longest side into the resize size, then centre pad (or crop)
    RESIZE_CROP = "resize_crop"  # cover the resize size keeping aspect (shortest side), then centre crop


class Rounding(enum.Enum):
    """Where libraries differ by a pixel: the long side of an aspect-keeping resize and
    the offset of a centre crop. Each value names the library whose arithmetic is copied
    (see README, "Profiles"), so a profile reproduces its reference to the pixel."""

    TAGPIPE = "tagpipe"  # round() long side, floor((d) / 2) offsets: profiles before this field
    # torchvision Resize(int): int() long side; ResizeKeepRatio: round(); crop offset round((d) / 2)
    TIMM = "timm"
    HF = "hf"  # Hugging Face image processors: int() long side, floor((d) / 2) crop offset


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
    DROP = "drop"  # ignore alpha as Pillow's convert("RGB") does (timm, Hugging Face): imported profiles


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
    """What the model's output holds, so rows store comparable numbers: logits for
    independent (sigmoid) tags, log-probabilities for one softmax group."""

    SIGMOID = "sigmoid"  # logits of independent tags
    SOFTMAX = "softmax"  # logits of one softmax group (classes)
    SIGMOID_PROBABILITIES = "sigmoid_probabilities"  # already sigmoid: independent probabilities (WD v3)
    SOFTMAX_PROBABILITIES = "softmax_probabilities"  # already softmax: one group's probabilities

    @property
    def is_group(self) -> bool:
        """One softmax group: rows store log-probabilities and p = exp(stored)."""
        return self in (Activation.SOFTMAX, Activation.SOFTMAX_PROBABILITIES)


ACTIVATION_ALIASES = {"none": Activation.SIGMOID_PROBABILITIES}  # the earlier name (WD v3 profiles)


class VocabularyFormat(enum.Enum):
    CL_JSON = "cl_json"  # model_vocabulary.json {idx_to_tag, tag_to_category, ...}
    WD_CSV = "wd_csv"  # selected_tags.csv tag_id,name,category,count
    LINES = "lines"  # one tag per line, index = line number
    TAG_INDEX_JSON = "tag_index_json"  # {tag: index}
    CONFIG_LABELS = "config_labels"  # a model config.json: id2label (Hugging Face) or label_names (timm)


Byte = Annotated[int, Field(ge=0, le=255)]
Color = tuple[Byte, Byte, Byte]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Record(pydantic.BaseModel):
    """A frozen, validated record: a profile built in code (profile_import) is checked
    as a file's is. No field may be left out or added."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")


class Preprocess(_Record):
    """A model's pixel recipe. mean and std are always in RGB order (timm and Hugging
    Face write them so), whatever channel_order the model takes; both normalisation
    paths flip them with the pixels. Fields added later (resize, rounding, order) join
    the inference key only when not default (extra_key), so existing tables are not
    re-tagged by an upgrade (pipeline/job/incremental.py lists the keyed fields)."""

    width: Annotated[int, Field(gt=0)]  # the model's input size (the crop size)
    height: Annotated[int, Field(gt=0)]
    resize_mode: ResizeMode
    interpolation: Interpolation
    pad_color: Color
    alpha_background: Color
    value_range: ValueRange
    mean: tuple[float, float, float]  # RGB order
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat]  # RGB order
    channel_order: ChannelOrder
    layout: Layout
    alpha_order: AlphaOrder = AlphaOrder.BEFORE_RESIZE
    resize_width: Annotated[int, Field(gt=0)] | None = Field(default=None, repr=False)  # None: input size
    resize_height: Annotated[int, Field(gt=0)] | None = Field(default=None, repr=False)
    rounding: Rounding = Field(default=Rounding.TAGPIPE, repr=False)
    mean_std_order: Literal["RGB", "BGR"] | None = Field(
        default=None, repr=False
    )  # as written; None: not given

    @property
    def resize_size(self) -> tuple[int, int]:
        """The size the resize aims at, before the centre crop (or pad) to the input size."""
        return (self.resize_width or self.width, self.resize_height or self.height)

    def extra_key(self) -> dict:
        """The fields added after the first key version, when they differ from their defaults."""
        extra: dict = {}
        if self.resize_size != (self.width, self.height):
            extra["resize_size"] = list(self.resize_size)
        if self.rounding is not Rounding.TAGPIPE:
            extra["rounding"] = self.rounding.value
        uneven = len(set(self.mean)) > 1 or len(set(self.std)) > 1
        if self.channel_order is ChannelOrder.BGR and uneven:
            # earlier versions' two paths read such a mean in different orders: which pixels old rows
            # got is unknown, so either answer re-tags
            extra["mean_std_order"] = self.mean_std_order
        return extra


class Thresholds(_Record):
    default: Probability
    by_category: dict[str, Probability] = Field(default_factory=dict)


class BundleFiles(_Record):
    """Which files of a model directory hold what; names are relative to the directory."""

    model: Annotated[str, Field(min_length=1)]
    vocabulary: Annotated[str, Field(min_length=1)]
    vocabulary_format: VocabularyFormat
    tag_metrics: str | None = None
    ood_reference: str | None = None
    metadata: str | None = None


class Profile(_Record):
    name: Annotated[str, Field(min_length=1)]
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


def _record(kind: type[_Record], where: str, prefix: str, **values):
    """A record from a file's values; a value its model refuses is a ConfigError naming
    the file and the field (the reader has checked names and types already)."""
    try:
        return kind(**values)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(p) for p in error["loc"] if not isinstance(p, int))
        field = f"{prefix}.{name}" if prefix else name
        message = str(error["msg"]).replace("Input should be", "must be")
        raise ConfigError(f"{where}: field {field} = {error.get('input')!r}: {message}") from None


def _profiles_dir():
    return resources.files("pipeline.model") / "profiles"


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
                raise ConfigError(f"{self.where}: missing field {self._name(key)}{self._near(key)}")
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"{self.where}: field {self._name(key)} has the wrong type ({value!r})")
        return value

    def _near(self, key: str) -> str:
        """A written key that looks like a misspelling of key, for the error."""
        import difflib

        close = difflib.get_close_matches(key, [k for k in self.table if isinstance(k, str)], n=1, cutoff=0.8)
        return f" (found {self._name(close[0])}: misspelt?)" if close else ""

    def enum(self, key: str, kind: type[enum.Enum], default: Any = ...) -> Any:
        raw = self.get(key, str, default if default is ... else default.value)
        try:
            return kind(raw)
        except ValueError:
            allowed = ", ".join(m.value for m in kind)
            raise ConfigError(
                f"{self.where}: field {self._name(key)} = {raw!r}; allowed: {allowed}"
            ) from None

    def triple(self, key: str, kind: type, default: Any = ...) -> tuple:
        value = self.get(key, (list, int, float), default)
        values = [value] * 3 if isinstance(value, (int, float)) else list(value)
        if len(values) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
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
    return profile_from_data(data, where)


def profile_from_data(data: dict[str, Any], where: str) -> Profile:
    """A profile from its parsed tables (a TOML file's, or one built by an import)."""
    top = _Fields(data, where, "")
    name = top.get("name", str)
    description = top.get("description", str, "")

    files = _Fields(top.get("files", dict), where, "files")
    bundle_files = _record(
        BundleFiles,
        where,
        "files",
        model=files.get("model", str, "model.onnx"),
        vocabulary=files.get("vocabulary", str),
        vocabulary_format=files.enum("vocabulary_format", VocabularyFormat),
        tag_metrics=files.get("tag_metrics", str, None),
        ood_reference=files.get("ood_reference", str, None),
        metadata=files.get("metadata", str, None),
    )
    files.done()

    preprocess = parse_preprocess(_Fields(top.get("preprocess", dict), where, "preprocess"))

    model = _Fields(top.get("model", dict, {}), where, "model")
    input_name = model.get("input_name", str, None)
    output_name = model.get("output_name", str, None)
    embedding_name = model.get("embedding_name", str, None)
    activation = _activation(model)
    model.done()

    thr = _Fields(top.get("thresholds", dict, {}), where, "thresholds")
    default = thr.get("default", float, 0.5)
    by_category = thr.get("category", dict, {})
    for key, value in list(by_category.items()):
        if isinstance(value, int) and not isinstance(value, bool):
            by_category[key] = value = float(value)
        if not isinstance(value, float) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}: field thresholds.category.{key} must be a number in [0, 1]")
    thresholds = _record(Thresholds, where, "thresholds", default=default, by_category=dict(by_category))
    thr.done()
    top.done()
    return _record(
        Profile,
        where,
        "",
        name=name,
        description=description,
        source=where,
        files=bundle_files,
        preprocess=preprocess,
        input_name=input_name,
        output_name=output_name,
        embedding_name=embedding_name,
        activation=activation,
        thresholds=thresholds,
    )


def _activation(model: _Fields) -> Activation:
    raw = model.get("output_activation", str, Activation.SIGMOID.value)
    if raw in ACTIVATION_ALIASES:
        return ACTIVATION_ALIASES[raw]
    try:
        return Activation(raw)
    except ValueError:
        allowed = ", ".join(
            [m.value for m in Activation]
            + [f"{k} (old name of {v.value})" for k, v in ACTIVATION_ALIASES.items()]
        )
        raise ConfigError(
            f"{model.where}: field model.output_activation = {raw!r}; allowed: {allowed}"
        ) from None


def _size(fields: _Fields, key: str, default: Any = ...) -> tuple[int, int] | None:
    """An int (a square) or [width, height], or a Hugging Face {height, width} /
    {shortest_edge} table (a shortest edge reads as a square resize size)."""
    value = fields.get(key, (int, list, dict), default)
    if value is None:
        return None
    if isinstance(value, dict):
        if set(value) == {"shortest_edge"}:
            value = [value["shortest_edge"]] * 2
        elif set(value) == {"height", "width"}:
            value = [value["width"], value["height"]]
        else:
            raise ConfigError(
                f"{fields.where}: field {fields._name(key)} must be {{shortest_edge}} or "
                f"{{height, width}}; got keys {sorted(value)}"
            )
    if isinstance(value, int):
        value = [value, value]
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ConfigError(
            f"{fields.where}: field {fields._name(key)} must be a positive integer or [width, height]"
        )
    return (value[0], value[1])


TIMM_CROP_MODES = {
    "center": ResizeMode.RESIZE_CROP,
    "squash": ResizeMode.SQUASH,
    "border": ResizeMode.FIT_PAD,
}
TIMM_DEFAULT_CROP_PCT = 0.875  # timm.data.constants.DEFAULT_CROP_PCT


def parse_preprocess(pre: _Fields) -> Preprocess:
    """[preprocess], in tagpipe's own terms or timm's (crop_pct, crop_mode) or Hugging
    Face's (size, crop_size, do_center_crop); all three land on the same fields."""
    where = pre.where
    mean, std = pre.triple("mean", float, 0.0), pre.triple("std", float, 1.0)
    if any(s <= 0 for s in std):
        raise ConfigError(f"{where}: field preprocess.std must be positive")
    channel_order = pre.enum("channel_order", ChannelOrder, ChannelOrder.RGB)
    mean, std = _rgb_mean_std(pre, mean, std, channel_order)
    mean_std_order = pre.table.get("mean_std_order")
    value_range = pre.enum("value_range", ValueRange)
    geometry = _geometry(pre, mean, value_range)
    preprocess = _record(
        Preprocess,
        where,
        "preprocess",
        **geometry,
        interpolation=pre.enum("interpolation", Interpolation),
        alpha_background=pre.triple("alpha_background", int, [255, 255, 255]),
        value_range=value_range,
        mean=mean,
        std=std,
        channel_order=channel_order,
        layout=pre.enum("layout", Layout, Layout.NCHW),
        alpha_order=pre.enum("alpha_order", AlphaOrder, AlphaOrder.BEFORE_RESIZE),
        mean_std_order=mean_std_order,
    )
    pre.done()
    return preprocess


def _rgb_mean_std(pre: _Fields, mean: tuple, std: tuple, channel_order: ChannelOrder) -> tuple[tuple, tuple]:
    """mean and std in RGB order. Before mean_std_order existed, the two normalisation
    paths read a BGR model's uneven mean in different orders; such a profile must now
    say which order it means rather than be guessed."""
    order = pre.get("mean_std_order", str, None)
    if order is None:
        uneven = len(set(mean)) > 1 or len(set(std)) > 1
        if channel_order is ChannelOrder.BGR and uneven:
            raise ConfigError(
                f"{pre.where}: field preprocess.mean_std_order is required when channel_order is BGR "
                "and mean or "
                'std differ per channel: say "RGB" (the timm and Hugging Face convention) or "BGR" '
                "(Caffe's order, e.g. mean = [104, 117, 123])"
            )
        return mean, std
    if order not in ("RGB", "BGR"):
        raise ConfigError(f"{pre.where}: field preprocess.mean_std_order = {order!r}; allowed: RGB, BGR")
    return (mean[::-1], std[::-1]) if order == "BGR" else (mean, std)


def _geometry(pre: _Fields, mean: tuple, value_range: ValueRange) -> dict:
    """width, height, resize size, resize_mode, rounding and pad_color, from whichever
    vocabulary the profile uses; mixing two for one setting is refused by name."""
    where = pre.where
    timm_terms = [k for k in ("crop_pct", "crop_mode") if k in pre.table]
    hf_terms = [k for k in ("size", "crop_size", "do_center_crop") if k in pre.table]
    if timm_terms and hf_terms:
        raise ConfigError(
            f"{where}: fields {', '.join('preprocess.' + k for k in timm_terms + hf_terms)} mix "
            "timm's and Hugging Face's terms: use one"
        )
    for terms in (timm_terms, hf_terms):
        clash = [k for k in ("resize_mode", "resize_size") if terms and k in pre.table]
        if clash:
            raise ConfigError(
                f"{where}: fields preprocess.{clash[0]} and preprocess.{terms[0]} say the same "
                "thing twice: use one"
            )
    if timm_terms:
        width, height, resize, mode, rounding = _timm_geometry(pre)
    elif hf_terms:
        width, height, resize, mode, rounding = _hf_geometry(pre)
    else:
        width, height = _size(pre, "input_size")  # type: ignore[misc]
        resize = _size(pre, "resize_size", None) or (width, height)
        mode = pre.enum("resize_mode", ResizeMode)
        rounding = pre.enum("rounding", Rounding, Rounding.TAGPIPE)
    if timm_terms or hf_terms:
        rounding = pre.enum("rounding", Rounding, rounding)
    border_fill = [round(255 * m) if value_range is ValueRange.UNIT else round(m) for m in mean]
    pad_default = border_fill if timm_terms and mode is ResizeMode.FIT_PAD else [255, 255, 255]
    resize_field = "resize_size"
    if timm_terms:
        resize_field = "crop_pct"
    elif hf_terms:
        resize_field = "size"
    _check_geometry(where, mode, rounding, (width, height), resize, resize_field)
    return dict(
        width=width,
        height=height,
        resize_mode=mode,
        rounding=rounding,
        resize_width=resize[0] if resize != (width, height) else None,
        resize_height=resize[1] if resize != (width, height) else None,
        pad_color=pre.triple("pad_color", int, pad_default),
    )


def _timm_geometry(pre: _Fields) -> tuple:
    """timm's eval transform: scale_size = floor(input_size / crop_pct), then
    center: shortest side to scale_size and centre crop; squash: both sides, then crop;
    border: longest side to scale_size, then centre crop or pad (fill: the mean)."""
    width, height = _size(pre, "input_size")  # type: ignore[misc]
    crop_pct = pre.get("crop_pct", float, TIMM_DEFAULT_CROP_PCT)
    if not 0 < crop_pct <= 1:
        raise ConfigError(
            f"{pre.where}: field preprocess.crop_pct must be in (0, 1] (above 1 torchvision would "
            f"pad after resizing, which tagpipe does not do); got {crop_pct}"
        )
    raw_mode = pre.get("crop_mode", str, "center")
    if raw_mode not in TIMM_CROP_MODES:
        raise ConfigError(
            f"{pre.where}: field preprocess.crop_mode = {raw_mode!r}; allowed: {', '.join(TIMM_CROP_MODES)}"
        )
    resize = (math.floor(width / crop_pct), math.floor(height / crop_pct))
    return width, height, resize, TIMM_CROP_MODES[raw_mode], Rounding.TIMM


def _hf_geometry(pre: _Fields) -> tuple:
    """A Hugging Face image processor's size / crop_size / do_center_crop."""
    size = _size(pre, "size", None)
    if size is None:
        raise ConfigError(f"{pre.where}: field preprocess.size is required with crop_size or do_center_crop")
    shortest_edge = isinstance(pre.table.get("size"), dict) and "shortest_edge" in pre.table["size"]
    crop = _size(pre, "crop_size", None)
    do_crop = pre.get("do_center_crop", bool, crop is not None)
    if do_crop and crop is None:
        raise ConfigError(f"{pre.where}: field preprocess.crop_size is required when do_center_crop is true")
    if shortest_edge and not do_crop:
        raise ConfigError(
            f"{pre.where}: field preprocess.size = {{shortest_edge}} without a centre crop gives every "
            "image another size; add crop_size (a model takes one size)"
        )
    width, height = crop if do_crop and crop is not None else size
    if "input_size" in pre.table and _size(pre, "input_size") != (width, height):
        raise ConfigError(
            f"{pre.where}: field preprocess.input_size disagrees with the size after "
            f"{'crop_size' if do_crop else 'size'} ({width}x{height})"
        )
    pre.seen.add("input_size")
    mode = ResizeMode.RESIZE_CROP if shortest_edge else ResizeMode.SQUASH
    return width, height, size, mode, Rounding.HF


def _check_geometry(
    where: str, mode: ResizeMode, rounding: Rounding, size: tuple, resize: tuple, term: str
) -> None:
    """Geometry the resize and crop cannot do; term: the field the user wrote the resize with."""
    if mode is ResizeMode.PAD_SQUARE and resize != size:
        raise ConfigError(
            f"{where}: field preprocess.{term}: pad_square resizes to the input size; give no resize_size"
        )
    if mode in (ResizeMode.SQUASH, ResizeMode.RESIZE_CROP) and (resize[0] < size[0] or resize[1] < size[1]):
        raise ConfigError(
            f"{where}: field preprocess.{term} gives a resize to {resize[0]}x{resize[1]}, smaller "
            f"than the input size {size[0]}x{size[1]}: the centre crop would need padding"
        )
    if rounding is Rounding.HF and mode is ResizeMode.RESIZE_CROP and resize[0] != resize[1]:
        raise ConfigError(
            f"{where}: field preprocess.{term}: Hugging Face resizes a shortest edge, "
            f"one number; got {resize[0]}x{resize[1]}"
        )
    if rounding is Rounding.HF and mode is ResizeMode.FIT_PAD:
        raise ConfigError(f'{where}: field preprocess.rounding = "hf": Hugging Face has no fit_pad recipe')
