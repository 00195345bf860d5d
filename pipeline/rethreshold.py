"""`tagpipe rethreshold`: new tags from stored logits, no model run.

Every tag decision is a function of the stored float16 logits (pipeline/postprocess.py),
so a part's rows can be re-tagged with other thresholds, calibration or OOD cut by
reading the part alone. One Ray task per part writes the re-tagged part under a name
derived from the source part and the new rules (so a rerun skips what is done); the
new parts are committed as one new version (pipeline/table.py). Rows with errors pass
through. The bundle must be the one that made the logits (same model_sha256); its
calibration and OOD reference may be new, which is what rethresholding is for.
The nightly job uses rewrite_part too: to drop deleted or changed rows from a part.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import posixpath
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bundle import load_bundle
from pipeline.errors import TagpipeError
from pipeline.incremental import parts_dir_key, rules_key
from pipeline.postprocess import ARGMAX_CATEGORIES, Postprocessor
from pipeline.progress import Progress, ProgressSettings
from pipeline.table import DATA_DIR, Snapshot, TagTable, now_iso

log = logging.getLogger(__name__)
CHUNK_ROWS = 256  # rows re-tagged per call: bounds the entry arrays, not the vocabulary


@dataclass
class RethresholdSummary:
    parts: int = 0
    parts_skipped: int = 0
    rows: int = 0
    rows_changed: int = 0
    version: int = 0  # the committed version
    seconds: float = 0.0
    by_part: list = field(default_factory=list)

    def text(self) -> str:
        return (
            f"rethreshold: {self.parts} parts ({self.parts_skipped} already done), {self.rows} rows, "
            f"{self.rows_changed} with different tags, committed as version {self.version}, {self.seconds:.1f} s"
        )


def retag_table(table: pa.Table, post: Postprocessor, calibration_sha256: str, run_id: str, recompute_ood: bool) -> tuple[pa.Table, int]:
    """(re-tagged table, rows whose tags changed). Same schema and row order."""
    n = table.num_rows
    ok = np.asarray([e is None for e in table.column("error").to_pylist()])
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
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


def rewrite_name(source_file: str, key: str, drop: list[str]) -> str:
    """A rewritten part's name: from its source part, what it drops and the settings
    key, so a rerun finds it done."""
    digest = hashlib.sha256(f"{source_file}\0{key}".encode())
    for uri in sorted(drop):
        digest.update(b"\0" + uri.encode())
    return posixpath.join(DATA_DIR, key, f"part-{digest.hexdigest()[:24]}.parquet")


def rewrite_part(
    source_uri: str, source_file: str, target_uri: str, target_file: str, drop: list[str], model_dir: str | None, rules: dict | None, run_id: str,
    storage_options: dict, fingerprint: tuple[str, str] | None = None,
) -> tuple[str | None, int, int, bool]:
    """One part, copied without the `drop` rows and (with rules) re-tagged from its stored
    logits. Returns (target file or None when no row is left, rows, rows whose tags
    changed, whether it was already written by an earlier attempt).

    OOD distances are recomputed (from the stored float16 embedding) only when the
    bundle's OOD reference differs from the one the part was made with. `fingerprint`
    (model_sha256, calibration_sha256) is the bundle as the driver loaded it."""
    target = TagTable(target_uri, storage_options)
    if target.exists(target_file):
        return target_file, target.read_part_metadata(target_file).num_rows, 0, True
    table = TagTable(source_uri, storage_options).read_part(source_file)
    if drop:
        table = table.filter(pc.invert(pc.is_in(table.column("uri"), pa.array(drop, pa.string()))))
    if not table.num_rows:
        return None, 0, 0, False
    changed = 0
    if rules is not None:
        bundle, post = _postprocessor(model_dir, json.dumps(rules_record(rules), sort_keys=True), fingerprint)
        if fingerprint and (bundle.fingerprint.model_sha256, bundle.fingerprint.calibration_sha256) != tuple(fingerprint):
            raise TagpipeError(f"{model_dir}: the bundle's files changed while this run was working; rerun")
        shas = set(table.column("model_sha256").drop_null().to_pylist())
        if shas - {bundle.fingerprint.model_sha256}:
            raise TagpipeError(f"{source_uri}/{source_file}: made by model {sorted(shas)}, not by {model_dir} ({bundle.fingerprint.model_sha256})")
        new_reference = set(table.column("calibration_sha256").drop_null().to_pylist()) != {bundle.fingerprint.calibration_sha256}
        table, changed = retag_table(table, post, bundle.fingerprint.calibration_sha256, run_id, recompute_ood=new_reference)
    target.write_part(target_file, table)
    return target_file, table.num_rows, changed, False


@functools.lru_cache(maxsize=4)
def _postprocessor(model_dir: str, rules_json: str, fingerprint: tuple[str, str] | None):
    """One bundle load (it hashes the model file) per worker process, not per part:
    Ray runs many rewrite tasks in the same worker. Keyed by the bundle's fingerprint as
    the driver loaded it, so a long-lived worker never serves a bundle whose model,
    calibration or OOD file was replaced since."""
    bundle = load_bundle(model_dir)
    rules = json.loads(rules_json)  # back from JSON: lists to the TagRules types
    if "mcut_categories" in rules:
        rules["mcut_categories"] = tuple(rules["mcut_categories"])
    if "exclude" in rules:
        rules["exclude"] = frozenset(rules["exclude"])
    return bundle, Postprocessor.for_bundle(bundle, **rules)


def rewrite_parts(
    jobs: list[dict], storage_options: dict, progress_label: str, progress: ProgressSettings = ProgressSettings()
) -> list[tuple[str | None, int, int, bool]]:
    """Run rewrite_part for each job (keyword dicts) as Ray tasks, in job order."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=3)(rewrite_part)
    refs = [task.remote(**job, storage_options=storage_options) for job in jobs]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    with Progress(progress_label, len(refs), "parts", progress) as shown:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            results[index[ready[0]]] = ray.get(ready[0])
            shown.update(1)
    return results


