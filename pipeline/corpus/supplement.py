"""Supplement mode for `tagpipe export`: the human (source) tags merged with the model's,
each tag with where it came from. Model cards (JTP-1's) say to supplement human tags, not
replace them; the label check (issue 25) says which human tags to doubt.

Per image, with S its source tags (`source_tags`), W the ones the check doubts
(`likely_wrong`), M the model's emitted tags (`tags`, by score) and D a reviewer's
decisions for it (tag -> accept: it belongs on the image, reject: it does not):

  accepted source tags  A = S minus W, plus those of W that D accepts, minus those D rejects
  merged tags           M minus those D rejects, then A's tags not in M (in source order),
                        then tags D accepts that are in neither (likely-missing or uncertain
                        tags the model did not emit), in decision order
  provenance            both (in A and M), source (in A only), model (in M only, or a
                        model suggestion a reviewer accepted)

Decisions come from queue files (`tagpipe review`, decision filled in); a row's decision
applies to the tags it lists. ood rows carry no tag claim and are not used. The same
(uri, tag) decided both ways, in one file or two, is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.core.errors import TagpipeError
from pipeline.core.words import counted
from pipeline.corpus.review_output import read_queue, row_decisions

SOURCE, MODEL, BOTH = "source", "model", "both"
NEEDED_COLUMNS = ("source_tags", "likely_wrong")


@dataclass
class Decisions:
    """Reviewers' decisions by uri: tag -> belongs on the image."""

    by_uri: dict[str, dict[str, bool]] = field(default_factory=dict)
    ignored: int = 0  # decided rows of ood queues

    @classmethod
    def read(cls, paths: list[str], storage_options: dict | None = None) -> Decisions:
        decisions = cls()
        where: dict[tuple[str, str], str] = {}
        for path in paths:
            for row in read_queue(path, storage_options):
                decided = row_decisions(row, path)
                if not decided:
                    continue
                if row.get("kind") == "ood":
                    decisions.ignored += 1
                    continue
                uri = row.get("uri")
                if not isinstance(uri, str) or not uri:
                    raise TagpipeError(f"{path}:{row.get('_line')}: a decided row without a uri")
                mine = decisions.by_uri.setdefault(uri, {})
                for tag, belongs in decided.items():
                    if tag in mine and mine[tag] != belongs:
                        raise TagpipeError(
                            f"{uri}: tag {tag!r} is accepted and rejected ({where[uri, tag]} and "
                            f"{path}:{row.get('_line')}); keep one decision"
                        )
                    mine[tag] = belongs
                    where[uri, tag] = f"{path}:{row.get('_line')}"
        return decisions

    def count(self) -> int:
        return sum(len(d) for d in self.by_uri.values())


@dataclass
class SupplementCounts:
    images_with_source_tags: int = 0
    source_tags_kept: int = 0  # in A
    source_tags_dropped: int = 0  # in S, not in A (doubted and not accepted, or rejected)
    model_tags_rejected: int = 0
    suggestions_accepted: int = 0  # accepted tags in neither S nor M
    decisions_applied: int = 0  # (uri, tag) decisions for images in the table
    decisions_unmatched: int = 0  # decided images the table does not hold (a uri written otherwise?)

    def text(self) -> str:
        unmatched = f" ({counted(self.decisions_unmatched, 'images')} decided are not in the table)"
        return (
            f"; supplement: {counted(self.images_with_source_tags, 'images')} with source tags, "
            f"{self.source_tags_kept} "
            f"source tags kept, {self.source_tags_dropped} dropped, {self.decisions_applied} reviewer "
            f"decisions applied" + (unmatched if self.decisions_unmatched else "")
        )


