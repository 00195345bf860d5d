"""`tagpipe review`: the images most worth a human look, ranked, as a queue file and a page.

Four kinds of queue, each from columns a tag table already holds (a smaller key is a
better rank; ties go to the smaller uri):

  likely-wrong    human tags the model is confident are absent (`likely_wrong`, and
                  `likely_wrong_scores`, the model's probability p of each): ranked by
                  the expected number of wrong human tags, sum(1 - p), then by the
                  strongest single one (max 1 - p)
  likely-missing  tags the model is confident are present that the humans did not give
                  (`likely_missing`, `likely_missing_scores`): ranked by sum(p), then max p
  uncertain       tags whose score lies within UNCERTAIN_BAND of their threshold, from the
                  stored logits and the version's rules, as the run decided them
                  (calibrated score against the per-tag, category or global threshold;
                  rating/quality winners and MCut categories have no threshold and are
                  left out): ranked by the smallest |score - threshold|, then by how
                  many tags lie in the band
  ood             rows flagged `ood`: ranked by `ood_distance`, highest first

`--tag T` keeps only the evidence about T (for ood: rows whose tags include T) and ranks
by it alone. Error rows never enter a queue. The table is read part by part with only
the columns the kind needs, and only the best `limit` rows are held (`TopRows`), so a
10M-row table needs no more memory than its largest part.

The label-check columns are LABEL_FIELDS (pipeline/core/schemas.py); a tag table keeps them
in its label sidecar, joined to each part by uri as it is read (TagTable.read_rows).
"""

from __future__ import annotations

import enum
import posixpath
import time
from dataclasses import dataclass
from typing import Annotated

import pyarrow.compute as pc
from pydantic import Field

from pipeline.core.errors import TagpipeError
from pipeline.core.settings import KeyRole, Setting, SettingsModel, StorageOptions
from pipeline.core.words import counted
from pipeline.corpus.review_rank import (
    ReviewKind,
    Source,
    TopRows,
    label_ranking,
    ood_ranking,
    uncertain_ranking,
    uncertain_rules,
)
from pipeline.storage.writable import FILE, check_writable
from pipeline.table.input_kinds import expect

__all__ = ["ReviewKind", "ReviewSettings", "rank_queue", "run_review"]

NO_LABEL_COLUMNS = (
    "has no label-check columns (likely_wrong, likely_missing): run the tag job with --source-tags, "
    "or `tagpipe compare-tags`, first"
)


class QueueFormat(enum.StrEnum):
    JSONL = "jsonl"
    CSV = "csv"


NONE = KeyRole.NONE


class ReviewSettings(SettingsModel):
    """What `tagpipe review` takes (one definition: the command's options come from it)."""

    tags: Annotated[
        str, Field(description="a tag table (its current version), a Parquet file or a folder"), Setting(NONE)
    ]
    kind: Annotated[
        ReviewKind,
        Field(description="which queue: likely-wrong, likely-missing, uncertain or ood"),
        Setting(NONE),
    ]
    out: Annotated[
        str,
        Field(description="the queue file (.jsonl or .csv); the page goes beside it as .html"),
        Setting(NONE, metavar="FILE"),
    ]
    tag: Annotated[
        str | None,
        Field(description="only this tag's evidence, ranked by it"),
        Setting(NONE, metavar="T", default_text="every tag"),
    ] = None
    limit: Annotated[
        int,
        Field(ge=1, le=10_000, description="images in the queue (and thumbnails on the page)"),
        Setting(NONE),
    ] = 200
    format: Annotated[
        QueueFormat | None,
        Field(description="jsonl or csv"),
        Setting(NONE, default_text="from --out's extension"),
    ] = None
    model: Annotated[
        str | None,
        Field(description="uncertain: the bundle that made the table (its vocabulary and thresholds)"),
        Setting(NONE, metavar="DIR", default_text="the run manifest's model_dir"),
    ] = None
    overwrite: Annotated[
        bool, Field(description="replace the queue file and page if they exist"), Setting(NONE)
    ] = False
    storage_options: StorageOptions

    def queue_format(self) -> QueueFormat:
        if self.format is not None:
            return self.format
        extension = posixpath.splitext(self.out)[1].lower().lstrip(".")
        if extension not in {f.value for f in QueueFormat}:
            raise TagpipeError(f"--out {self.out}: name it .jsonl or .csv, or give --format jsonl|csv")
        return QueueFormat(extension)

    def page(self) -> str:
        from pipeline.corpus.review_output import page_path

        return page_path(self.out)


