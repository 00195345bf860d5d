"""Tag rules: which stored scores become tags. Defined once, used by tag and rethreshold.

RuleSettings is what a user sets (the `[tag]` table's rule keys, the same command-line
options on `tag` and `rethreshold`); None or empty means "the profile's". TagRules is the
rule set a Postprocessor applies: the profile's thresholds with the settings laid over.
Both are validated models that travel as objects (into Ray tasks too); `record()` is the
settings as the rules key and snapshots spell them.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import pydantic
from pydantic import BeforeValidator, Field

from pipeline.core.errors import ConfigError
from pipeline.core.settings import KeyRole, Setting, SettingsModel, one_or_many
from pipeline.table.version_fields import DEFAULT_CALIBRATE, DEFAULT_LOGIT_FLOOR

if TYPE_CHECKING:
    from pipeline.model.bundle import ModelBundle

RULES_KEY_VERSION = 1  # the spelling of record(): bump it and every table is rethresholded


def lowercase_items(items: list[str]) -> list[str]:
    """The command line's category names, lowercased (config files keep what they say)."""
    return [item.lower() for item in items]


def category_table(value, noun: str = "threshold", example: str = "{ general = 0.35, character = 0.85 }"):
    """{category: probability}; JSON text is read as the table it spells. noun and example
    word the errors (a threshold here; the label check's cut-offs too)."""
    rule = f"must be a table of category = probability, e.g. {example}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(rule) from None
    if not isinstance(value, dict):
        raise ValueError(rule)
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(rule)
        if not 0 <= v <= 1:
            raise ValueError(f"{k} = {v}: a {noun} must be 0 to 1")
    return {str(k): float(v) for k, v in value.items()}


def category_items_parser(flag: str, example: str):
    """The parser of a repeatable CATEGORY=VALUE option (`flag`): its items as one table."""

    def parse(items: list[str]) -> dict[str, float]:
        table = {}
        for item in items:
            name, sep, number = item.partition("=")
            try:
                table[name.strip().lower()] = float(number)
            except ValueError:
                raise ConfigError(f"{flag} {item!r}: expected CATEGORY=VALUE, e.g. {example}") from None
            if not sep or not name.strip():
                raise ConfigError(f"{flag} {item!r}: expected CATEGORY=VALUE, e.g. {example}")
        return table

    return parse


category_items = category_items_parser("--category-threshold", "character=0.85")


Probability = Annotated[float, Field(ge=0.0, le=1.0)]

Threshold = Annotated[
    Probability | None,
    Field(default=None, description="global tag threshold"),
    Setting(KeyRole.RULES, default_text="profile's"),
]
LogitFloor = Annotated[
    Probability,
    Field(
        default=0.01,
        description="sparse logits keep tags with probability >= this; for rethreshold, only tags stored "
        "at or above it are candidates",
    ),
    # what rows store (inference), and the candidates every rule chooses from (rules)
    Setting(KeyRole.INFERENCE | KeyRole.RULES),
]
CategoryThresholds = Annotated[
    dict[str, float],
    BeforeValidator(category_table),
    Field(
        default_factory=dict,
        description="per-category threshold, repeatable (e.g. `character=0.85`)",
    ),
    Setting(
        KeyRole.RULES,
        flags=("--category-thresholds", "--category-threshold"),
        default_text="profile's",
        metavar="C=V",
        from_cli=category_items,
    ),
]
PerTagThresholds = Annotated[
    bool,
    Field(default=False, description="the bundle's `best_thr` per tag (maximises F1 per tag; over-tags)"),
    Setting(KeyRole.RULES, negative="--no-per-tag-thresholds"),
]
McutCategories = Annotated[
    tuple[str, ...],
    BeforeValidator(one_or_many),
    Field(
        default=(),
        description="threshold category C by MCut (midpoint of the largest score gap), repeatable",
    ),
    Setting(
        KeyRole.RULES,
        flags=("--mcut-categories", "--mcut"),
        default_text="off",
        metavar="C",
        from_cli=lowercase_items,
    ),
]
MaxTags = Annotated[
    int | None,
    Field(default=None, ge=1, description="at most N threshold-selected tags per image, by score"),
    Setting(KeyRole.RULES, default_text="none", metavar="N"),
]
Exclude = Annotated[
    tuple[str, ...],
    BeforeValidator(one_or_many),
    Field(default=(), description="never emit TAG, repeatable"),
    Setting(KeyRole.RULES, default_text="none", metavar="TAG"),
]
Calibrate = Annotated[
    bool,
    Field(
        default=True,
        description="apply the bundle's calibration table (`table[tag, int(p*100)]`, bin 99 read as 98); "
        "identity without one",
    ),
    Setting(KeyRole.RULES, negative="--no-calibrate"),
]
OodCut = Annotated[
    float | None,
    Field(default=None, ge=0.0, description="`ood` is true above this Mahalanobis distance"),
    Setting(KeyRole.RULES, default_text="reference p95", metavar="D"),
]


