"""The review queues' rankings (pipeline/corpus/review.py says the rules), and what they run
on: a table read part by part with only the columns a kind needs (`Source`), and the best
`limit` rows so far (`TopRows`), so a 10M-row table needs no more memory than its largest
part plus the queue.
"""

from __future__ import annotations

import enum
import json
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import TagpipeError
from pipeline.core.settings import suggestion
from pipeline.storage.filesystem import filesystem_for, read_bytes
from pipeline.table.tag_table import RUNS_DIR, Snapshot, TagTable, is_tag_table

UNCERTAIN_BAND = 0.1  # a tag whose score is within this of its threshold is uncertain
REASON_TAGS = 5  # tags an uncertain row lists, closest to their threshold first
BATCH_ROWS = 65_536  # rows per batch when the input is a Parquet file or folder


class ReviewKind(enum.StrEnum):
    LIKELY_WRONG = "likely-wrong"
    LIKELY_MISSING = "likely-missing"
    UNCERTAIN = "uncertain"
    OOD = "ood"


# ---- reading part by part --------------------------------------------------------------
@dataclass
class Source:
    """A tag table's current version (its label sidecar joined: TagTable.read_rows), a
    Parquet file or a folder of them, read part by part."""

    uri: str
    storage_options: dict
    names: list[str]
    snapshot: Snapshot | None = None
    table: TagTable | None = None
    files: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None) -> Source:
        options = storage_options or {}
        if is_tag_table(uri, options):
            table = TagTable(uri, options)
            snapshot = table.snapshot()
            return cls(uri, options, table.column_names(snapshot), snapshot, table)
        import pyarrow.parquet as pq

        fs, path = filesystem_for(uri, options)
        if fs.isfile(path):
            files = [path]
        elif fs.isdir(path):  # as pipeline/table/reading.py: Parquet files, `_`/`.` paths skipped
            files = sorted(
                f
                for f in fs.find(path)
                if f.endswith(".parquet")
                and not any(s.startswith(("_", ".")) for s in f[len(path) :].split("/"))
            )
        else:
            raise TagpipeError(f"{uri}: no such file or folder")
        if not files:
            raise TagpipeError(f"{uri}: no Parquet files")
        try:
            with fs.open(files[0], "rb") as handle:
                names = pq.read_schema(handle).names
        except pa.ArrowInvalid:
            raise TagpipeError(
                f"{uri}: not a Parquet file, a tag table or a folder of Parquet files"
            ) from None
        return cls(uri, options, names, files=files)

    def parts(self, columns: list[str]) -> Iterator[pa.Table]:
        """The rows, a part (a table's file, or a batch of a Parquet file) at a time."""
        if self.table is not None and self.snapshot is not None:
            for relative in self.snapshot.files:
                yield self._read_part(relative, columns)
            return
        import pyarrow.parquet as pq

        fs, _ = filesystem_for(self.uri, self.storage_options)
        for path in self.files:
            with fs.open(path, "rb") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(BATCH_ROWS, columns=columns):
                    yield pa.Table.from_batches([batch])

    def _read_part(self, relative: str, columns: list[str]) -> pa.Table:
        """One part with its labels joined; label-check columns neither it nor the sidecar
        has (written before the table had source tags) read as nulls: such rows have
        nothing to queue."""
        assert self.table is not None and self.snapshot is not None
        return self.table.read_rows(self.snapshot, relative, columns)


# ---- the best rows so far -------------------------------------------------------------
@dataclass
class Ranked:
    """One part's candidates: row indices with their keys (smaller first), and how to
    describe a row once it is kept (only kept rows are turned into records)."""

    rows: np.ndarray
    primary: np.ndarray
    secondary: np.ndarray
    describe: Callable[[int], dict]  # row index -> the queue row's fields


class TopRows:
    """The `limit` best rows over every part seen, by (primary, secondary, uri)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.kept: list[tuple[float, float, str, dict]] = []

    def add(self, part: pa.Table, ranked: Ranked) -> None:
        if not len(ranked.rows):
            return
        primary = ranked.primary
        if len(primary) > self.limit:  # everything in this part's top `limit` has primary <= the cut
            cut = np.partition(primary, self.limit - 1)[self.limit - 1]
            chosen = np.flatnonzero(primary <= cut)
        else:
            chosen = np.arange(len(primary))
        uris = part.column("uri").take(pa.array(ranked.rows[chosen])).to_pylist()
        candidates = sorted(
            (float(primary[k]), float(ranked.secondary[k]), uri, int(k)) for k, uri in zip(chosen, uris)
        )[: self.limit]
        merged = self.kept + [(p, s, u, ranked.describe(int(ranked.rows[k]))) for p, s, u, k in candidates]
        merged.sort(key=lambda item: item[:3])
        self.kept = merged[: self.limit]

    def records(self, kind: ReviewKind) -> list[dict]:
        return [
            {"rank": i + 1, "uri": uri, "kind": kind.value, **fields, "decision": ""}
            for i, (_, _, uri, fields) in enumerate(self.kept)
        ]


def _flat(column) -> tuple[np.ndarray, pa.Array]:
    """(row index of each list item, the items) of a list column."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pc.list_parent_indices(column).to_numpy(zero_copy_only=False), pc.list_flatten(column)


