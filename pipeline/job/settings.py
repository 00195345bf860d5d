"""Job settings, parsed once into frozen dataclasses.

The same keys work in a TOML config file (a [tag] table, see configs/) and as CLI
options; the CLI wins. Every bad value is reported with its field name.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import ConfigError
from pipeline.core.progress import DEFAULT_INTERVAL
from pipeline.image.decode import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_FILE_BYTES
from pipeline.image.imaging import DEFAULT_MAX_DECODE_MEMORY, DEFAULT_MAX_PIXELS
from pipeline.model.runtime import ProviderChoice

DEFAULT_DENSE_LOGITS_MAX_TAGS = 4096  # vocabularies this small store every logit by default


@dataclass(frozen=True)
class TagJobConfig:
    inputs: tuple[str, ...]
    output: str
    model: str
    profile: str | None = None  # shipped name or .toml path; None: detected from the bundle
    batch_size: int = 32  # images per model call
    tagger_actors: int = 1  # tagger actor pool size (one ONNX session each)
    gpus_per_actor: float = 1.0  # ignored (CPU fallback) when the cluster has no GPU
    tagger_cpus: float = 1.0  # CPUs per tagger actor; its intra-op threads on CPU
    batches_in_flight: int | None = (
        None  # model calls one tagger actor runs at once; None: 2 on GPU, 1 on CPU
    )
    decode_cpus: float = 1.0  # CPUs per decode task
    decode_batch_size: int = 16  # images per decode task call
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger files are error rows (too_large), never read whole
    decode_timeout: float = (
        DEFAULT_DECODE_TIMEOUT  # seconds one image may take to decode (then an error row); 0: no limit
    )
    batch_timeout: float = (
        600.0  # seconds one model call may take (then its rows are error rows, retried next run); 0: no limit
    )
    rows_per_part: int = 4096  # rows per output part file (the commit unit)
    ray_address: str | None = None  # None: a local Ray; "auto" or an address: a cluster
    storage_options: dict = field(default_factory=dict)  # fsspec options for inputs and output
    exact_decode: bool = False  # full-size decode instead of DCT-scaled JPEG decode
    max_pixels: int = (
        DEFAULT_MAX_PIXELS  # refuse images (or any frame, tile, sub-image) declaring more pixels
    )
    max_decode_memory: int = (
        DEFAULT_MAX_DECODE_MEMORY  # bytes one image's decode may take (then too_large); 0: no limit
    )
    extensions: tuple[str, ...] = ()  # list only files with these extensions under a prefix; (): every file
    list_sidecars: bool = False  # list caption/metadata sidecars (.txt, .json, .npz, ...) as inputs too
    draft_ratio: float = 2.0  # fast decode keeps >= this times the model's resolution (1 = fastest)
    normalise_in_graph: bool = True  # the model takes uint8; Cast/scale nodes are prepended to it
    provider: ProviderChoice = ProviderChoice.AUTO
    threshold: float | None = None  # global threshold; None: the profile's
    logit_floor: float = 0.01  # store logits of tags with probability >= this
    dense_logits: bool | None = (
        None  # store every logit (T float16 per image); None: when T <= dense_logits_max_tags
    )
    dense_logits_max_tags: int = (
        DEFAULT_DENSE_LOGITS_MAX_TAGS  # vocabularies this small store every logit by default
    )
    category_thresholds: dict = field(default_factory=dict)  # {"general": 0.35, ...}; beat the global one
    per_tag_thresholds: bool = False  # the bundle's best_thr per tag
    mcut_categories: tuple[str, ...] = ()  # categories thresholded by MCut
    max_tags: int | None = None  # cap on threshold-selected tags per image
    exclude: tuple[str, ...] = ()  # tags never emitted
    calibrate: bool = True  # apply the bundle's calibration table when it has one
    ood_cut: float | None = None  # ood flag above this distance; None: the reference's p95
    run_id: str | None = None  # None: generated
    max_delete_fraction: float = 0.2  # refuse a run that would delete more of the table (a lost input?)
    progress: bool = True  # a bar on a terminal, else a line every progress_interval seconds
    progress_interval: float = DEFAULT_INTERVAL  # seconds between progress lines off a terminal

    def __post_init__(self):
        checks = [
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("tagger_actors", self.tagger_actors >= 1, "at least 1"),
            ("gpus_per_actor", self.gpus_per_actor >= 0, "0 or more"),
            ("tagger_cpus", self.tagger_cpus > 0, "more than 0"),
            (
                "batches_in_flight",
                self.batches_in_flight is None or 1 <= self.batches_in_flight <= 16,
                "1 to 16",
            ),
            ("decode_cpus", self.decode_cpus > 0, "more than 0"),
            ("decode_batch_size", self.decode_batch_size >= 1, "at least 1"),
            ("max_file_bytes", self.max_file_bytes >= 1, "at least 1 (bytes)"),
            ("decode_timeout", self.decode_timeout >= 0, "seconds, 0 or more (0: no limit)"),
            ("batch_timeout", self.batch_timeout >= 0, "seconds, 0 or more (0: no limit)"),
            ("rows_per_part", self.rows_per_part >= 1, "at least 1"),
            ("max_pixels", self.max_pixels >= 1, "at least 1 (pixels)"),
            (
                "max_decode_memory",
                self.max_decode_memory == 0 or self.max_decode_memory >= 2**20,
                "bytes, at least 1048576 (1 MiB), or 0 for no limit",
            ),
            (
                "extensions",
                all(e.strip(". ") and "/" not in e for e in self.extensions),
                "file extensions such as jpg",
            ),
            ("draft_ratio", 1.0 <= self.draft_ratio <= 16.0, "1 to 16"),
            ("logit_floor", 0.0 <= self.logit_floor <= 1.0, "a probability, 0 to 1"),
            ("dense_logits_max_tags", self.dense_logits_max_tags >= 0, "0 or more (0: never by default)"),
            ("threshold", self.threshold is None or 0.0 <= self.threshold <= 1.0, "a probability, 0 to 1"),
            ("max_tags", self.max_tags is None or self.max_tags >= 1, "at least 1"),
            ("ood_cut", self.ood_cut is None or self.ood_cut >= 0, "0 or more"),
            ("max_delete_fraction", 0.0 <= self.max_delete_fraction <= 1.0, "a fraction, 0 to 1"),
            ("progress_interval", self.progress_interval > 0, "seconds, more than 0"),
            (
                "category_thresholds",
                all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                    for v in self.category_thresholds.values()
                ),
                "a table of category = probability, e.g. { general = 0.35, character = 0.85 }",
            ),
            ("inputs", len(self.inputs) > 0, "at least one input"),
            ("output", bool(self.output), "a directory or URI"),
            ("model", bool(self.model), "a bundle directory"),
        ]
        for name, ok, rule in checks:
            if not ok:
                value = getattr(self, name)
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(f"field {name} has a bad value: {shown!r} (must be {rule})")

    def dense_logits_for(self, tags: int) -> bool:
        """Whether rows store every logit: as asked, else for small vocabularies, where a
        row of every probability costs little (4,096 float16 = 8 KiB) and is what a user
        of a 2- or 1,000-class model reads."""
        return self.dense_logits if self.dense_logits is not None else tags <= self.dense_logits_max_tags


def tag_rules(cfg) -> dict:
    """The TagRules fields a tag or rethreshold config sets (None: the profile's)."""
    rules = dict(
        category_thresholds={k: float(v) for k, v in cfg.category_thresholds.items()} or None,
        per_tag_thresholds=cfg.per_tag_thresholds,
        mcut_categories=tuple(cfg.mcut_categories),
        max_tags=cfg.max_tags,
        exclude=frozenset(cfg.exclude),
        calibrate=cfg.calibrate,
        ood_cut=cfg.ood_cut,
        default_threshold=cfg.threshold,
        logit_floor=cfg.logit_floor,
    )
    return {k: v for k, v in rules.items() if v is not None}


def _coerce(cls, name: str, value):
    """Check and convert one value to a field's type; errors name the field."""
    hint = typing.get_type_hints(cls)[name]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"field {name} must not be empty")
    base = (
        next((a for a in args if a is not type(None)), hint) if optional or origin is typing.Union else hint
    )
    base_origin = typing.get_origin(base)
    try:
        if isinstance(base, type) and issubclass(base, enum.Enum):
            return base(value)
        if base is bool:
            if isinstance(value, str):
                value = {"true": True, "false": False, "1": True, "0": False}[value.lower()]
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if base is dict or base_origin is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise TypeError
            return value
        if base_origin is tuple:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
    except (TypeError, ValueError, KeyError):
        allowed = (
            f" (allowed: {', '.join(m.value for m in base)})"
            if isinstance(base, type) and issubclass(base, enum.Enum)
            else ""
        )
        if base is dict or base_origin is dict:
            allowed = (
                " (must be a table of category = probability, e.g. { general = 0.35, character = 0.85 })"
                if name == "category_thresholds"
                else " (must be a table)"
            )
        raise ConfigError(f"field {name} has a bad value: {value!r}{allowed}") from None
    return value


