"""`tagpipe rethreshold`: new tags from stored logits, no model run.

Every tag decision is a function of the stored float16 logits (pipeline/model/postprocess.py),
so a part's rows can be re-tagged with other thresholds, calibration or OOD cut by
reading the part alone. One Ray task per part writes the re-tagged part under a name
derived from the source part and the new rules (so a rerun skips what is done); the
new parts are committed as one new version (pipeline/table/tag_table.py). Rows with errors pass
through. The bundle must be the one that made the logits (same model_sha256); its
calibration and OOD reference may be new, which is what rethresholding is for.
Rewriting parts is the table layer's (pipeline/table/rewrite.py); this module gives it the
Rethreshold transform. Labels files (the label sidecar) go along unchanged: the same files in
place, copies into another table; `compare-tags` checks the new tags again.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.errors import TagpipeError
from pipeline.core.words import counted
from pipeline.job.incremental import parts_dir_key, rules_key
from pipeline.model.bundle import load_bundle
from pipeline.model.postprocess import ARGMAX_CATEGORIES, Postprocessor
from pipeline.model.rules import RuleSettings
from pipeline.table.rewrite import RewriteJob, rewrite_name, rewrite_parts
from pipeline.table.tag_table import TagTable, commit_version
from pipeline.table.version_fields import RulesRecord, VersionCounts

log = logging.getLogger(__name__)
CHUNK_ROWS = 256  # rows re-tagged per call: bounds the entry arrays, not the vocabulary


@dataclass(frozen=True)
class RethresholdSummary:
    """A rethreshold's report, built once its parts are rewritten (the version and time
    added when it commits)."""

    parts: int = 0
    parts_skipped: int = 0
    rows: int = 0
    rows_changed: int = 0
    version: int = 0  # the committed version
    seconds: float = 0.0
    by_part: tuple[str | None, ...] = ()  # each part's rewrite (None: no row left)
    unchanged: bool = False  # the rules were the version's own: nothing re-tagged, nothing committed

    def text(self) -> str:
        if self.unchanged:
            return (
                f"rethreshold: the rules are version {self.version}'s own: nothing to re-tag, "
                "nothing committed (give new threshold options)"
            )
        return (
            f"rethreshold: {counted(self.parts, 'parts')} ({self.parts_skipped} already done), "
            f"{counted(self.rows, 'rows')}, "
            f"{self.rows_changed} with different tags, committed as version {self.version}, "
            f"{self.seconds:.1f} s"
        )


def retag_table(
    table: pa.Table, post: Postprocessor, calibration_sha256: str, run_id: str, recompute_ood: bool
) -> tuple[pa.Table, int]:
    """(re-tagged table, rows whose tags changed). Same schema and row order."""
    n = table.num_rows
    ok = np.asarray([e is None for e in table.column("error").to_pylist()])
    columns: dict[str, Any] = {name: table.column(name).to_pylist() for name in table.column_names}
    changed = 0
    rows = np.flatnonzero(ok & np.asarray([v is not None for v in columns["logit_indices"]]))
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[start : start + CHUNK_ROWS]
        indices = [np.asarray(columns["logit_indices"][r], np.int64) for r in chunk]
        entry_rows = np.repeat(np.arange(len(chunk)), [len(i) for i in indices])
        entry_cols = np.concatenate(indices) if indices else np.zeros(0, np.int64)
        values = np.concatenate([np.asarray(columns["logit_values"][r], np.float16) for r in chunk])
        order = np.lexsort((entry_cols, entry_rows))
        embeddings = None
        if recompute_ood and post.ood is not None and columns["embedding"][chunk[0]] is not None:
            embeddings = np.asarray([columns["embedding"][r] for r in chunk], np.float32)
        out = post.from_entries(len(chunk), entry_rows[order], entry_cols[order], values[order], embeddings)
        for j, r in enumerate(chunk):
            changed += set(out["tags"][j]) != set(columns["tags"][r] or [])
            for key in ("tags", "scores", *ARGMAX_CATEGORIES):
                columns[key][r] = out[key][j]
            for name in post.category_names:
                columns[f"tags_{name}"][r] = out[f"tags_{name}"][j]
            if embeddings is not None:
                columns["ood_distance"][r] = out["ood_distance"][j]
            distance = columns["ood_distance"][r]
            columns["ood"][r] = (
                None if distance is None or post.ood_cut is None else bool(distance > post.ood_cut)
            )
    columns["calibration_sha256"] = [calibration_sha256] * n
    columns["run_id"] = [run_id] * n
    arrays = []
    for name in table.column_names:
        kind = table.schema.field(name).type
        column: Any = columns[name]
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            column = [None if v is None else list(v) for v in column]
        arrays.append(pa.array(column, kind))
    return pa.Table.from_arrays(arrays, schema=table.schema), changed


@dataclass(frozen=True)
class Rethreshold:
    """The PartTransform rethreshold gives each part's rewrite: its rows re-tagged from
    their stored logits with new rules. OOD distances are recomputed (from the stored
    float16 embedding) only when the bundle's OOD reference differs from the one the part
    was made with. `fingerprint` (model_sha256, calibration_sha256) is the bundle as the
    driver loaded it."""

    model_dir: str
    rules: RuleSettings
    run_id: str
    fingerprint: tuple[str, str]

    def __call__(self, table: pa.Table, source: str) -> tuple[pa.Table, int]:
        rules_json = self.rules.model_dump_json()
        bundle, post = _postprocessor(self.model_dir, rules_json, self.fingerprint)
        fp = bundle.fingerprint
        if (fp.model_sha256, fp.calibration_sha256) != tuple(self.fingerprint):
            raise TagpipeError(
                f"{self.model_dir}: the bundle's files changed while this run was working; rerun"
            )
        shas = set(table.column("model_sha256").drop_null().to_pylist())
        if shas - {fp.model_sha256}:
            raise TagpipeError(
                f"{source}: made by model {sorted(shas)}, not by {self.model_dir} ({fp.model_sha256})"
            )
        made_with = set(table.column("calibration_sha256").drop_null().to_pylist())
        return retag_table(
            table,
            post,
            fp.calibration_sha256,
            self.run_id,
            recompute_ood=made_with != {fp.calibration_sha256},
        )


@functools.lru_cache(maxsize=4)
def _postprocessor(model_dir: str, rules_json: str, fingerprint: tuple[str, str] | None):
    """One bundle load (it hashes the model file) per worker process, not per part:
    Ray runs many rewrite tasks in the same worker. Keyed by the bundle's fingerprint as
    the driver loaded it, so a long-lived worker never serves a bundle whose model,
    calibration or OOD file was replaced since."""
    bundle = load_bundle(model_dir)
    return bundle, Postprocessor.for_bundle(bundle, RuleSettings.model_validate_json(rules_json))


def run_rethreshold(
    tags: str,
    model_dir: str,
    output: str | None,
    rules: RuleSettings,
    storage_options: dict | None = None,
    ray_address: str | None = None,
    run_id: str | None = None,
) -> RethresholdSummary:
    """Re-tag a table's current version with new rules: into `output` as a new table,
    or (output None or the same) in place as a new version of the same table."""
    from pipeline.core.ray_session import new_run_id

    started = time.monotonic()
    storage_options = storage_options or {}
    bundle = load_bundle(model_dir)  # a bad bundle or bad rules stop here, before any work
    Postprocessor.for_bundle(bundle, rules)
    source = TagTable(tags, storage_options)
    base = source.snapshot()
    if base.model_sha256 != bundle.fingerprint.model_sha256:
        raise TagpipeError(
            f"{tags}: made by model {base.model_sha256}, not by {model_dir} "
            f"({bundle.fingerprint.model_sha256}); rethreshold needs the same model"
        )
    target = (
        source if output is None or output.rstrip("/") == source.uri else TagTable(output, storage_options)
    )
    target_base = target.sync_current()
    if target is not source and target_base is not None and target_base.inference_key != base.inference_key:
        raise TagpipeError(
            f"{output} holds a table from other inference settings; "
            f"rethreshold into a new directory or into {tags} itself"
        )
    new_rules_key = rules_key(bundle, rules)
    if target is source and base.rules_key == new_rules_key:  # a new version would repeat this one
        return RethresholdSummary(
            parts=len(base.files),
            version=base.version,
            unchanged=True,
            seconds=round(time.monotonic() - started, 3),
        )
    key = parts_dir_key(base.inference_key, new_rules_key)
    run_id = run_id or new_run_id()
    rethreshold = Rethreshold(
        model_dir, rules, run_id, (bundle.fingerprint.model_sha256, bundle.fingerprint.calibration_sha256)
    )
    jobs = [
        RewriteJob(
            source.uri,
            f,
            target.uri,
            rewrite_name(f, key, ()),
            transform=rethreshold,
            labels=base.labels.get(f),
        )
        for f in base.files
    ]
    summary, labels = _rewritten(jobs, storage_options, ray_address)
    files = tuple(sorted(f for f in summary.by_part if f))
    if target_base is not None and (target_base.files, target_base.labels) == (files, labels):  # a repeat
        return replace(summary, version=target_base.version, seconds=round(time.monotonic() - started, 3))
    snapshot = commit_version(
        target,
        target_base,
        files,
        model_sha256=base.model_sha256,
        inference_key=base.inference_key,
        rules_key=new_rules_key,
        run_id=run_id,
        model_name=base.model_name,
        rules=RulesRecord.from_record(rules.record()),
        counts=VersionCounts(
            rethresholded=summary.rows, rows_changed=summary.rows_changed, source_version=base.version
        ),
        rows=summary.rows,
        labels=labels,
    )
    return replace(summary, version=snapshot.version, seconds=round(time.monotonic() - started, 3))


def _rewritten(
    jobs: list[RewriteJob], storage_options: dict, ray_address: str | None
) -> tuple[RethresholdSummary, dict[str, str]]:
    """Every part rewritten (Ray tasks): what they counted, and each new part's labels file."""
    from pipeline.core.ray_session import ensure_ray

    results, labels = [], {}
    if jobs:
        ensure_ray(ray_address)
        results = list(rewrite_parts(jobs, storage_options, "rethreshold"))
    for result in results:
        if result.file and result.labels:
            labels[result.file] = result.labels
    summary = RethresholdSummary(
        parts=len(jobs),
        parts_skipped=sum(r.already_done for r in results),
        rows=sum(r.rows for r in results),
        rows_changed=sum(r.rows_changed for r in results),
        by_part=tuple(r.file for r in results),
    )
    return summary, labels
