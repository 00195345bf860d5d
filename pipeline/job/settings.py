"""The tag and nightly jobs' settings: one typed field per setting, defined here only.

The same names are keys of a TOML config file ([tag] and [nightly], see configs/; the
nightly's [nightly.dedup], [nightly.split], [nightly.audit] and [nightly.drift] tables are
the corpus stages' own settings models, pipeline/corpus/*_settings.py and drift.py) and
(for [tag]) options of `tagpipe tag`; the command line wins. pipeline/cli/common.py builds the
options from these fields, and the README's options table and the example configs are
generated from them (`python -m pipeline.cli.docs --write`; tests compare). Each
field says which table key it joins (pipeline/core/settings.py, KeyRole). Every bad
value is a one-line error naming the field.

To add a tag setting: add one field below (type, default, constraints, description,
Setting), regenerate the docs, and test what it does.

Why this module is long: it is the settings themselves, one field each with its type,
default, constraints, description and key role; the loading code around them is short.
"""

from __future__ import annotations

import enum
import os
import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from pipeline.core.errors import ConfigError, ExitStatus
from pipeline.core.progress import DEFAULT_INTERVAL
from pipeline.core.settings import (
    KeyRole,
    Setting,
    SettingsModel,
    StorageOptions,
    build,
    nearest,
    one_or_many,
    parse_storage_options,
    suggestion,
)
from pipeline.corpus.audit_settings import AuditOptions, AuditSettings
from pipeline.corpus.dedup_settings import DedupOptions, DedupSettings
from pipeline.corpus.drift import DriftSettings
from pipeline.corpus.label_settings import LabelCheckSettings
from pipeline.corpus.split_settings import SplitOptions, SplitSettings
from pipeline.image.decode import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_FILE_BYTES
from pipeline.image.imaging import DEFAULT_MAX_DECODE_MEMORY, DEFAULT_MAX_PIXELS
from pipeline.model import rules as rule_fields
from pipeline.model.rules import RuleSettings
from pipeline.model.runtime import ProviderChoice

NONE, INFERENCE = KeyRole.NONE, KeyRole.INFERENCE
DRIFT_EXIT_STATUS = int(ExitStatus.DRIFT)  # nightly's drift (every status: core/errors.py ExitStatus)
DEFAULT_DENSE_LOGITS_MAX_TAGS = 4096  # vocabularies this small store every logit by default


def _normalise_local(uris: tuple[str, ...]) -> tuple[str, ...]:
    """One spelling per local input (absolute, no `..`): rows are keyed by uri, so the
    same folder given as `imgs`, `./imgs` or `cfg/../imgs` must list the same uris."""
    return tuple(u if "://" in u else os.path.normpath(os.path.abspath(u)) for u in uris)


def _extensions(values: tuple[str, ...]) -> tuple[str, ...]:
    if not all(e.strip(". ") and "/" not in e for e in values):
        raise ValueError("must be file extensions such as jpg")
    return values


def _decode_memory(value: int) -> int:
    if value != 0 and value < 2**20:
        raise ValueError("must be bytes, at least 1048576 (1 MiB), or 0 for no limit")
    return value


class DecodePlacement(enum.StrEnum):
    """Where images are decoded: in the tagger actors (fused) or in tasks of their own (split)."""

    AUTO = "auto"
    FUSED = "fused"
    SPLIT = "split"


