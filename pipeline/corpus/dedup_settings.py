"""What `tagpipe dedup` takes (DedupSettings), and the field types dedup shares with split
and audit: the phash radius in bits and the embedding threshold.

DedupOptions are the settings of how copies are joined, the [nightly.dedup] table of a
nightly config (the nightly gives dedup its table and output folder); DedupSettings adds
what the command names itself. The command's options and the README's table come from
these fields (pipeline/cli/common.py, pipeline/cli/docs.py).
"""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import BeforeValidator, Field

from pipeline.core.errors import TagpipeError
from pipeline.core.settings import KeyRole, Setting, SettingsModel, StorageOptions

NONE = KeyRole.NONE
DEFAULT_MAX_DISTANCE = 6
AUTO = "auto"


class Representative(enum.StrEnum):
    """How a cluster's representative (is_representative) is chosen."""

    FIRST_SEEN = "first-seen"  # the copy in the table's earliest version; ties by best-copy
    BEST_COPY = "best-copy"  # the most pixels, then lossless, then the most bytes, then the smallest uri


def parse_embedding_threshold(text: str | float | None) -> float | str | None:
    """--embedding-threshold: a cosine in (0, 1], "auto", or "off" (None)."""
    if text is None or text == "off":
        return None
    if text == AUTO:
        return AUTO
    try:
        if isinstance(text, bool):
            raise ValueError
        value = float(text)
    except (TypeError, ValueError):
        raise TagpipeError(f"--embedding-threshold {text!r}: give a cosine in (0, 1], auto or off") from None
    if not 0 < value <= 1:
        raise TagpipeError(f"--embedding-threshold {text!r}: a cosine in (0, 1], auto or off")
    return value


def _threshold(value):
    try:
        return parse_embedding_threshold(value)
    except TagpipeError:
        raise ValueError("must be a cosine in (0, 1], auto or off") from None


# Phash bits apart: a radius (0 to 32; docs/decisions.md says why 6).
Bits = Annotated[int, Field(ge=0, le=32)]
# An embedding threshold: a cosine in (0, 1], "auto" (chosen from the data) or None ("off").
CosineThreshold = Annotated[str | float | None, BeforeValidator(_threshold)]


class DedupOptions(SettingsModel):
    """How dedup joins copies: the [nightly.dedup] table, and options of `tagpipe dedup`."""

    max_distance: Annotated[
        Bits,
        Field(description="near duplicates: phash Hamming distance <= this (see docs/decisions.md)"),
        Setting(NONE),
    ] = DEFAULT_MAX_DISTANCE
    embedding_threshold: Annotated[
        CosineThreshold,
        Field(
            description="near duplicates by the tagger's embedding: cosine >= this; `auto` chooses it per "
            "corpus (at most 1 expected false edge per 10,000 rows over the pairs the search compares, then "
            "as far from it towards the known copies as recall allows); `off`"
        ),
        Setting(NONE),
    ] = AUTO
    full: Annotated[
        bool,
        Field(
            description="rebuild the index in OUTPUT/_index from scratch (else it is updated with the rows "
            "that changed since its last version)"
        ),
        Setting(NONE),
    ] = False
    representative: Annotated[
        Representative,
        Field(
            description="each cluster's representative: `first-seen`, the copy that entered the tag table "
            "first (its earliest version: an original before the edited copies made of it later), ties "
            "broken as `best-copy` does; `best-copy`: the most pixels, then a lossless format, then the "
            "most bytes, then the smallest uri"
        ),
        Setting(NONE),
    ] = Representative.FIRST_SEEN
    partitions: Annotated[
        int,
        Field(
            ge=1,
            description="search the index as this many partitions, each a Ray actor on the node that holds "
            "it (a full build cuts its vectors into this many segments); 1: in the dedup process, no Ray",
        ),
        Setting(NONE),
    ] = 1


class _DedupData(SettingsModel):
    tags: Annotated[
        str, Field(min_length=1, description="a tag output directory (uri, sha256, phash)"), Setting(NONE)
    ]
    output: Annotated[
        str,
        Field(
            min_length=1,
            description="directory for clusters.parquet, edges.parquet, _summary.json and the _index/",
        ),
        Setting(NONE, flags=("--output", "-o")),
    ]


class DedupSettings(DedupOptions, _DedupData):
    """Everything `tagpipe dedup` takes (its options come from these fields)."""

    storage_options: StorageOptions
    ray_address: Annotated[
        str | None,
        Field(
            description="the Ray cluster the partitions run on (default: a local Ray; with partitions > 1)"
        ),
        Setting(NONE),
    ] = None
