"""`tagpipe rethreshold`: new tags from stored logits, no model run.

Every tag decision is a function of the stored float16 logits (pipeline/postprocess.py),
so a part's rows can be re-tagged with other thresholds, calibration or OOD cut by
reading the part alone. One Ray task per part; each writes a part of the same name to
the output (atomically), so a rerun skips what is done. Rows with errors pass through.
The bundle must be the one that made the logits (same model_sha256); its calibration
and OOD reference may be new, which is what rethresholding is for.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bundle import load_bundle
from pipeline.errors import TagpipeError
from pipeline.output import OutputDir
from pipeline.postprocess import ARGMAX_CATEGORIES, Postprocessor

log = logging.getLogger(__name__)
CHUNK_ROWS = 256  # rows densified at once: 256 x 108k float16 = 55 MB


@dataclass
class RethresholdSummary:
    parts: int = 0
    parts_skipped: int = 0
    rows: int = 0
    rows_changed: int = 0
    seconds: float = 0.0
    by_part: list = field(default_factory=list)

    def text(self) -> str:
        return (
            f"rethreshold: {self.parts} parts ({self.parts_skipped} already done), {self.rows} rows, "
            f"{self.rows_changed} with different tags, {self.seconds:.1f} s"
        )


def retag_table(table: pa.Table, post: Postprocessor, calibration_sha256: str, run_id: str, recompute_ood: bool) -> tuple[pa.Table, int]:
    """(re-tagged table, rows whose tags changed). Same schema and row order."""
    n = table.num_rows
    ok = np.asarray([e is None for e in table.column("error").to_pylist()])
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    changed = 0
    width = len(post.vocabulary)
    rows = np.flatnonzero(ok & np.asarray([v is not None for v in columns["logit_indices"]]))
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[start : start + CHUNK_ROWS]
        stored = np.zeros((len(chunk), width), np.float16)
        known = np.zeros((len(chunk), width), bool)
        for j, r in enumerate(chunk):
            idx = np.asarray(columns["logit_indices"][r], np.int64)
            stored[j, idx] = np.asarray(columns["logit_values"][r], np.float16)
            known[j, idx] = True
        embeddings = None
        if recompute_ood and post.ood is not None and columns["embedding"][chunk[0]] is not None:
            embeddings = np.asarray([columns["embedding"][r] for r in chunk], np.float32)
        out = post.from_stored(stored, embeddings, known)
        for j, r in enumerate(chunk):
            changed += set(out["tags"][j]) != set(columns["tags"][r] or [])
            for key in ("tags", "scores", *ARGMAX_CATEGORIES):
                columns[key][r] = out[key][j]
            for name in post.category_names:
                columns[f"tags_{name}"][r] = out[f"tags_{name}"][j]
            if embeddings is not None:
                columns["ood_distance"][r] = out["ood_distance"][j]
            distance = columns["ood_distance"][r]
            columns["ood"][r] = None if distance is None or post.ood_cut is None else bool(distance > post.ood_cut)
    columns["calibration_sha256"] = [calibration_sha256] * n
    columns["run_id"] = [run_id] * n
    arrays = []
    for name in table.column_names:
        kind = table.schema.field(name).type
        values = columns[name]
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            values = [None if v is None else list(v) for v in values]
        arrays.append(pa.array(values, kind))
    return pa.Table.from_arrays(arrays, schema=table.schema), changed


def rethreshold_part(tags: str, name: str, output: str, model_dir: str, rules: dict, run_id: str, storage_options: dict) -> tuple[str, int, int]:
    """One part: read, re-tag, write under the same name. Returns (name, rows, changed).

    OOD distances are recomputed (from the stored float16 embedding) only when the
    bundle's OOD reference differs from the one the part was made with."""
    bundle = load_bundle(model_dir)
    post = Postprocessor.for_bundle(bundle, **rules)
    source = OutputDir(tags, storage_options)
    with source.fs.open(source._join(name), "rb") as handle:
        table = pq.read_table(handle)
    shas = set(table.column("model_sha256").drop_null().to_pylist())
    if shas - {bundle.fingerprint.model_sha256}:
        raise TagpipeError(f"{tags}/{name}: made by model {sorted(shas)}, not by {model_dir} ({bundle.fingerprint.model_sha256})")
    new_reference = set(table.column("calibration_sha256").drop_null().to_pylist()) != {bundle.fingerprint.calibration_sha256}
    retagged, changed = retag_table(table, post, bundle.fingerprint.calibration_sha256, run_id, recompute_ood=new_reference)
    OutputDir(output, storage_options).write_part(name, retagged)
    return name, table.num_rows, changed


def run_rethreshold(tags: str, model_dir: str, output: str, rules: dict, storage_options: dict | None = None, ray_address: str | None = None, run_id: str | None = None) -> RethresholdSummary:
    from pipeline.tag_job import ensure_ray, new_run_id

    started = time.monotonic()
    storage_options = storage_options or {}
    bundle = load_bundle(model_dir)  # a bad bundle or bad rules stop here, before any work
    Postprocessor.for_bundle(bundle, **rules)
    source, target = OutputDir(tags, storage_options), OutputDir(output, storage_options)
    if source.uri.rstrip("/") == target.uri.rstrip("/"):
        raise TagpipeError("--output must differ from --tags: rethreshold writes a new table and keeps the old one")
    parts = source.part_files()
    if not parts:
        raise TagpipeError(f"no part-*.parquet files under {tags}")
    with source.fs.open(parts[0], "rb") as handle:  # fail fast, before any task: the right model?
        shas = set(pq.read_table(handle, columns=["model_sha256"]).column("model_sha256").drop_null().to_pylist())
    if shas - {bundle.fingerprint.model_sha256}:
        raise TagpipeError(f"{tags}: made by model {sorted(shas)}, not by {model_dir} ({bundle.fingerprint.model_sha256}); rethreshold needs the same model")
    done = {posixpath.basename(p) for p in target.part_files()}
    todo = [p for p in parts if posixpath.basename(p) not in done]
    summary = RethresholdSummary(parts=len(parts), parts_skipped=len(parts) - len(todo))
    run_id = run_id or new_run_id()
    if todo:
        ensure_ray(ray_address)
        import ray

        task = ray.remote(num_cpus=1, max_retries=3)(rethreshold_part)
        pending = [task.remote(tags, posixpath.basename(p), output, model_dir, rules, run_id, storage_options) for p in todo]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            name, rows, changed = ray.get(ready[0])
            summary.rows += rows
            summary.rows_changed += changed
            summary.by_part.append(name)
            log.info("rethresholded %d/%d parts (%d rows)", len(summary.by_part), len(todo), summary.rows)
    summary.seconds = round(time.monotonic() - started, 3)
    return summary
