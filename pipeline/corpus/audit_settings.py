"""What `tagpipe audit` takes (AuditSettings).

AuditOptions are the [nightly.audit] table of a nightly config (the nightly gives the
audit its sides, its folder, dedup's index and the embedding threshold dedup used);
AuditSettings adds what the command names itself. The command's options and the
README's table come from these fields (pipeline/cli/common.py, pipeline/cli/docs.py).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from pipeline.core.settings import KeyRole, Setting, SettingsModel, StorageOptions
from pipeline.corpus.dedup_settings import AUTO, DEFAULT_MAX_DISTANCE, Bits, CosineThreshold

NONE = KeyRole.NONE


class AuditOptions(SettingsModel):
    """The [nightly.audit] table, and options of `tagpipe audit`."""

    max_distance: Annotated[
        Bits,
        Field(description="a leak by phash: within this many bits of a train image (reliable hashes only)"),
        Setting(NONE),
    ] = DEFAULT_MAX_DISTANCE


class _AuditData(SettingsModel):
    train: Annotated[
        str,
        Field(
            min_length=1,
            description="training set: a tagpipe output, or Parquet/CSV with sha256, phash and/or embedding",
        ),
        Setting(NONE),
    ]
    eval: Annotated[
        str,
        Field(min_length=1, description="evaluation set, same forms (a split output: its val/test rows)"),
        Setting(NONE),
    ]
    tags: Annotated[
        str | None,
        Field(description="the tag table a split output came from: its phash flags and embeddings"),
        Setting(NONE, default_text="none"),
    ] = None


class AuditSettings(AuditOptions, _AuditData):
    """Everything `tagpipe audit` takes (its options come from these fields)."""

    embedding_threshold: Annotated[
        CosineThreshold,
        Field(
            description="a leak by embedding: cosine >= this; `auto` chooses it from the data; `off`. Use "
            "dedup's value to audit what dedup kept together"
        ),
        Setting(NONE),
    ] = AUTO
    output: Annotated[
        str | None,
        Field(description="also write leaks.parquet and audit.json here"),
        Setting(NONE, flags=("--output", "-o"), default_text="none"),
    ] = None
    dedup: Annotated[
        str | None,
        Field(
            description="the dedup output the split was made from: embeddings are searched in its index "
            "(with a cosine threshold), and with --output only what changed since the last audit written "
            "there"
        ),
        Setting(NONE, default_text="none"),
    ] = None
    storage_options: StorageOptions
    show: Annotated[int, Field(ge=0, description="leaks to list on the terminal"), Setting(NONE)] = 20
