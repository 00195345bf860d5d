"""The label check's settings (`tagpipe compare-tags`, and a tag run given source tags):
one field each, from which the command's options derive (pipeline/cli/common.py).

None of them changes a tag row (KeyRole.NONE): they decide the six label columns only.
The rules they set are documented in pipeline/corpus/label_quality.py and the README.
"""

from __future__ import annotations

import enum
from typing import Annotated

import pydantic
from pydantic import BeforeValidator, Field

from pipeline.core.settings import KeyRole, Setting, SettingsModel, StorageOptions, one_or_many
from pipeline.model.rules import Probability, category_items_parser, category_table

NONE = KeyRole.NONE


class LabelRule(enum.StrEnum):
    AUTO = "auto"  # calibrated when the bundle has a calibration table, else data
    CALIBRATED = "calibrated"  # the calibrated probability against per-category cut-offs
    DATA = "data"  # per-tag thresholds from the data (confident learning, one-vs-rest)


def _cutoff_table(value):
    """{category: cut-off}, category names lowercased (as the vocabulary's categories)."""
    table = category_table(value, "cut-off", "{ character = 0.02 }")
    return {name.lower(): cutoff for name, cutoff in table.items()}


def _cutoff_items(flag: str):
    return category_items_parser(flag, "character=0.02")


# Category cut-offs when nothing is given: character, copyright and artist tags are often
# given from what the uploader knows (the source, who drew it), not from the pixels, and a
# tagger is weakest on rare names, so its low score there is weaker evidence of a wrong tag.
DEFAULT_WRONG_CUTOFFS = {"character": 0.01, "copyright": 0.01, "artist": 0.01}


class LabelCheckSettings(SettingsModel):
    """How source (human) tags are read and compared with the model's probabilities."""

    source_tags_column: Annotated[
        str | None,
        Field(default=None, description="the source file's tags column (a list, or a separated string)"),
        Setting(NONE, default_text="source_tags, tags or tag_string", metavar="NAME"),
    ]
    source_uri_column: Annotated[
        str,
        Field(default="uri", min_length=1, description="the source file's column matched to the table's uri"),
        Setting(NONE, metavar="NAME"),
    ]
    tag_separator: Annotated[
        str | None,
        Field(
            default=None,
            description="what separates tags in a string column (' ' = any whitespace); `per-row`: ',' in "
            "each row that holds ', ', whitespace in the others; by default the one the whole file uses, "
            "and a file that mixes them is refused (give one, or per-row)",
        ),
        Setting(NONE, default_text="auto", metavar="SEP"),
    ]
    source_match: Annotated[
        float,
        Field(
            default=0.5,
            ge=0.0,
            le=1.0,
            description="refuse (committing nothing) a source file whose uris name an image of the table "
            "in fewer than this share of its rows: relative paths or another prefix; 0: never",
        ),
        Setting(NONE, metavar="SHARE"),
    ]
    label_rule: Annotated[
        LabelRule,
        Field(
            default=LabelRule.AUTO,
            description="calibrated: the calibrated probability against the cut-offs; data: per-tag "
            "thresholds from the data (confident learning); auto: calibrated when the bundle has calibration",
        ),
        Setting(NONE),
    ]
    missing_cutoff: Annotated[
        Probability,
        Field(
            default=0.85,
            description="calibrated rule: a tag the humans did not give is likely missing "
            "at or above this probability",
        ),
        Setting(NONE, metavar="P"),
    ]
    wrong_cutoff: Annotated[
        Probability,
        Field(
            default=0.05,
            description="calibrated rule: a human tag is likely wrong at or below this probability",
        ),
        Setting(NONE, metavar="P"),
    ]
    category_missing_cutoffs: Annotated[
        dict[str, float],
        BeforeValidator(_cutoff_table),
        Field(default_factory=dict, description="per-category missing cut-off, repeatable (e.g. `meta=0.9`)"),
        Setting(
            NONE,
            flags=("--category-missing-cutoffs", "--category-missing-cutoff"),
            default_text="none",
            metavar="C=V",
            from_cli=_cutoff_items("--category-missing-cutoff"),
        ),
    ]
    category_wrong_cutoffs: Annotated[
        dict[str, float],
        BeforeValidator(_cutoff_table),
        Field(
            default_factory=dict,
            description="per-category wrong cut-off, repeatable (e.g. `artist=0.02`); laid over the defaults",
        ),
        Setting(
            NONE,
            flags=("--category-wrong-cutoffs", "--category-wrong-cutoff"),
            default_text="character, copyright, artist 0.01",
            metavar="C=V",
            from_cli=_cutoff_items("--category-wrong-cutoff"),
        ),
    ]
    label_categories: Annotated[
        tuple[str, ...],
        BeforeValidator(one_or_many),
        Field(default=(), description="judge only category C's tags, repeatable"),
        Setting(
            NONE,
            flags=("--label-categories", "--label-category"),
            default_text="all but rating, quality",
            metavar="C",
        ),
    ]
    quality_alpha: Annotated[
        float,
        Field(
            default=0.8,
            gt=0.0,
            le=1.0,
            description="label_quality: the exponential moving average's "
            "weight on each lower per-tag score (cleanlab's default)",
        ),
        Setting(NONE, metavar="A"),
    ]

    @classmethod
    def of(cls, settings: pydantic.BaseModel) -> LabelCheckSettings:
        """The label fields of a larger settings model (a tag job's config)."""
        return cls(**{name: getattr(settings, name) for name in cls.model_fields if hasattr(settings, name)})


class _CompareTagsInputs(SettingsModel):
    tags: Annotated[
        str, Field(min_length=1, description="a tag output directory (local or `s3://`)"), Setting(NONE)
    ]
    model: Annotated[
        str,
        Field(min_length=1, description="the bundle that made it (its vocabulary, calibration)"),
        Setting(NONE, flags=("--model", "-m")),
    ]
    source_tags: Annotated[
        str,
        Field(
            min_length=1,
            description="Parquet or CSV: a uri column and a tags column (a list or a separated string)",
        ),
        Setting(NONE, metavar="FILE"),
    ]
    aliases: Annotated[
        str | None,
        Field(description="tag aliases: CSV antecedent_name,consequent_name (Danbooru's export) or JSON"),
        Setting(NONE, default_text="none"),
    ] = None
    storage_options: StorageOptions
    ray_address: Annotated[
        str | None,
        Field(description="`auto` or an address joins an existing cluster"),
        Setting(NONE, default_text="local Ray"),
    ] = None
    run_id: Annotated[
        str | None, Field(description="the name of this run"), Setting(NONE, default_text="time-stamped")
    ] = None


class CompareTagsSettings(LabelCheckSettings, _CompareTagsInputs):
    """What `tagpipe compare-tags` takes (its options come from these fields): what to
    compare, then how (LabelCheckSettings, also a tag run's [tag.labels])."""

    def label_check(self) -> LabelCheckSettings:
        return LabelCheckSettings(**{name: getattr(self, name) for name in LabelCheckSettings.model_fields})