def _floats(values) -> np.ndarray:
    return np.asarray(values.to_numpy(zero_copy_only=False), np.float64)


def _round(values) -> list:
    return [None if v is None else round(float(v), 4) for v in values]


# ---- the kinds --------------------------------------------------------------------------
def label_ranking(part: pa.Table, kind: ReviewKind, tag: str | None) -> Ranked:
    """likely-wrong / likely-missing: evidence e per flagged tag (1 - p for a doubted human
    tag, p for a missing one); rank by -sum(e), then -max(e)."""
    name = "likely_wrong" if kind is ReviewKind.LIKELY_WRONG else "likely_missing"
    rows, tags = _flat(part.column(name))
    score_rows, scores = _flat(part.column(f"{name}_scores"))
    if len(score_rows) != len(rows) or not np.array_equal(score_rows, rows):
        raise TagpipeError(f"{name} and {name}_scores do not pair up item for item in a part of this table")
    p = _floats(scores)
    evidence = 1.0 - p if kind is ReviewKind.LIKELY_WRONG else p
    keep = np.ones(len(rows), bool) if tag is None else pc.equal(tags, tag).to_numpy(zero_copy_only=False)
    rows, evidence = rows[keep], evidence[keep]
    n = part.num_rows
    total = np.bincount(rows, evidence, minlength=n)
    strongest = np.zeros(n)
    np.maximum.at(strongest, rows, evidence)
    queued = np.flatnonzero(np.bincount(rows, minlength=n) > 0)

    def describe(i: int) -> dict:
        listed = part.column(name)[i].as_py() or []
        listed_scores = part.column(f"{name}_scores")[i].as_py() or []
        pairs = [(t, s) for t, s in zip(listed, listed_scores) if tag is None or t == tag]
        quality = part.column("label_quality")[i].as_py() if "label_quality" in part.column_names else None
        what = (
            "human tags the model doubts" if kind is ReviewKind.LIKELY_WRONG else "tags the humans left out"
        )
        return {
            "score": round(float(total[i]), 4),
            "tags": [t for t, _ in pairs],
            "tag_scores": _round([s for _, s in pairs]),
            "reason": f"{what}: " + ", ".join(f"{t} (p={s:.3f})" for t, s in pairs),
            "label_quality": None if quality is None else round(float(quality), 4),
            "source_tags": part.column("source_tags")[i].as_py()
            if "source_tags" in part.column_names
            else None,
        }

    return Ranked(queued, -total[queued], -strongest[queued], describe)


def ood_ranking(part: pa.Table, tag: str | None) -> Ranked:
    """ood: rows flagged `ood`, by distance, highest first."""
    distance = _floats(part.column("ood_distance"))
    flagged = part.column("ood").fill_null(False).to_numpy(zero_copy_only=False) & ~np.isnan(distance)
    if tag is not None:
        rows, tags = _flat(part.column("tags"))
        carries = np.zeros(part.num_rows, bool)
        carries[rows[pc.equal(tags, tag).to_numpy(zero_copy_only=False)]] = True
        flagged &= carries
    queued = np.flatnonzero(flagged)

    def describe(i: int) -> dict:
        return {
            "score": round(float(distance[i]), 4),
            "tags": [tag] if tag else [],
            "tag_scores": [],
            "reason": f"out of distribution: Mahalanobis distance {distance[i]:.2f} (flagged ood)",
        }

    return Ranked(queued, -distance[queued], np.zeros(len(queued)), describe)


@dataclass
class Thresholds:
    """What the uncertain queue needs of the run's rules: per vocabulary index the
    threshold (inf: never by threshold), the scoring (calibration) and the floor."""

    post: object  # a pipeline.model.postprocess.Postprocessor
    tag_index: int | None = None