class TagJobConfig(SettingsModel):
    """Everything `tagpipe tag` does, as one frozen object (also [tag] of a config file)."""

    inputs: Annotated[
        tuple[str, ...],
        BeforeValidator(one_or_many),
        AfterValidator(_normalise_local),
        Field(
            min_length=1,
            description="a prefix on any fsspec filesystem (local, `s3://`), an image file, or a manifest "
            "(`.parquet`/`.csv` with a `uri` column, `.txt` one URI per line), repeatable. Every file under "
            "a prefix is an input and gets a row, except OS and sync debris and tagpipe's own outputs "
            "(see [What gets a row](#what-gets-a-row))",
        ),
        Setting(NONE, flags=("--inputs", "--input", "-i"), metavar="URI"),
    ]
    output: Annotated[
        str,
        Field(min_length=1, description="output directory (local or `s3://`)"),
        Setting(NONE, flags=("--output", "-o")),
    ]
    model: Annotated[
        tuple[str, ...],
        BeforeValidator(one_or_many),
        Field(
            min_length=1,
            description="model bundle directory, repeatable: several models tag in one pass, each into its "
            "own table `OUTPUT/<model name>/`, and each image is read once and decoded once per distinct "
            "preprocessing",
        ),
        Setting(
            INFERENCE,
            flags=("--model", "-m"),
            metavar="DIR",
            key_via="the bundle's fingerprint (model_sha256)",
        ),
    ]
    profile: Annotated[
        tuple[str, ...],
        BeforeValidator(one_or_many),
        Field(
            description="shipped profile name (`cl_tagger_v2`, `wd_v3`, `joytag`, `jtp1`) or a `.toml` file; "
            "with several models, one per `--model`, in order"
        ),
        Setting(INFERENCE, default_text="detected", key_via="the resolved profile (profile_key)"),
    ] = ()
    batch_size: Annotated[int, Field(ge=1, description="images per model call"), Setting(NONE)] = 32
    tagger_actors: Annotated[
        int,
        Field(ge=1, description="tagger actors (one ONNX Runtime session each)"),
        Setting(NONE, flags=("--tagger-actors", "--actors")),
    ] = 1
    gpus_per_actor: Annotated[
        float,
        Field(ge=0, description="GPUs per tagger actor; with no GPU in the cluster the actors run on CPU"),
        Setting(NONE),
    ] = 1.0
    tagger_cpus: Annotated[
        float,
        Field(gt=0, description="CPUs per tagger actor (its intra-op threads on CPU)"),
        Setting(NONE),
    ] = 1.0
    batches_in_flight: Annotated[
        int | None,
        Field(
            ge=1,
            le=16,
            description="model calls one tagger actor runs at once, so its CPU work overlaps the model's",
        ),
        Setting(NONE, default_text="2 on GPU, 1 on CPU"),
    ] = None
    decode_placement: Annotated[
        DecodePlacement,
        Field(
            description="`fused`: each tagger actor decodes its own batches (pixels never cross the object "
            "store); `split`: decode tasks feed the tagger actors; `auto`: fused without a GPU, split with "
            "one (docs/decisions.md, 'Fused decode and tag')"
        ),
        Setting(NONE),
    ] = DecodePlacement.AUTO
    decode_cpus: Annotated[float, Field(gt=0, description="CPUs per decode task"), Setting(NONE)] = 1.0
    max_decode_tasks: Annotated[
        int | None,
        Field(
            ge=1,
            description="decode tasks running at once, at most; a cap bounds the memory decode takes and the "
            "requests it makes of the object store (a rate-limited bucket)",
        ),
        Setting(NONE, default_text="one per free CPU"),
    ] = None
    decode_batch_size: Annotated[int, Field(ge=1, description="images per decode call"), Setting(NONE)] = 16
    rows_per_part: Annotated[
        int, Field(ge=1, description="rows per output part file (the commit unit)"), Setting(NONE)
    ] = 4096
    max_delete_fraction: Annotated[
        float,
        Field(
            ge=0.0,
            le=1.0,
            description="refuse (changing nothing) a run that would drop more than this share of the table's "
            "rows: a missing or misspelled input looks like a mass deletion",
        ),
        Setting(NONE),
    ] = 0.2
    allow_empty: Annotated[
        bool,
        Field(
            description="commit a version when the inputs list no file at all (by default such a run is "
            "refused, exit 2, committing nothing: an empty folder or a typo looks like success)"
        ),
        Setting(NONE, default_text="refuse"),
    ] = False
    ray_address: Annotated[
        str | None,
        Field(description="`auto` or an address joins an existing cluster; `RAY_ADDRESS` works too"),
        Setting(NONE, default_text="local Ray"),
    ] = None
    preflight: Annotated[
        bool,
        Field(
            description="before the listing (on a cluster, right after joining it) the driver, then one Ray "
            "task on every node, read one object of each input and create and delete a probe object under "
            "the output: a node that cannot stops the run with one line naming the node, the uri and the "
            "cause (exit 2), nothing listed or written; a few requests per node"
        ),
        Setting(NONE, negative="--no-preflight", default_text="check"),
    ] = True
    storage_options: Annotated[
        dict,
        BeforeValidator(parse_storage_options),
        Field(
            default_factory=dict,
            description="fsspec options as JSON; the standard `AWS_*` variables (incl. `AWS_ENDPOINT_URL`) "
            "need no flag. A missing bucket, missing credentials, an unreachable endpoint "
            "or a refused request "
            "stops the command with one `error:` line naming the bucket and endpoint (exit 2); tagpipe never "
            "creates a bucket",
        ),
        Setting(NONE),
    ]
    exact_decode: Annotated[
        bool,
        Field(
            description="fast: large JPEGs decoded with DCT scaling (libjpeg-turbo) to >= `--draft-ratio` x "
            "the model size; exact: full-size decode, the published recipe to within 1 level, "
            "imagehash-exact phash"
        ),
        Setting(INFERENCE, negative="--fast-decode", default_text="fast"),
    ] = False
    draft_ratio: Annotated[
        float,
        Field(
            ge=1.0,
            le=16.0,
            description="fast decode keeps at least this times the model's resolution; 1 is faster on "
            "3 MP JPEGs and still agrees on tags (docs/benchmarks.md, 'Decode + preprocess, 3 MP JPEGs')",
        ),
        Setting(INFERENCE),  # keyed as None under exact_decode, where it does nothing
    ] = 2.0
    max_pixels: Annotated[
        int,
        Field(
            ge=1,
            description="images declaring more pixels, in any frame, tile or sub-image (ICO, ICNS, GIF, "
            "TIFF), are refused before decoding (decompression bombs)",
        ),
        Setting(INFERENCE),
    ] = DEFAULT_MAX_PIXELS
    max_decode_memory: Annotated[
        int,
        AfterValidator(_decode_memory),
        Field(
            description="bytes one image's decode may add to its worker (an address-space limit while it "
            "decodes); over it the image is a `too_large` row and the worker lives on; 0: no limit"
        ),
        Setting(INFERENCE, key_since=2),
    ] = DEFAULT_MAX_DECODE_MEMORY
    max_file_bytes: Annotated[
        int,
        Field(ge=1, description="larger files are `too_large` rows, never read whole"),
        Setting(INFERENCE, key_since=2),
    ] = DEFAULT_MAX_FILE_BYTES
    decode_timeout: Annotated[
        float,
        Field(
            ge=0, description="seconds one image may take to decode, then a `decode_timeout` row; 0: no limit"
        ),
        Setting(NONE),
    ] = DEFAULT_DECODE_TIMEOUT
    batch_timeout: Annotated[
        float,
        Field(
            ge=0,
            description="seconds one model call may take, then its rows are `model_timeout` rows (retried "
            "by the next run); 0: no limit",
        ),
        Setting(NONE),
    ] = 600.0
    edit_calibration_images: Annotated[
        int,
        Field(
            ge=0,
            description="images sampled (the same ones every run) when the first version of an inference "
            "key is committed: each gets 12 standard edits (crops, flip, half size, JPEG q30, border, text "
            "band, greyscale, brightness, 5-degree turn), tagged with the run's decode and model; each "
            "copy's embedding cosine to its original goes to `OUTPUT/_calibration/<inference key>.parquet`, "
            "for dedup's threshold; 0: off",
        ),
        Setting(NONE),
    ] = 200
    list_sidecars: Annotated[
        bool,
        Field(
            description="list caption and metadata files beside the images as inputs (see "
            "[What gets a row](#what-gets-a-row))"
        ),
        Setting(NONE, negative="--skip-sidecars", default_text="skip"),
    ] = False
    extensions: Annotated[
        tuple[str, ...],
        BeforeValidator(one_or_many),
        AfterValidator(_extensions),
        Field(
            description="list only files with this extension under a prefix, repeatable (e.g. `--extension "
            "jpg --extension png`; case and a leading dot do not matter)"
        ),
        Setting(NONE, flags=("--extensions", "--extension"), metavar="EXT", default_text="every file"),
    ] = ()
    normalise_in_graph: Annotated[
        bool,
        Field(
            description="the model is fed uint8: Cast/scale/transpose nodes are prepended to it in memory "
            "(weights untouched), so normalisation runs on the GPU"
        ),
        Setting(NONE, negative="--normalise-in-numpy", default_text="in graph"),
    ] = True
    provider: Annotated[
        ProviderChoice,
        Field(
            description="`auto` (CUDA where a GPU really works, else CPU), `cpu`, `cuda`, `tensorrt`",
        ),
        Setting(NONE),
    ] = ProviderChoice.AUTO
    threshold: rule_fields.Threshold
    logit_floor: rule_fields.LogitFloor
    dense_logits: Annotated[
        bool | None,
        Field(
            description="store every logit (T float16 per image), so every tag's probability is in every row"
        ),
        Setting(
            INFERENCE,
            negative="--sparse-logits",
            default_text="dense for at most `--dense-logits-max-tags` tags, else sparse",
        ),  # keyed as resolved for the model (dense_logits_for)
    ] = None
    dense_logits_max_tags: Annotated[
        int,
        Field(ge=0, description="vocabularies this small store every logit by default"),
        Setting(INFERENCE, key_via="dense_logits, as resolved for the model"),
    ] = DEFAULT_DENSE_LOGITS_MAX_TAGS
    run_id: Annotated[
        str | None,
        Field(description="run id recorded in rows and the run manifest"),
        Setting(NONE, default_text="timestamp"),
    ] = None
    category_thresholds: rule_fields.CategoryThresholds
    per_tag_thresholds: rule_fields.PerTagThresholds
    mcut_categories: rule_fields.McutCategories
    max_tags: rule_fields.MaxTags
    exclude: rule_fields.Exclude
    calibrate: rule_fields.Calibrate
    ood_cut: rule_fields.OodCut
    progress: Annotated[
        bool,
        Field(
            description="a bar with rate and ETA on a terminal; elsewhere (a Ray job log, a pod log, a file) "
            "a line every `--progress-interval` seconds"
        ),
        Setting(NONE, negative="--no-progress"),
    ] = True
    progress_interval: Annotated[
        float, Field(gt=0, description="seconds between progress lines off a terminal"), Setting(NONE)
    ] = DEFAULT_INTERVAL
    source_tags: Annotated[
        str | None,
        Field(
            description="human tags to check against the model's (Parquet or CSV: a uri column and a list "
            "or separated string of tags): every row gets `source_tags`, `likely_missing`, `likely_wrong` "
            "and `label_quality` (see [Source tags](#source-tags-where-humans-and-the-model-disagree)), "
            "kept in the table's label sidecar "
            "(`_labels/`, joined by uri): a changed source file rewrites label files, never a part"
        ),
        Setting(NONE, metavar="FILE", default_text="none"),
    ] = None
    tag_aliases: Annotated[
        str | None,
        Field(description="tag alias map applied to the source tags (Danbooru's CSV, or a JSON object)"),
        Setting(NONE, metavar="FILE", default_text="none"),
    ] = None
    labels: Annotated[
        LabelCheckSettings,
        Field(
            description="the [tag.labels] table: how source tags are read and judged (the options of "
            "`tagpipe compare-tags`)"
        ),
        Setting(NONE, cli=False),
    ] = LabelCheckSettings.model_validate({})

    @model_validator(mode="after")
    def _profiles_per_model(self) -> TagJobConfig:
        if self.profile and len(self.profile) != len(self.model):
            raise ValueError(
                f"profile: {len(self.profile)} given for {len(self.model)} models; give one per --model, "
                "in order, or none (detected)"
            )
        if len(set(self.model)) != len(self.model):
            raise ValueError("model: the same bundle is given twice")
        return self

    @property
    def rules(self) -> RuleSettings:
        return RuleSettings.of(self)

    def for_model(self, index: int, output: str) -> TagJobConfig:
        """The settings of one model of a multi-model run: its bundle, its profile, its table."""
        profile = (self.profile[index],) if self.profile else ()
        return self.model_copy(update={"model": (self.model[index],), "profile": profile, "output": output})

    def dense_logits_for(self, tags: int) -> bool:
        """Whether rows store every logit: as asked, else for small vocabularies, where a
        row of every probability costs little (4,096 float16 = 8 KiB) and is what a user
        of a 2- or 1,000-class model reads."""
        return self.dense_logits if self.dense_logits is not None else tags <= self.dense_logits_max_tags


