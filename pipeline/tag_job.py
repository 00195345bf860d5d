"""`tagpipe tag`: list inputs, skip what is done, run the Ray graph, commit parts.

The driver only routes finished rows into their slice's part file and commits it;
decode and inference run in Ray tasks and actors placed by pipeline/graph.py.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import __version__
from pipeline.bundle import load_bundle
from pipeline.config import TagJobConfig, tag_rules
from pipeline.graph import DECODE_NODE, TAGGER_NODE, build_tag_dataset, plan_placement
from pipeline.manifest import build_manifest
from pipeline.output import OutputDir, part_name
from pipeline.postprocess import Postprocessor
from pipeline.tagger import TaggerSettings

log = logging.getLogger(__name__)
SHARD = "_shard"


@dataclass
class RunSummary:
    run_id: str
    output: str
    images: int = 0  # rows written by this run
    ok: int = 0
    errors: int = 0
    errors_by_kind: dict = field(default_factory=dict)
    skipped: int = 0  # already in the output for this model
    listed: int = 0
    parts: list = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    placement: str = ""
    model_name: str = ""
    model_sha256: str = ""
    timings: dict = field(default_factory=dict)
    rows_by_node: dict = field(default_factory=dict)  # {"decode": {node_id: rows}, "tag": {...}}

    def text(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_kind.items())) or "none"
        return (
            f"run {self.run_id}: {self.images} images tagged ({self.ok} ok, {self.errors} errors: {kinds}), "
            f"{self.skipped} already done, {self.seconds:.1f} s, {self.images_per_second:.1f} img/s -> {self.output}"
        )


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def ensure_ray(address: str | None) -> None:
    """None (and no RAY_ADDRESS): start a new local Ray, the embedded default, even if
    another one runs on this machine; 'auto' or an address: join that cluster."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)