def uncertain_ranking(part: pa.Table, rules: Thresholds) -> Ranked:
    """uncertain: stored logits -> probabilities -> scores (calibrated as the run did) ->
    |score - threshold| for every candidate tag (probability at or above the floor) that
    a threshold decides; rows with one within UNCERTAIN_BAND, by the smallest."""
    from pipeline.model.postprocess import Postprocessor, stored_to_probabilities

    post = rules.post
    assert isinstance(post, Postprocessor)
    rows, indices = _flat(part.column("logit_indices"))
    _, values = _flat(part.column("logit_values"))
    cols = indices.to_numpy(zero_copy_only=False).astype(np.int64)
    p = stored_to_probabilities(values.to_numpy(zero_copy_only=False).astype(np.float16), post.activation)
    scores = post.score(cols, p)
    threshold = post.thresholds[cols]
    margin = np.abs(scores.astype(np.float64) - threshold)
    keep = np.isfinite(threshold) & ~post.excluded[cols] & (p >= post.rules.logit_floor)
    keep &= margin < UNCERTAIN_BAND
    if rules.tag_index is not None:
        keep &= cols == rules.tag_index
    rows, cols, scores, threshold, margin = (
        rows[keep],
        cols[keep],
        scores[keep],
        threshold[keep],
        margin[keep],
    )
    order = np.lexsort((cols, margin, rows))  # per row, closest to its threshold first
    rows, cols, scores, threshold, margin = (
        rows[order],
        cols[order],
        scores[order],
        threshold[order],
        margin[order],
    )
    queued, first = np.unique(rows, return_index=True)
    counts = np.diff(np.append(first, len(rows)))

    def describe(i: int) -> dict:
        k = int(np.searchsorted(queued, i))
        span = slice(first[k], first[k] + min(int(counts[k]), REASON_TAGS))
        tags = [str(post.tags[c]) for c in cols[span]]
        shown = [
            f"{t} {s:.3f} vs {th:.3f} ({'in' if s >= th else 'out'})"
            for t, s, th in zip(tags, scores[span], threshold[span])
        ]
        more = f" and {counts[k] - REASON_TAGS} more" if counts[k] > REASON_TAGS else ""
        return {
            "score": round(float(margin[first[k]]), 4),
            "tags": tags,
            "tag_scores": _round(scores[span]),
            "thresholds": _round(threshold[span]),
            "reason": "score near threshold: " + ", ".join(shown) + more,
        }

    return Ranked(queued, margin[first], -counts.astype(np.float64), describe)


def uncertain_rules(source: Source, model: str | None, tag: str | None) -> Thresholds:
    """The Postprocessor the rows were decided with: the bundle (--model, else the run
    manifest's model_dir) under the version's recorded rules (a plain Parquet input: the
    profile's). The bundle must be the model that made the rows."""
    from pipeline.model.bundle import load_bundle
    from pipeline.model.postprocess import Postprocessor
    from pipeline.model.rules import TagRules

    run = _run_manifest(source)
    model = model or run.get("model_dir")
    if not model:
        raise TagpipeError(
            f"--kind uncertain needs the bundle that made {source.uri} (its vocabulary and thresholds): "
            "pass --model DIR"
        )
    bundle = load_bundle(model, run.get("profile") if run.get("model_dir") == model else None)
    made_by = source.snapshot.model_sha256 if source.snapshot else _one_model(source)
    if made_by and made_by != bundle.fingerprint.model_sha256:
        raise TagpipeError(
            f"{source.uri}: made by model {made_by}, not by {model} ({bundle.fingerprint.model_sha256})"
        )
    recorded = source.snapshot.rules.record() if source.snapshot else {}
    rules = TagRules.from_bundle(bundle, **recorded)
    post = Postprocessor(bundle.vocabulary, bundle.profile.activation, rules, None, bundle.tag_metrics)
    index = None
    if tag is not None:
        names = list(bundle.vocabulary.tags)
        if tag not in names:
            raise TagpipeError(f"--tag {tag!r} is not in the vocabulary of {model}{suggestion(tag, names)}")
        index = names.index(tag)
    return Thresholds(post, index)


def _run_manifest(source: Source) -> dict:
    """The run manifest of the newest version a tag run made with this model: a version
    from rethreshold or compare-tags has none of its own, an earlier one names the bundle."""
    if source.snapshot is None or source.table is None:
        return {}
    table, model = source.table, source.snapshot.model_sha256
    for version in sorted((v for v in table.versions() if v <= source.snapshot.version), reverse=True):
        snapshot = table.snapshot(version)
        if snapshot.model_sha256 != model:
            break
        uri = table.full_uri(posixpath.join(RUNS_DIR, f"{snapshot.run_id}.json"))
        try:
            return json.loads(read_bytes(uri, source.storage_options))
        except Exception:  # no manifest of its own: look further back
            continue
    return {}


def _one_model(source: Source) -> str | None:
    for part in source.parts(["model_sha256"]):
        found = part.column("model_sha256").drop_null()
        if len(found):
            return found[0].as_py()
    return None