# Options of the command itself, not settings of the job: they have no config key.
COMMAND_LINE_ONLY = frozenset({"config", "dry_run", "verbose", "quiet", "log_format", "version", "help"})


def _command_line_hint(name: str) -> str:
    if name.replace("-", "_") in COMMAND_LINE_ONLY:
        return f" (--{name.replace('_', '-')} is a command-line option only)"
    return ""


def make_tag_config(file_values: dict | None = None, **overrides) -> TagJobConfig:
    """File values, then explicit overrides (None means 'not given')."""
    merged = dict(file_values or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    missing = [name for name in ("inputs", "output", "model") if name not in merged]
    if missing and set(merged) <= set(TagJobConfig.model_fields):  # unknown names are said first
        flag = "--" + missing[0].rstrip("s")
        raise ConfigError(f"field {missing[0]} is required (option {flag} or the config file)")
    return build(TagJobConfig, merged, " in [tag]", hints=_command_line_hint)


class _RethresholdInputs(SettingsModel):
    tags: Annotated[
        str, Field(min_length=1, description="a tag output directory (local or `s3://`)"), Setting(NONE)
    ]
    model: Annotated[
        str,
        Field(min_length=1, description="the bundle that made it (its calibration/OOD files may be new)"),
        Setting(NONE, flags=("--model", "-m")),
    ]
    output: Annotated[
        str | None,
        Field(description="a new table for the result"),
        Setting(NONE, flags=("--output", "-o"), default_text="a new version of --tags itself"),
    ] = None


class RethresholdSettings(RuleSettings, _RethresholdInputs):
    """What `tagpipe rethreshold` takes (its options come from these fields): the table
    and its bundle, the rule settings (as `tag`'s), and where it runs."""

    storage_options: StorageOptions
    ray_address: Annotated[
        str | None,
        Field(description="`auto` or an address joins an existing cluster; `RAY_ADDRESS` works too"),
        Setting(NONE, default_text="local Ray"),
    ] = None

    @property
    def rules(self) -> RuleSettings:
        return RuleSettings.of(self)


def make_rethreshold_settings(config: Path | None, given: dict) -> RethresholdSettings:
    """The command line's values over a config file's [tag] table, which is checked as a
    tag config is; its rule, storage and Ray settings apply."""
    values: dict = {}
    if config is not None:
        table = given.get("tags", "")
        tag = make_tag_config(
            load_config_file(config), inputs=[table], output=table, model=given.get("model")
        )
        shared = set(RethresholdSettings.model_fields) & set(TagJobConfig.model_fields) - {"model", "output"}
        values = {name: getattr(tag, name) for name in shared}
    return build(RethresholdSettings, {**values, **given})


class NightlyConfig(SettingsModel):
    """The [nightly] table: what runs after tagging. Paths default to siblings of the
    tag output (<output>-dedup, <output>-splits)."""

    tag: TagJobConfig
    dedup_output: Annotated[
        str,
        Field(description="dedup's output folder; default: <output>-dedup"),
        Setting(NONE, cli=False),
    ] = ""
    splits_output: Annotated[
        str,
        Field(
            description="the splits' folder; default: <output>-splits; "
            "its splits.parquet is the next --previous"
        ),
        Setting(NONE, cli=False),
    ] = ""
    dedup: Annotated[
        DedupOptions,
        Field(description="the [nightly.dedup] table: how dedup joins copies (options of `tagpipe dedup`)"),
        Setting(NONE, cli=False),
    ] = DedupOptions.model_validate({})
    split: Annotated[
        SplitOptions,
        Field(
            description="the [nightly.split] table: how the split is drawn (options of `tagpipe split`); "
            "its max_distance is [nightly.dedup]'s unless given"
        ),
        Setting(NONE, cli=False),
    ] = SplitOptions.model_validate({})
    audit: Annotated[
        AuditOptions,
        Field(
            description="the [nightly.audit] table (options of `tagpipe audit`; the embedding threshold is "
            "the one dedup used); its max_distance is [nightly.dedup]'s unless given"
        ),
        Setting(NONE, cli=False),
    ] = AuditOptions.model_validate({})
    fail_on_leaks: Annotated[
        bool,
        Field(description="exit 1 when the audit finds leaks (after writing everything)"),
        Setting(NONE, cli=False),
    ] = True
    fail_on_unchecked: Annotated[
        bool,
        Field(
            description=f"exit {int(ExitStatus.UNCHECKED)} when an audit found no leak but could not check "
            "every val/test image by every signal it was asked to use (after writing everything; leaks' "
            "exit 1 comes first, drift's after)"
        ),
        Setting(NONE, cli=False),
    ] = True
    drift: Annotated[
        DriftSettings,
        Field(
            description="the [nightly.drift] table: when a rate moved between the run's version and "
            "the one before, and which moves are drift (pipeline/corpus/drift.py)"
        ),
        Setting(NONE, cli=False),
    ] = DriftSettings()
    fail_on_drift: Annotated[
        bool,
        Field(
            description=f"exit {DRIFT_EXIT_STATUS} when the run's version drifted past the [nightly.drift] "
            "limits (after writing everything; leaks' exit 1 comes first)"
        ),
        Setting(NONE, cli=False),
    ] = True

    @model_validator(mode="after")
    def _defaults_and_pairs(self) -> NightlyConfig:
        if len(self.tag.model) != 1:
            raise ValueError(
                f"tag.model: nightly takes one model, {len(self.tag.model)} were given (`tagpipe tag` takes "
                "several; dedup, split and audit read one table's embeddings)"
            )
        base = self.tag.output.rstrip("/")
        if not self.dedup_output:
            object.__setattr__(self, "dedup_output", f"{base}-dedup")
        if not self.splits_output:
            object.__setattr__(self, "splits_output", f"{base}-splits")
        for name in ("split", "audit"):  # the radius dedup joined at, unless the table says otherwise
            table = getattr(self, name)
            if "max_distance" not in table.model_fields_set:
                radius = {"max_distance": self.dedup.max_distance}
                object.__setattr__(self, name, table.model_copy(update=radius))
        return self

    def dedup_settings(self) -> DedupSettings:
        """Dedup of the tag table into dedup_output, as [nightly.dedup] says."""
        paths = {"tags": self.tag.output, "output": self.dedup_output, "ray_address": self.tag.ray_address}
        values = {**self.dedup.model_dump(), **paths, "storage_options": self.tag.storage_options}
        return DedupSettings.model_validate(values)

    def split_settings(self, previous: str | None) -> SplitSettings:
        """The split of the tag table by dedup's clusters into splits_output, as [nightly.split] says."""
        paths = {"tags": self.tag.output, "dedup": self.dedup_output, "output": self.splits_output}
        values = {**self.split.model_dump(), **paths, "previous": previous}
        return SplitSettings.model_validate({**values, "storage_options": self.tag.storage_options})

    def audit_settings(self, train: str, evaluation: str, output: str, **values) -> AuditSettings:
        """An audit of the split's eval rows against `train`, as [nightly.audit] says."""
        sides = {"train": train, "eval": evaluation, "output": output, "tags": self.tag.output}
        values = {**self.audit.model_dump(), **sides, **values, "storage_options": self.tag.storage_options}
        return AuditSettings.model_validate(values)


# [nightly] keys of older configs, each now a key of these tables (max_distance of all three)
OLD_NIGHTLY_KEYS = {
    "ratios": ("split",),
    "seed": ("split",),
    "stratify": ("split",),
    "min_val_positives": ("split",),
    "group_column": ("split",),
    "metadata": ("split",),
    "exclude": ("split",),
    "max_distance": ("dedup", "split", "audit"),
    "embedding_threshold": ("dedup",),
}
NIGHTLY_TABLES: dict[str, type[SettingsModel]] = {
    "dedup": DedupOptions,
    "split": SplitOptions,
    "audit": AuditOptions,
    "drift": DriftSettings,
}


SECTIONS = ("tag", "nightly")


def load_config_file(path: str | Path, table: str = "tag") -> dict:
    """The [table] of a TOML config file as plain values, relative paths made relative
    to the file, as users expect."""
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
    keys = (
        ("output", "source_tags", "tag_aliases")
        if table == "tag"
        else ("dedup_output", "splits_output", "metadata")
    )
    lists = ("inputs", "model") if table == "tag" else ("exclude",)
    if table == "tag" and "labels" in section:  # its own table: errors name [tag.labels] and its fields
        if not isinstance(section["labels"], dict):
            raise ConfigError(f"{path}: [tag.labels] must be a table")
        section["labels"] = build(
            LabelCheckSettings, section["labels"], " in [tag.labels]", prefix="tag.labels."
        )
    _relative_paths(section, keys, lists, path.parent)
    if table == "nightly" and isinstance(section.get("split"), dict):
        _relative_paths(section["split"], ("metadata",), ("exclude",), path.parent)
    return section


def _relative_paths(section: dict, keys: tuple[str, ...], lists: tuple[str, ...], base: Path) -> None:
    for key in keys:
        if section.get(key) is not None:
            section[key] = _relative_to(base, section[key])
    for key in lists:
        value = one_or_many(section.get(key))
        if isinstance(value, list):
            section[key] = [_relative_to(base, v) for v in value]


def _relative_to(base: Path, value):
    if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
        return str(base / value)
    return value


def _check_sections(data: dict, path: Path) -> None:
    """Every top-level name of a config file is a known table: a misspelled [nighlty]
    is an error, not a section silently ignored, and a key above any table says where
    it belongs."""
    tag_fields = set(TagJobConfig.model_fields)
    nightly_fields = set(NightlyConfig.model_fields) - {"tag"} | set(OLD_NIGHTLY_KEYS)
    for name, value in data.items():
        if name in SECTIONS:
            continue
        if isinstance(value, dict):
            close = nearest(name, SECTIONS)
            tables = ", ".join(f"[{t}]" for t in SECTIONS)
            hint = f"did you mean [{close}]?" if close else f"the tables are {tables}"
            raise ConfigError(f"{path}: unknown table [{name}] ({hint})")
        for home, fields in (("tag", tag_fields), ("nightly", nightly_fields)):
            if name in fields:
                raise ConfigError(f"{path}: key {name} is outside any table; it belongs under [{home}]")
        known = tag_fields | nightly_fields
        raise ConfigError(f"{path}: unknown key {name} outside any table{suggestion(name, known)}")


def load_nightly_config(path: str | Path, **tag_overrides) -> NightlyConfig:
    """A config file with [tag] and [nightly] tables; relative paths are relative to it.
    A key of an older config's [nightly] (ratios, max_distance, ...) is read into the
    table it now belongs to; given in both places, it is an error."""
    tag = make_tag_config(load_config_file(path, "tag"), **tag_overrides)
    section = load_config_file(path, "nightly")
    if "tag" in section:
        raise ConfigError("unknown field(s) in [nightly]: tag")
    old = {key: section.pop(key) for key in OLD_NIGHTLY_KEYS if key in section}
    for name, model in NIGHTLY_TABLES.items():  # its own table: errors name [nightly.x] and its fields
        table = section.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [nightly.{name}] must be a table")
        moved = {key: value for key, value in old.items() if name in OLD_NIGHTLY_KEYS[key]}
        if moved:
            build(model, moved, " in [nightly]", prefix="nightly.")  # errors name the key as written
        both = sorted(set(moved) & set(table))
        if both:
            raise ConfigError(
                f"{path}: nightly.{both[0]} and nightly.{name}.{both[0]} are one setting: give it once, "
                f"in [nightly.{name}]"
            )
        if table or moved:
            where, prefix = f" in [nightly.{name}]", f"nightly.{name}."
            section[name] = build(model, {**moved, **table}, where, prefix=prefix)
    return build(NightlyConfig, {**section, "tag": tag}, " in [nightly]", prefix="nightly.")