def run_rethreshold(tags: str, model_dir: str, output: str | None, rules: dict, storage_options: dict | None = None, ray_address: str | None = None, run_id: str | None = None) -> RethresholdSummary:
    """Re-tag a table's current version with new rules: into `output` as a new table,
    or (output None or the same) in place as a new version of the same table."""
    from pipeline.tag_job import ensure_ray, new_run_id

    started = time.monotonic()
    storage_options = storage_options or {}
    bundle = load_bundle(model_dir)  # a bad bundle or bad rules stop here, before any work
    Postprocessor.for_bundle(bundle, **rules)
    source = TagTable(tags, storage_options)
    base = source.snapshot()
    if base.model_sha256 != bundle.fingerprint.model_sha256:
        raise TagpipeError(f"{tags}: made by model {base.model_sha256}, not by {model_dir} ({bundle.fingerprint.model_sha256}); rethreshold needs the same model")
    target = source if output is None or output.rstrip("/") == source.uri else TagTable(output, storage_options)
    target_base = target.sync_current()
    if target is not source and target_base is not None and target_base.inference_key != base.inference_key:
        raise TagpipeError(f"{output} holds a table from other inference settings; rethreshold into a new directory or into {tags} itself")
    new_rules_key = rules_key(bundle, rules)
    key = parts_dir_key(base.inference_key, new_rules_key)
    run_id = run_id or new_run_id()
    jobs = [
        dict(source_uri=source.uri, source_file=f, target_uri=target.uri, target_file=rewrite_name(f, key, []), drop=[], model_dir=model_dir, rules=rules, run_id=run_id,
             fingerprint=(bundle.fingerprint.model_sha256, bundle.fingerprint.calibration_sha256))
        for f in base.files
    ]
    summary = RethresholdSummary(parts=len(jobs))
    if jobs:
        ensure_ray(ray_address)
        for file, rows, changed, existed in rewrite_parts(jobs, storage_options, "rethreshold"):
            summary.rows += rows
            summary.rows_changed += changed
            summary.parts_skipped += existed
            summary.by_part.append(file)
    files = tuple(sorted(f for f in summary.by_part if f))
    if target_base is not None and target_base.files == files:  # a repeat of a finished rethreshold
        summary.version = target_base.version
        summary.seconds = round(time.monotonic() - started, 3)
        return summary
    snapshot = Snapshot(
        version=(target_base.version if target_base else 0) + 1,
        files=files,
        rows=summary.rows,
        model_sha256=base.model_sha256,
        inference_key=base.inference_key,
        rules_key=new_rules_key,
        run_id=run_id,
        committed_at=now_iso(),
        model_name=base.model_name,
        rules=rules_record(rules),
        counts={"rethresholded": summary.rows, "rows_changed": summary.rows_changed, "source_version": base.version},
    )
    target.commit(target_base, snapshot)
    summary.version = snapshot.version
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def rules_record(rules: dict) -> dict:
    """Rules as JSON-friendly values, for snapshots and run manifests."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else list(v) if isinstance(v, tuple) else v for k, v in rules.items()}
