"""What `tagpipe split` takes (SplitSettings).

SplitOptions are how the split is drawn, the [nightly.split] table of a nightly config
(the nightly gives the split its table, dedup output, folder and previous split);
SplitSettings adds what the command names itself. The command's options and the
README's table come from these fields (pipeline/cli/common.py, pipeline/cli/docs.py).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from pipeline.core.errors import TagpipeError
from pipeline.core.settings import KeyRole, Setting, SettingsModel, StorageOptions, one_or_many
from pipeline.corpus.dedup_settings import DEFAULT_MAX_DISTANCE, Bits

NONE = KeyRole.NONE
DEFAULT_RATIOS = "train=0.9,val=0.05,test=0.05"


def parse_ratios(text: str) -> dict[str, float]:
    """--ratios: NAME=SHARE,... with a train share, none negative, summing to 1."""
    ratios = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            ratios[name.strip()] = float(value)
        except ValueError:
            raise TagpipeError(
                f"--ratios {text!r}: expected NAME=FRACTION,..., e.g. train=0.9,val=0.05,test=0.05"
            ) from None
        if not sep or not name.strip():
            raise TagpipeError(f"--ratios {text!r}: expected NAME=FRACTION,...")
    return _check_ratios(ratios, text)


def _check_ratios(ratios: dict[str, float], shown) -> dict[str, float]:
    if "train" not in ratios or any(v < 0 for v in ratios.values()) or abs(sum(ratios.values()) - 1.0) > 1e-6:
        raise TagpipeError(
            f"--ratios {shown!r}: needs a train share, no negative shares, and shares summing to 1"
        )
    return ratios


def _ratios(value):
    """A ratios setting: NAME=SHARE text (the command line, older configs) or a table."""
    try:
        if isinstance(value, str):
            return parse_ratios(value)
        if isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            if any(isinstance(v, bool) for v in value.values()):
                raise ValueError("must be shares, not true or false")
            return _check_ratios({str(k): float(v) for k, v in value.items()}, value)
    except TagpipeError as exc:
        raise ValueError(str(exc).rsplit(": ", 1)[1]) from None  # the rule, not the value shown again
    return value  # pydantic says what is wrong with it


def _none_if_empty(value):
    return value or None  # "" in a config file: not set


def _splits_file(value: str | None) -> str | None:
    """--previous: a splits.parquet, or the folder holding one."""
    if value is None or value.endswith(".parquet"):
        return value
    return value.rstrip("/") + "/splits.parquet"


class SplitOptions(SettingsModel):
    """How the split is drawn: the [nightly.split] table, and options of `tagpipe split`."""

    ratios: Annotated[
        dict[str, float],
        BeforeValidator(_ratios),
        Field(
            default_factory=lambda: parse_ratios(DEFAULT_RATIOS),
            description="shares by name (NAME=SHARE,...; in a config file also a table); must include "
            "train and sum to 1",
        ),
        Setting(NONE, default_text=DEFAULT_RATIOS),
    ]
    seed: Annotated[
        int,
        Field(description="changes which clusters go where; the same seed gives the same split"),
        Setting(NONE),
    ] = 0
    exclude: Annotated[
        tuple[str, ...],
        BeforeValidator(one_or_many),
        Field(
            description="an existing training set (tagpipe output or Parquet/CSV with sha256/phash), "
            "repeatable: its near-duplicates stay out of val and test"
        ),
        Setting(NONE, metavar="URI"),
    ] = ()
    max_distance: Annotated[
        Bits,
        Field(description="radius for --exclude matches (use the dedup radius)"),
        Setting(NONE),
    ] = DEFAULT_MAX_DISTANCE
    min_count: Annotated[
        int,
        Field(ge=1, description="report tags with at least this many positives overall and none in a split"),
        Setting(NONE),
    ] = 5
    stratify: Annotated[
        bool,
        Field(description="iterative multi-label stratification at cluster level (else a hash per cluster)"),
        Setting(NONE),
    ] = False
    min_val_positives: Annotated[
        int,
        Field(
            ge=0,
            description="with --stratify: each tag frequent enough gets at least this many val positives "
            "(JoyTag used 5)",
        ),
        Setting(NONE),
    ] = 0
    group_column: Annotated[
        str | None,
        BeforeValidator(_none_if_empty),
        Field(
            description="images sharing this --metadata column's value (a post, parent, artist) never "
            "cross splits",
        ),
        Setting(NONE, metavar="COL", default_text="none"),
    ] = None
    metadata: Annotated[
        str | None,
        BeforeValidator(_none_if_empty),
        Field(description="Parquet or CSV with uri and the --group-column column"),
        Setting(NONE, metavar="FILE", default_text="none"),
    ] = None

    @model_validator(mode="after")
    def _groups_in_pairs(self) -> SplitOptions:
        if self.metadata and not self.group_column:
            raise ValueError("--metadata needs --group-column: which of its columns groups images")
        if self.group_column and not self.metadata:
            raise ValueError("--group-column needs --metadata (Parquet or CSV with uri and the column)")
        return self


class _SplitData(SettingsModel):
    tags: Annotated[str, Field(min_length=1, description="a tag output directory"), Setting(NONE)]
    dedup: Annotated[
        str, Field(min_length=1, description="a dedup output directory (clusters.parquet)"), Setting(NONE)
    ]
    output: Annotated[
        str,
        Field(min_length=1, description="directory for splits.parquet and _report.json"),
        Setting(NONE, flags=("--output", "-o")),
    ]


class SplitSettings(SplitOptions, _SplitData):
    """Everything `tagpipe split` takes (its options come from these fields)."""

    previous: Annotated[
        str | None,
        AfterValidator(_splits_file),
        Field(description="a previous splits.parquet (or its directory): assigned images keep their split"),
        Setting(NONE, default_text="none"),
    ] = None
    storage_options: StorageOptions
