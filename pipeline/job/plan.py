"""What a tag run must do, decided before any work: a pure function of data.

plan_run compares the listing with the table's current version (classified by
changes.classify, by position into the listing) and with the keys of this run's
settings, and says what to tag, what an interrupted run already tagged (reused), which
of the base's parts to keep as they are, which to rewrite without dropped rows (and
rethreshold, when the rules changed), and the kind of change. It reads nothing itself
but the parts it is given a reader for, so every case is a small table-driven test
(tests/job/test_plan.py); the tag job (pipeline/job/tag_job.py) then executes the plan
and commits.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import TagpipeError
from pipeline.core.words import counted
from pipeline.job.changes import VIEW_SCHEMA, Changes
from pipeline.job.incremental import (
    CHANGED,
    DELETED,
    NEW,
    RETRY,
    UNCHANGED,
    Keys,
    Reuse,
    reusable_parts,
)
from pipeline.table.tag_table import Snapshot


class Change(enum.StrEnum):
    """The kind of run, as the summary line says it."""

    FIRST_RUN = "first run"
    INCREMENTAL = "incremental"  # same settings: new, changed and retried images only
    RULES_CHANGED = "rules changed"  # same inference: stored logits rethresholded
    INFERENCE_CHANGED = "inference settings changed"  # every listed image tagged again
    NO_CHANGE = "no change"
    SOURCE_TAGS_CHANGED = "source tags changed"  # nothing to tag or drop: the label check's labels moved


@dataclass(frozen=True)
class PartRewrite:
    """One part of the base copied without `drop` (uris), re-tagged when the rules changed."""

    file: str
    drop: tuple[str, ...]


@dataclass(frozen=True)
class Counts:
    new: int = 0  # listed, not in the table
    changed: int = 0  # in the table, source changed (etag / size+mtime / sha256)
    deleted: int = 0  # in the table, no longer listed
    skipped: int = 0  # unchanged, kept as they are
    retried: int = 0  # unchanged but stored with a transient error: tagged again
    reinferred: int = 0  # unchanged but inferred again because the inference settings changed


@dataclass(frozen=True)
class Plan:
    change: Change
    counts: Counts
    to_tag: pa.Table  # manifest rows sent to the model (after reuse)
    reuse: Reuse  # parts an interrupted run with the same settings wrote, taken as they are
    keep: tuple[str, ...]  # base parts kept as they are
    rewrites: tuple[PartRewrite, ...]
    rethreshold: bool  # rewrites also re-tag from stored logits (the rules changed)
    commits: bool  # whether the run commits a version (else: no change)
    deleted_share: float = 0.0  # deleted rows / base rows


def empty_view() -> pa.Table:
    """The table side of classify when there is no table yet."""
    return VIEW_SCHEMA.empty_table()


def _change(base: Snapshot | None, same_inference: bool, same_rules: bool) -> Change:
    if base is None:
        return Change.FIRST_RUN
    if same_rules:
        return Change.INCREMENTAL
    return Change.RULES_CHANGED if same_inference else Change.INFERENCE_CHANGED


def plan_run(
    changes: Changes,
    base: Snapshot | None,
    keys: Keys,
    reuse_candidates: list[str] | tuple[str, ...] = (),
    read_part: Callable[..., pa.Table] | None = None,
    max_delete_fraction: float = 1.0,
) -> Plan:
    """The plan for one run. changes: classify's answer for the listing, unknowns
    resolved; keys: this run's (inference, rules); reuse_candidates: parts under this
    run's settings key that no version names (read with read_part). A run that would
    delete more than max_delete_fraction of the base's rows is refused here, before
    anything is written. Rows are picked by position: no uri is copied but those tagged
    and those dropped from the base's parts."""
    same_inference = base is not None and base.inference_key == keys.inference
    same_rules = same_inference and base is not None and base.rules_key == keys.rules
    tally = changes.tally()
    manifest = changes.manifest
    if same_inference:
        counts = Counts(tally[NEW], tally[CHANGED], tally[DELETED], tally[UNCHANGED], tally[RETRY], 0)
        redo = changes.listed_in(NEW, CHANGED, RETRY)
        to_infer = manifest if redo.all() else manifest.filter(pa.array(redo))  # a first run: no copy
        drop = changes.listed_in(CHANGED, RETRY)
    else:  # a new model (or decode/profile settings): every listed image is tagged again
        counts = Counts(
            tally[NEW], tally[CHANGED], tally[DELETED], reinferred=tally[UNCHANGED] + tally[RETRY]
        )
        to_infer = manifest
        drop = np.ones(manifest.num_rows, bool)
    share = counts.deleted / base.rows if base is not None and base.rows else 0.0
    if base is not None and counts.deleted and share > max_delete_fraction:
        raise TagpipeError(
            f"this run would delete {counts.deleted} of the table's {counted(base.rows, 'rows')} "
            f"({share:.0%}), "
            f"more than max_delete_fraction={max_delete_fraction}: is an input missing or misspelled? "
            f"Nothing was changed; to accept, rerun with --max-delete-fraction 1"
        )
    reuse = reusable_parts(list(reuse_candidates), read_part, to_infer) if read_part else Reuse()
    to_tag = to_infer
    if reuse.uris:
        reused = pc.is_in(to_infer.column("uri"), pa.array(sorted(reuse.uris), pa.string()))
        to_tag = to_infer.filter(pc.invert(reused))
    keep, rewrites = _base_parts(base, changes, drop, same_inference, same_rules)
    commits = base is None or not same_inference or bool(to_tag.num_rows or reuse.rows or rewrites)
    change = _change(base, same_inference, same_rules) if commits else Change.NO_CHANGE
    return Plan(change, counts, to_tag, reuse, keep, rewrites, not same_rules, commits, share)


def _base_parts(
    base: Snapshot | None, changes: Changes, drop: np.ndarray, same_inference: bool, same_rules: bool
) -> tuple[tuple[str, ...], tuple[PartRewrite, ...]]:
    """The base's parts: (kept as they are, rewritten without dropped rows or
    rethresholded). Dropped: the listed rows `drop` marks that a part holds, and every
    deleted row. Nothing of the base is kept when the inference settings changed."""
    if base is None or not same_inference:
        return (), ()
    rows = np.flatnonzero(drop & (changes.files >= 0))  # only these rows' uris become Python strings
    files = np.concatenate([changes.files[rows], changes.deleted.column("_file").to_numpy()])
    uris = pa.chunked_array(
        [*changes.manifest.column("uri").take(pa.array(rows)).chunks, *changes.deleted.column("uri").chunks],
        pa.string(),
    )
    order = pc.sort_indices(uris).to_numpy()  # each part's dropped uris in uri order
    dropped: dict[int, list[str]] = collections.defaultdict(list)
    for file, uri in zip(files[order].tolist(), uris.take(pa.array(order)).to_pylist(), strict=True):
        dropped[file].append(uri)
    keep, rewrites = [], []
    for index, file in enumerate(base.files):
        if same_rules and index not in dropped:
            keep.append(file)
        else:
            rewrites.append(PartRewrite(file, tuple(dropped.get(index, []))))
    return tuple(keep), tuple(rewrites)