def load_config_file(path: str | Path, table: str = "tag") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _check_sections(data, path)
    section = data.get(table, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [{table}] must be a table")
    base = path.parent
    # relative paths in a config file are relative to the file, as users expect
    for key in ("output", "model"):
        if (
            isinstance(section.get(key), str)
            and "://" not in section[key]
            and not os.path.isabs(section[key])
        ):
            section[key] = str(base / section[key])
    if isinstance(section.get("inputs"), str):
        section["inputs"] = [section["inputs"]]
    if isinstance(section.get("inputs"), list):
        section["inputs"] = [
            v if not isinstance(v, str) or "://" in v or os.path.isabs(v) else str(base / v)
            for v in section["inputs"]
        ]
    return section


SECTIONS = ("tag", "nightly")


def nearest(name: str, choices) -> str | None:
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def suggestion(name: str, choices) -> str:
    """' (did you mean X?)' for the nearest valid name, or ''."""
    close = nearest(name, choices)
    return f" (did you mean {close}?)" if close else ""


def _check_sections(data: dict, path: Path) -> None:
    """Every top-level name of a config file is a known table: a misspelled [nighlty]
    is an error, not a section silently ignored, and a key above any table says where
    it belongs."""
    tag_fields = {f.name for f in dataclasses.fields(TagJobConfig)}
    nightly_fields = {f.name for f in dataclasses.fields(NightlyConfig)} - {"tag"}
    for name, value in data.items():
        if name in SECTIONS:
            continue
        if isinstance(value, dict):
            close = nearest(name, SECTIONS)
            hint = (
                f"did you mean [{close}]?"
                if close
                else "the tables are " + ", ".join(f"[{t}]" for t in SECTIONS)
            )
            raise ConfigError(f"{path}: unknown table [{name}] ({hint})")
        home = "tag" if name in tag_fields else "nightly" if name in nightly_fields else None
        if home:
            raise ConfigError(f"{path}: key {name} is outside any table; it belongs under [{home}]")
        raise ConfigError(
            f"{path}: unknown key {name} outside any table{suggestion(name, tag_fields | nightly_fields)}"
        )


# Options of the command itself, not settings of the job: they have no config key.
COMMAND_LINE_ONLY = frozenset({"config", "dry_run", "verbose", "quiet", "log_format", "version", "help"})


def _unknown_fields(unknown: list[str], names: set[str], where: str) -> ConfigError:
    def hint(name: str) -> str:
        if name.replace("-", "_") in COMMAND_LINE_ONLY:
            return f" (--{name.replace('_', '-')} is a command-line option only)"
        return suggestion(name, names)

    return ConfigError(f"unknown field(s){where}: {', '.join(f'{name}{hint(name)}' for name in unknown)}")


def make_tag_config(file_values: dict | None = None, **overrides) -> TagJobConfig:
    """File values, then explicit overrides (None means 'not given')."""
    merged = dict(file_values or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(TagJobConfig)}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise _unknown_fields(unknown, names, " in [tag]")
    for required in ("inputs", "output", "model"):
        if required not in merged:
            raise ConfigError(
                f"field {required} is required (option --{required.rstrip('s')} or the config file)"
            )
    values = {name: _coerce(TagJobConfig, name, value) for name, value in merged.items()}
    values["inputs"] = tuple(_normalise_local(v) for v in values["inputs"])
    return TagJobConfig(**values)


def _normalise_local(uri: str) -> str:
    """One spelling per local input (absolute, no `..`): rows are keyed by uri, so the
    same folder given as `imgs`, `./imgs` or `cfg/../imgs` must list the same uris."""
    if "://" in uri:
        return uri
    return os.path.normpath(os.path.abspath(uri))


@dataclass(frozen=True)
class NightlyConfig:
    """The [nightly] table: what runs after tagging. Paths default to siblings of the
    tag output (<output>-dedup, <output>-splits)."""

    tag: TagJobConfig
    dedup_output: str = ""
    splits_output: str = ""
    ratios: str = "train=0.9,val=0.05,test=0.05"
    seed: int = 0
    stratify: bool = False
    min_val_positives: int = 0
    max_distance: int = 6  # dedup radius, also used by split --exclude and the audit
    embedding_threshold: str = "auto"  # dedup and audit: a cosine, "auto" (from the data) or "off"
    group_column: str = ""  # split: images sharing this metadata column's value never cross splits
    metadata: str = ""  # Parquet/CSV with uri and group_column
    exclude: tuple[str, ...] = ()  # existing training sets: kept out of val/test and audited against
    fail_on_leaks: bool = True  # exit 1 when the audit finds leaks (after writing everything)

    def __post_init__(self):
        base = self.tag.output.rstrip("/")
        if not self.dedup_output:
            object.__setattr__(self, "dedup_output", f"{base}-dedup")
        if not self.splits_output:
            object.__setattr__(self, "splits_output", f"{base}-splits")
        for name, ok in (
            ("max_distance", 0 <= self.max_distance <= 32),
            ("min_val_positives", self.min_val_positives >= 0),
        ):
            if not ok:
                raise ConfigError(f"field nightly.{name} has a bad value: {getattr(self, name)!r}")
        from pipeline.corpus.dedup import parse_embedding_threshold
        from pipeline.corpus.split import parse_ratios

        try:
            parse_ratios(self.ratios)
        except Exception as exc:
            raise ConfigError(f"field nightly.ratios has a bad value: {self.ratios!r} ({exc})") from None
        try:
            parse_embedding_threshold(self.embedding_threshold)
        except Exception:
            raise ConfigError(
                f"field nightly.embedding_threshold has a bad value: {self.embedding_threshold!r} "
                "(must be a cosine in (0, 1], auto or off)"
            ) from None
        if bool(self.group_column) != bool(self.metadata):
            raise ConfigError("field nightly.group_column needs nightly.metadata (and the other way round)")


def load_nightly_config(path: str | Path, **tag_overrides) -> NightlyConfig:
    """A config file with [tag] and [nightly] tables; relative paths are relative to it."""
    tag = make_tag_config(load_config_file(path, "tag"), **tag_overrides)
    section = load_config_file(path, "nightly")
    base = Path(path).parent
    if isinstance(section.get("embedding_threshold"), (int, float)) and not isinstance(
        section.get("embedding_threshold"), bool
    ):
        section["embedding_threshold"] = str(section["embedding_threshold"])  # a number in TOML: a cosine
    for key in ("dedup_output", "splits_output", "metadata"):
        if (
            isinstance(section.get(key), str)
            and section[key]
            and "://" not in section[key]
            and not os.path.isabs(section[key])
        ):
            section[key] = str(base / section[key])
    if isinstance(section.get("exclude"), list):
        section["exclude"] = [
            v if not isinstance(v, str) or "://" in v or os.path.isabs(v) else str(base / v)
            for v in section["exclude"]
        ]
    names = {f.name for f in dataclasses.fields(NightlyConfig)} - {"tag"}
    unknown = sorted(set(section) - names)
    if unknown:
        raise _unknown_fields(unknown, names, " in [nightly]")
    values = {name: _coerce(NightlyConfig, name, value) for name, value in section.items()}
    return NightlyConfig(tag=tag, **values)