def merge_tags(row: dict, decided: dict[str, bool], counts: SupplementCounts) -> tuple[list[str], list[str]]:
    """(merged tags, provenance of each) for one row, by the rules above."""
    model = list(row.get("tags") or [])
    source = list(dict.fromkeys(row.get("source_tags") or []))
    doubted = set(row.get("likely_wrong") or [])
    accepted = [t for t in source if decided.get(t, t not in doubted)]
    in_model, in_accepted = set(model), set(accepted)
    merged = [t for t in model if decided.get(t, True)]
    merged += [t for t in accepted if t not in in_model]
    added = [t for t, belongs in decided.items() if belongs and t not in in_model and t not in set(source)]
    merged += added
    provenance = [
        BOTH if t in in_accepted and t in in_model else SOURCE if t in in_accepted else MODEL for t in merged
    ]
    if row.get("source_tags") is not None:
        counts.images_with_source_tags += 1
    counts.source_tags_kept += len(accepted)
    counts.source_tags_dropped += len(source) - len(accepted)
    counts.model_tags_rejected += sum(1 for t in model if not decided.get(t, True))
    counts.suggestions_accepted += len(added)
    counts.decisions_applied += len(decided)
    return merged, provenance


def supplement_rows(rows: list[dict], decisions: Decisions) -> tuple[list[dict], SupplementCounts]:
    """The rows with `tags` merged, as merge_rows, and the counts over them."""
    counts = SupplementCounts()
    out = merge_rows(rows, decisions, counts)
    counts.decisions_unmatched = len(set(decisions.by_uri) - {row["uri"] for row in rows})
    return out, counts


def unmatched_decisions(decisions: Decisions, uris) -> int:
    """Decided images not among `uris` (an Arrow array of the table's images): the count
    supplement_rows gives, from one column instead of every row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not decisions.by_uri:
        return 0
    decided = pa.array(list(decisions.by_uri), pa.string())
    found = set(uris.filter(pc.is_in(uris, value_set=decided)).to_pylist())
    return len(decisions.by_uri) - len(found)


def merge_rows(rows: list[dict], decisions: Decisions, counts: SupplementCounts) -> list[dict]:
    """The rows with `tags` merged, and `provenance`, `scores` (the model's, None for a tag
    it did not emit) and `reviewed` (tag -> accept|reject) to match; counts added to
    `counts` (an export merges its rows a slice at a time)."""
    out = []
    for row in rows:
        decided = decisions.by_uri.get(row["uri"], {})
        merged, provenance = merge_tags(row, decided, counts)
        model_scores = dict(zip(row.get("tags") or [], row.get("scores") or []))
        out.append(
            {
                **row,
                "tags": merged,
                "provenance": provenance,
                "scores": [model_scores.get(t) for t in merged],
                "reviewed": {t: "accept" if belongs else "reject" for t, belongs in decided.items()},
            }
        )
    return out


def supplement_record(row: dict, write: Callable[[str], str], exclude: frozenset[str]) -> dict:
    """A supplement-mode JSONL row: the merged tags as written, each with its provenance
    and the model's score (None: the model did not emit it); excluded tags left out."""
    kept = [i for i, tag in enumerate(row["tags"]) if tag not in exclude]
    return {
        "uri": row["uri"],
        "tags": [write(row["tags"][i]) for i in kept],
        "provenance": [row["provenance"][i] for i in kept],
        "scores": [None if row["scores"][i] is None else round(float(row["scores"][i]), 4) for i in kept],
        "source_tags": row.get("source_tags"),
        "reviewed": row["reviewed"],
        "rating": row.get("rating"),
        "quality": row.get("quality"),
        "width": row["width"],
        "height": row["height"],
    }


def check_supplement(names: list[str], uri: str) -> None:
    """Supplement mode needs the label-check columns (the export's writer says whether it
    writes the format asked for)."""
    missing = [c for c in NEEDED_COLUMNS if c not in names]
    if missing:
        raise TagpipeError(
            f"{uri} has no {missing[0]} column: supplement mode needs source tags; run the tag job with "
            "--source-tags, or `tagpipe compare-tags`, first"
        )
