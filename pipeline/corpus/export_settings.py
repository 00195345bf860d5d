"""What `tagpipe export` takes (ExportSettings): one field per option, and the options
the row-text functions take (TextOptions, CaptionOptions) made from them.

The command's options and the README's table come from these fields
(pipeline/cli/common.py, pipeline/cli/docs.py); the defaults of the caption options are
CaptionOptions' own (pipeline/corpus/export_text.py), so each is written once.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from pipeline.core.settings import KeyRole, Setting, SettingsModel, StorageOptions, one_or_many
from pipeline.corpus.export_text import (
    CaptionOptions,
    ExistingFiles,
    ExportFormat,
    RatingPlace,
    TextOptions,
    check_extension,
    check_separator,
)

NONE = KeyRole.NONE
Tags = Annotated[tuple[str, ...], BeforeValidator(one_or_many)]


def _pairs(value):
    """--replace OLD=NEW items (or (old, new) pairs) as pairs."""
    pairs = []
    for item in one_or_many(value) or ():
        if isinstance(item, str):
            old, sep, new = item.partition("=")
            if not sep or not old or not new:
                raise ValueError(f"{item!r}: expected OLD=NEW, e.g. 1girl=girl")
            item = (old, new)
        pairs.append(tuple(item))
    return tuple(pairs)


class ExportSettings(SettingsModel):
    """Everything `tagpipe export` takes (its options come from these fields)."""

    tags: Annotated[
        str, Field(min_length=1, description="a tag output directory (local or `s3://`)"), Setting(NONE)
    ]
    output: Annotated[
        str, Field(min_length=1, description="where the files go"), Setting(NONE, flags=("--output", "-o"))
    ]
    format: Annotated[
        ExportFormat,
        Field(description="`captions` (one .txt per image), `jsonl`, or `dart` (Dart v2 prompts)"),
        Setting(NONE, flags=("--format", "-f")),
    ] = ExportFormat.CAPTIONS
    relative_to: Annotated[
        str | None,
        Field(description="captions: image paths are taken relative to this"),
        Setting(NONE, default_text="their common folder"),
    ] = None
    spaces: Annotated[
        bool,
        Field(description="tag text with spaces or underscores"),
        Setting(NONE, negative="--underscores", default_text="underscores"),
    ] = TextOptions.spaces
    escape_parentheses: Annotated[
        bool, Field(description="write ( ) as \\( \\) (prompt emphasis syntax)"), Setting(NONE)
    ] = TextOptions.escape_parentheses
    exclude: Annotated[
        Tags,
        Field(description="a tag to leave out, repeatable (either spelling: `long_hair` or `long hair`)"),
        Setting(NONE, flags=("--exclude", "--undesired"), metavar="TAG", default_text="none"),
    ] = ()
    with_rating: Annotated[
        bool,
        Field(description="captions keep the rating/quality tags"),
        Setting(NONE, negative="--without-rating"),
    ] = TextOptions.with_rating
    caption_extension: Annotated[
        str,
        AfterValidator(check_extension),
        Field(description="captions: the caption file's extension"),
        Setting(NONE),
    ] = CaptionOptions.extension
    separator: Annotated[
        str,
        AfterValidator(check_separator),
        Field(description="captions: what goes between tags"),
        Setting(NONE, default_text='`", "`'),
    ] = CaptionOptions.separator
    always_first: Annotated[
        Tags,
        Field(description="captions: a tag (trigger word) put first when present, repeatable, in order"),
        Setting(NONE, metavar="TAG", default_text="none"),
    ] = CaptionOptions.always_first
    character_first: Annotated[
        bool, Field(description="captions: character tags before the others"), Setting(NONE)
    ] = CaptionOptions.character_first
    rating: Annotated[
        RatingPlace,
        Field(description="captions: the rating tag inline (by score), first, last, or omit"),
        Setting(NONE),
    ] = RatingPlace(CaptionOptions.rating)
    replace: Annotated[
        tuple[tuple[str, str], ...],
        BeforeValidator(_pairs),
        Field(description="captions: write tag OLD as NEW, repeatable"),
        Setting(NONE, metavar="OLD=NEW", default_text="none"),
    ] = CaptionOptions.replace
    character_expand: Annotated[
        bool, Field(description="captions: name_(series) becomes two tags, name and series"), Setting(NONE)
    ] = CaptionOptions.character_expand
    append: Annotated[
        bool, Field(description="captions: merge into existing caption files, no tag twice"), Setting(NONE)
    ] = CaptionOptions.append
    overwrite: Annotated[
        bool, Field(description="replace files that already exist (else the export refuses)"), Setting(NONE)
    ] = False
    skip_existing: Annotated[
        bool, Field(description="leave files that already exist as they are"), Setting(NONE)
    ] = False
    supplement: Annotated[
        bool,
        Field(
            description="the human tags (`source_tags`) merged with the model's, with provenance per tag in "
            "JSONL; tags the label check doubts (`likely_wrong`) left out unless a reviewer accepted them"
        ),
        Setting(NONE),
    ] = False
    decisions: Annotated[
        tuple[str, ...],
        BeforeValidator(one_or_many),
        Field(
            description="with --supplement: a `tagpipe review` queue file with its decision field filled, "
            "repeatable"
        ),
        Setting(NONE, metavar="FILE", default_text="none"),
    ] = ()
    storage_options: StorageOptions

    @model_validator(mode="after")
    def _options_agree(self) -> ExportSettings:
        if not self.with_rating and self.rating != RatingPlace.INLINE:
            raise ValueError(
                f"--without-rating leaves the rating out: it cannot also go --rating {self.rating.value}"
            )
        if sum((self.append, self.overwrite, self.skip_existing)) > 1:
            raise ValueError("--append, --overwrite and --skip-existing exclude each other: give one")
        if self.decisions and not self.supplement:
            raise ValueError("--decisions applies to --supplement exports: add --supplement")
        return self

    def text_options(self) -> TextOptions:
        return TextOptions(
            spaces=self.spaces,
            escape_parentheses=self.escape_parentheses,
            exclude=frozenset(self.exclude),
            with_rating=self.with_rating,
        )

    def caption_options(self) -> CaptionOptions:
        return CaptionOptions(
            extension=self.caption_extension,
            separator=self.separator,
            always_first=self.always_first,
            character_first=self.character_first,
            rating=self.rating.value,
            replace=self.replace,
            character_expand=self.character_expand,
            append=self.append,
        )

    def existing_files(self) -> ExistingFiles:
        """What to do with output files already there: refuse, overwrite or skip them."""
        if self.overwrite:
            return ExistingFiles.OVERWRITE
        return ExistingFiles.SKIP if self.skip_existing else ExistingFiles.REFUSE