# ---- the command ------------------------------------------------------------------------
COLUMNS = {
    ReviewKind.LIKELY_WRONG: ["likely_wrong", "likely_wrong_scores", "label_quality", "source_tags"],
    ReviewKind.LIKELY_MISSING: ["likely_missing", "likely_missing_scores", "label_quality", "source_tags"],
    ReviewKind.UNCERTAIN: ["logit_indices", "logit_values"],
    ReviewKind.OOD: ["ood_distance", "ood", "tags"],
}


@dataclass
class ReviewSummary:
    kind: str
    queued: int
    rows: int  # rows read
    output: str
    page: str
    thumbnails: int
    seconds: float

    def text(self) -> str:
        return (
            f"review: {counted(self.queued, 'images')} queued ({self.kind}, of "
            f"{counted(self.rows, 'rows')}) -> {self.output}, "
            f"page {self.page} ({counted(self.thumbnails, 'thumbnails')}), {self.seconds:.1f} s"
        )


def rank_queue(settings: ReviewSettings) -> tuple[list[dict], int]:
    """(the queue's rows, best first; rows read)."""
    kind, tag = settings.kind, settings.tag
    source = Source.open(settings.tags, settings.storage_options)
    needed = COLUMNS[kind]
    if kind in (ReviewKind.LIKELY_WRONG, ReviewKind.LIKELY_MISSING):
        if not {"likely_wrong", "likely_missing"} <= set(source.names):
            raise TagpipeError(f"{settings.tags} {NO_LABEL_COLUMNS}")
        needed = [c for c in needed if c in source.names]  # label_quality, source_tags: shown when there
    missing = [c for c in needed if c not in source.names]
    if missing:
        raise TagpipeError(f"{settings.tags}: no column {missing[0]}, which --kind {kind.value} ranks by")
    thresholds = uncertain_rules(source, settings.model, tag) if kind is ReviewKind.UNCERTAIN else None
    top, rows = TopRows(settings.limit), 0
    for part in source.parts(["uri", "error", *needed]):
        rows += part.num_rows
        part = part.filter(pc.is_null(part.column("error")))  # error rows are never queued
        if kind is ReviewKind.OOD:
            ranked = ood_ranking(part, tag)
        elif thresholds is not None:
            ranked = uncertain_ranking(part, thresholds)
        else:
            ranked = label_ranking(part, kind, tag)
        top.add(part, ranked)
    return top.records(kind), rows


def run_review(settings: ReviewSettings) -> ReviewSummary:
    """Rank, then write the queue file and its page (refused, before any work, if either
    exists and --overwrite is not given)."""
    from pipeline.corpus.review_output import check_free, review_page, write_queue

    started = time.monotonic()
    queue_format, page = settings.queue_format(), settings.page()
    expect(settings.tags, "table", "--tags", settings.storage_options)  # before any work: one line
    for path in (settings.out, page):
        check_writable(path, "--out", FILE)
    if not settings.overwrite:
        check_free([settings.out, page], settings.storage_options)
    records, rows = rank_queue(settings)
    write_queue(records, settings.out, queue_format, settings.storage_options)
    thumbnails = review_page(
        records, settings.kind.value, settings.tag, (settings.tags, settings.out), settings.storage_options
    )
    return ReviewSummary(
        settings.kind.value,
        len(records),
        rows,
        settings.out,
        page,
        thumbnails,
        round(time.monotonic() - started, 2),
    )