class RuleSettings(SettingsModel):
    """The rule settings a user gives; None or empty: the profile's."""

    threshold: Threshold
    logit_floor: LogitFloor
    category_thresholds: CategoryThresholds
    per_tag_thresholds: PerTagThresholds
    mcut_categories: McutCategories
    max_tags: MaxTags
    exclude: Exclude
    calibrate: Calibrate
    ood_cut: OodCut

    @classmethod
    def of(cls, settings: pydantic.BaseModel) -> RuleSettings:
        """The rule fields of a larger settings model (TagJobConfig)."""
        return cls(**{name: getattr(settings, name) for name in cls.model_fields})

    def overrides(self) -> dict:
        """TagRules fields these settings set (what the profile's thresholds give way to)."""
        given = dict(
            default_threshold=self.threshold,
            category_thresholds=dict(self.category_thresholds) or None,
            per_tag_thresholds=self.per_tag_thresholds,
            mcut_categories=self.mcut_categories,
            max_tags=self.max_tags,
            exclude=frozenset(self.exclude),
            calibrate=self.calibrate,
            ood_cut=self.ood_cut,
            logit_floor=self.logit_floor,
        )
        return {k: v for k, v in given.items() if v is not None}

    def record(self) -> dict:
        """The settings as the rules key hashes them and snapshots store them (version
        RULES_KEY_VERSION): TagRules names, unset ones left out, lists sorted where order
        means nothing."""
        record = self.overrides()
        for name, value in record.items():
            if isinstance(value, frozenset):
                record[name] = sorted(value)
            elif isinstance(value, tuple):
                record[name] = list(value)
        return record


class TagRules(pydantic.BaseModel):
    """The rules a Postprocessor applies: the profile's thresholds under the settings."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    default_threshold: Probability
    category_thresholds: dict[str, float] = Field(default_factory=dict)
    per_tag_thresholds: bool = False  # the bundle's best_thr (maximises F1 per tag; over-tags)
    mcut_categories: tuple[str, ...] = ()  # categories thresholded by MCut instead
    max_tags: int | None = Field(default=None, ge=1)  # cap on threshold-selected tags per image
    exclude: frozenset[str] = frozenset()  # never emitted
    calibrate: bool = DEFAULT_CALIBRATE  # apply the bundle's calibration table when it has one
    logit_floor: Probability = DEFAULT_LOGIT_FLOOR  # keep sparse logits of tags with probability >= this
    dense_logits: bool = False
    ood_cut: float | None = Field(default=None, ge=0.0)  # ood above this distance; None: reference p95

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, **overrides) -> TagRules:
        thresholds = bundle.profile.thresholds
        return cls.from_profile(thresholds.default, dict(thresholds.by_category), **overrides)

    @classmethod
    def from_profile(cls, default: float, by_category: dict[str, float], **overrides) -> TagRules:
        """The profile's thresholds (default, by category) with the given TagRules fields
        laid over (None: not given); category thresholds merge, the given ones win."""
        given = {k: v for k, v in overrides.items() if v is not None}
        categories = {**by_category, **given.pop("category_thresholds", {})}
        return cls(**{"default_threshold": default, "category_thresholds": categories, **given})