def run_tag_job(cfg: TagJobConfig) -> RunSummary:
    started = time.monotonic()
    bundle = load_bundle(cfg.model, cfg.profile)  # a bad bundle stops here, before any image
    # and so do rules the bundle cannot serve (per-tag thresholds without best_thr, ...)
    Postprocessor.for_bundle(bundle, **tag_rules(cfg))
    run_id = cfg.run_id or new_run_id()
    fp = bundle.fingerprint
    summary = RunSummary(run_id=run_id, output=cfg.output, model_name=bundle.name, model_sha256=fp.model_sha256)
    ensure_ray(cfg.ray_address)
    import ray

    out = OutputDir(cfg.output, cfg.storage_options)
    t = time.monotonic()
    manifest = build_manifest(list(cfg.inputs), cfg.storage_options)
    summary.listed = manifest.num_rows
    manifest_path = out.write_input_manifest(run_id, manifest)
    done = out.done_uris(fp.model_sha256)
    pending = manifest.filter(pc.invert(pc.is_in(manifest.column("uri"), pa.array(sorted(done), pa.string())))) if done else manifest
    summary.skipped = manifest.num_rows - pending.num_rows
    summary.timings["list_seconds"] = round(time.monotonic() - t, 3)
    log.info("%d inputs listed, %d already tagged with this model, %d to do", manifest.num_rows, summary.skipped, pending.num_rows)

    shard_ids = np.arange(pending.num_rows, dtype=np.int64) // cfg.rows_per_part
    pending = pending.append_column(SHARD, pa.array(shard_ids))
    expected = collections.Counter(shard_ids.tolist())
    placement = plan_placement(cfg, ray.cluster_resources().get("GPU", 0))
    summary.placement = placement.describe()
    settings = TaggerSettings(
        model_dir=str(bundle.directory),
        profile=bundle.profile,
        provider=cfg.provider,
        intra_op_threads=placement.intra_op_threads,
        run_id=run_id,
        dense_logits=cfg.dense_logits,
        normalise_in_graph=cfg.normalise_in_graph,
        rules=tag_rules(cfg),
    )
    t = time.monotonic()
    if pending.num_rows:
        block_rows = max(cfg.decode_batch_size, 64)
        work = pending.select(["uri", SHARD])  # the rest of the manifest is joined back at commit
        blocks = [work.slice(i, block_rows) for i in range(0, work.num_rows, block_rows)]
        dataset = build_tag_dataset(blocks, cfg, bundle.profile.preprocess, settings, placement)
        buffers: dict[int, list[pa.Table]] = collections.defaultdict(list)
        counts: collections.Counter = collections.Counter()
        nodes = {"decode": collections.Counter(), "tag": collections.Counter()}
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for stage, column in (("decode", DECODE_NODE), ("tag", TAGGER_NODE)):
                nodes[stage].update(batch.column(column).to_pylist())
            batch = batch.drop_columns([DECODE_NODE, TAGGER_NODE])
            shards = batch.column(SHARD).to_numpy()
            for shard in np.unique(shards).tolist():
                mask = shards == shard
                buffers[shard].append(batch.filter(pa.array(mask)))
                counts[shard] += int(mask.sum())
                if counts[shard] == expected[shard]:
                    _commit(out, buffers.pop(shard), pending, cfg.rows_per_part, fp.model_sha256, summary)
                    _progress(summary, pending.num_rows, t)
        summary.rows_by_node = {stage: dict(counter) for stage, counter in nodes.items()}
        if buffers:  # Ray returned fewer rows than sent: commit nothing partial; a rerun redoes them
            missing = {shard: f"{counts[shard]}/{expected[shard]}" for shard in sorted(buffers)}
            raise RuntimeError(f"slices came back incomplete (rows received/sent): {missing}; rerun to finish them")
    summary.timings["tag_seconds"] = round(time.monotonic() - t, 3)
    summary.seconds = round(time.monotonic() - started, 3)
    summary.images_per_second = round(summary.images / summary.timings["tag_seconds"], 2) if summary.images else 0.0
    out.write_run_manifest(
        run_id,
        {
            "run_id": run_id,
            "tagpipe_version": __version__,
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "inputs": list(cfg.inputs),
            "input_manifest": manifest_path,
            "model_dir": str(bundle.directory),
            "profile": bundle.profile.name,
            "fingerprint": asdict(fp),
            "settings": {k: v for k, v in asdict(cfg).items() if k not in ("storage_options",)},
            "summary": asdict(summary),
        },
    )
    return summary


def _commit(out: OutputDir, tables: list[pa.Table], manifest: pa.Table, rows_per_part: int, model_sha256: str, summary: RunSummary) -> None:
    table = pa.concat_tables(tables, promote_options="default").sort_by("uri")
    shard = table.column(SHARD)[0].as_py()
    start = int(shard) * rows_per_part  # the manifest is sorted and cut in order: slice k is rows [k*S, (k+1)*S)
    source = manifest.slice(start, rows_per_part)
    if source.column("uri").to_pylist() != table.column("uri").to_pylist():
        raise RuntimeError(f"slice {shard}: the rows that came back do not match the rows sent")
    table = table.drop_columns([SHARD])
    for name in ("source_size", "etag", "mtime"):
        table = table.append_column(name, source.column(name))
    uris = table.column("uri").to_pylist()
    path = out.write_part(part_name(model_sha256, uris), table)
    errors = table.column("error_kind").drop_null().to_pylist()
    summary.parts.append(os.path.basename(path))
    summary.images += table.num_rows
    summary.errors += len(errors)
    summary.ok = summary.images - summary.errors
    for kind in errors:
        summary.errors_by_kind[kind] = summary.errors_by_kind.get(kind, 0) + 1


def _progress(summary: RunSummary, total: int, started: float) -> None:
    elapsed = max(time.monotonic() - started, 1e-9)
    log.info("committed %d/%d images (%d errors), %.1f img/s", summary.images, total, summary.errors, summary.images / elapsed)
