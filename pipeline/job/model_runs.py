"""Each model's table in a tag run, and its tagging: every run is one pass of its models
(one or more), tag_in_one_pass.

A run plans each model's table on its own (its base, its keys, its plan), then tags in
one pass: the union of what the tables need is read once,
decoded once per distinct preprocessing, and each model's actor pool tags only the rows
its table needs (pipeline/job/graph.py). The driver hands each model's rows to that
model's SliceWriter, so each table gets exactly the parts a run of that model alone
would write. Each table then commits on its own (pipeline/job/tag_job.py).
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.progress import Progress, ProgressSettings
from pipeline.core.schemas import geometry_column
from pipeline.core.words import counted
from pipeline.job.busy import BusyMeter, BusyTime
from pipeline.job.graph import (
    DECODE_NODE,
    FUSED_CHUNKS,
    NOT_NEEDED,
    TAGGER_NODE,
    ModelInPass,
    Placement,
    build_pass_dataset,
    plan_placement,
    slice_column,
    tagged_column,
    work_blocks,
)
from pipeline.job.incremental import Keys
from pipeline.job.plan import Plan
from pipeline.job.settings import TagJobConfig
from pipeline.job.slices import SLICE, SliceWriter, WrittenPart
from pipeline.model.bundle import ModelBundle
from pipeline.model.profiles import Preprocess
from pipeline.model.tagger import TaggerSettings
from pipeline.table.tag_table import Snapshot, TagTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRun:
    """One model's table in a run before the listing: its bundle loaded and checked
    against the rules, its table opened, its keys decided."""

    cfg: TagJobConfig  # this model's settings (one bundle, its own output)
    bundle: ModelBundle
    keys: Keys
    table: TagTable
    base: Snapshot | None
    run_id: str

    @property
    def key(self) -> str:
        """The folder under data/ this run's parts go to."""
        return self.keys.parts_dir

    @property
    def taken(self) -> frozenset[str]:
        """Parts a version names: never reused, never overwritten."""
        return frozenset(self.base.files) if self.base else frozenset()


@dataclass(frozen=True)
class PlannedRun:
    """A prepared run with its plan: what the tagging, the rewrites and the commit do."""

    prepared: PreparedRun
    plan: Plan
    manifest_path: str | None  # the listing's copy in the table (None: a dry run writes none)
    settings_changed: tuple[str, ...]  # keyed settings changed against the base, "name old -> new"


@dataclass(frozen=True)
class ModelRun:
    """A planned run while it tags: the slices' writer its rows go to. The prepared run's
    fields read through, as the tagging and the edit calibration read them."""

    planned: PlannedRun
    writer: SliceWriter

    @property
    def prepared(self) -> PreparedRun:
        return self.planned.prepared

    @property
    def plan(self) -> Plan:
        return self.planned.plan

    @property
    def cfg(self) -> TagJobConfig:
        return self.prepared.cfg

    @property
    def bundle(self) -> ModelBundle:
        return self.prepared.bundle

    @property
    def table(self) -> TagTable:
        return self.prepared.table

    @property
    def run_id(self) -> str:
        return self.prepared.run_id

    @property
    def key(self) -> str:
        return self.prepared.key


@dataclass
class Tagged:
    """What tagging returned for one model: the parts written, where the work ran."""

    parts: list[WrittenPart] = field(default_factory=list)
    placement: str = ""
    rows_by_node: dict[str, dict[str, int]] = field(default_factory=dict)  # {"decode": {node: rows}, ...}
    first_rows_seconds: float | None = None  # from the run's start to the first tagged rows
    busy: BusyTime | None = None  # how busy the sessions and decode were (pipeline/job/busy.py)


def tagger_settings(run: ModelRun, placement: Placement) -> TaggerSettings:
    """What the model's tagger actors are built with: its bundle, rules and placement."""
    cfg, bundle = run.cfg, run.bundle
    return TaggerSettings(
        model_dir=str(bundle.directory),
        profile=bundle.profile,
        provider=cfg.provider,
        intra_op_threads=placement.intra_op_threads,
        run_id=run.run_id,
        dense_logits=cfg.dense_logits_for(len(bundle.vocabulary)),
        normalise_in_graph=cfg.normalise_in_graph,
        rules=cfg.rules,
        batch_timeout=cfg.batch_timeout,
    )


def pass_placements(runs: list[ModelRun], cluster_gpus: float, cluster_cpus: float = 1.0) -> list[Placement]:
    """Each model's pool placed as its settings say; when the pools together ask for
    more GPUs than the cluster has, each actor's ask is divided by the same whole number
    (two models on one GPU: half each), since a pool that cannot start stalls the pass.
    A whole divisor keeps the shares packing into whole GPUs on every node."""
    placements = [plan_placement(run.cfg, cluster_gpus, cluster_cpus) for run in runs]
    wanted = sum(p.tagger_gpus * p.tagger_actors for p in placements)
    if wanted > cluster_gpus > 0:
        divisor = math.ceil(wanted / cluster_gpus)
        log.info(
            "the pools ask for %g GPUs of %g: each actor gets 1/%d of its ask", wanted, cluster_gpus, divisor
        )
        placements = [replace(p, tagger_gpus=p.tagger_gpus / divisor) for p in placements]
    return placements


def preprocessings(runs: list[ModelRun]) -> tuple[tuple[Preprocess, ...], list[int]]:
    """The distinct preprocessings of the models, and each model's index among them."""
    distinct: list[Preprocess] = []
    index = []
    for run in runs:
        pre = run.bundle.profile.preprocess
        if pre not in distinct:
            distinct.append(pre)
        index.append(distinct.index(pre))
    return tuple(distinct), index


def pass_work(runs: list[ModelRun]) -> pa.Table:
    """The union of what the models' tables need: one row per uri, with each model's
    slice number (NOT_NEEDED where that model's table does not need the uri). A pass of
    one needs no union: its work is that already (the union's group, join and sorts cost
    the driver ~1 s per million pending uris)."""
    if len(runs) == 1:
        return runs[0].writer.work().rename_columns(["uri", slice_column(0)])
    uris = pa.concat_arrays([run.writer.work().column("uri").combine_chunks() for run in runs])
    union = pa.table({"uri": uris}).group_by("uri").aggregate([]).sort_by("uri")
    for index, run in enumerate(runs):
        work = run.writer.work().rename_columns(["uri", slice_column(index)])
        joined = union.join(work, "uri", join_type="left outer").sort_by("uri")
        numbers = joined.column(slice_column(index)).fill_null(NOT_NEEDED)
        union = union.append_column(slice_column(index), numbers)
    return union


def tag_in_one_pass(
    cfg: TagJobConfig, runs: list[ModelRun], run_started: float, progress_settings: ProgressSettings
) -> dict[int, Tagged]:
    """Tag every model's pending rows in one pass; each model's complete slices become
    its parts (not yet committed). Returns what each model (by index) wrote."""
    import ray

    resources = ray.cluster_resources()
    work = pass_work(runs)
    placements = [
        _fused_for_work(p, work.num_rows, cfg)
        for p in pass_placements(runs, resources.get("GPU", 0), resources.get("CPU", 1))
    ]
    preprocesses, preprocessing = preprocessings(runs)
    models = [
        ModelInPass(
            tagger_settings(run, placements[i]),
            preprocessing[i],
            placements[i],
            _dropped(i, preprocessing),
            alone=len(runs) == 1,
        )
        for i, run in enumerate(runs)
    ]
    log.info(
        "one pass for %s: %s, decoded for %s; %s",
        counted(len(runs), "models"),
        counted(work.num_rows, "images"),
        counted(len(preprocesses), "distinct preprocessings"),
        placements[0].describe(),  # which decode placement `auto` chose, and the pool
    )
    dataset = build_pass_dataset(work_blocks(work, cfg), cfg, preprocesses, models)
    nodes: list[dict[str, collections.Counter]] = [
        {"decode": collections.Counter(), "tag": collections.Counter()} for _ in runs
    ]
    first_rows: list[float | None] = [None] * len(runs)
    busy = BusyMeter(len(runs), placements[0].decode_slots)
    with Progress("tagging", work.num_rows, "images", progress_settings) as progress:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            batch = busy.take(batch)
            failed = np.zeros(batch.num_rows, bool)  # rows an error row in some table
            for index, run in enumerate(runs):
                rows, failed_here = _model_rows(batch, index)
                if rows is None:
                    continue
                failed |= failed_here
                first_rows[index] = first_rows[index] or round(time.monotonic() - run_started, 3)
                nodes[index]["decode"].update(rows.column(DECODE_NODE).to_pylist())
                nodes[index]["tag"].update(rows.column(TAGGER_NODE).to_pylist())
                run.writer.add(rows.drop_columns([DECODE_NODE, TAGGER_NODE]))
            progress.update(batch.num_rows, int(failed.sum()))
    tagged = {}
    for index, run in enumerate(runs):
        parts = run.writer.finish()  # a slice Ray returned short of: nothing partial; a rerun redoes it
        rows_by_node = {stage: dict(counter) for stage, counter in nodes[index].items()}
        tagged[index] = Tagged(
            parts, placements[index].describe(), rows_by_node, first_rows[index], busy.result(index)
        )
    return tagged


def _fused_for_work(placement: Placement, rows: int, cfg: TagJobConfig) -> Placement:
    """No more fused actors than the work has calls for: each one starts its own sessions."""
    if not placement.fused:
        return placement
    calls = max(1, math.ceil(rows / (cfg.batch_size * FUSED_CHUNKS)))
    actors = min(placement.tagger_actors, calls)
    return replace(placement, tagger_actors=actors, decode_slots=actors)


def _dropped(index: int, preprocessing: list[int]) -> tuple[str, ...]:
    """The pixels no model after this one needs: dropped after it, off the object store."""
    later = set(preprocessing[index + 1 :])
    return () if preprocessing[index] in later else (geometry_column("pixels", preprocessing[index]),)


def _model_rows(batch: pa.Table, index: int) -> tuple[pa.Table | None, np.ndarray]:
    """Model `index`'s tag rows in a batch of the pass, with their slice number and the
    node that decoded them (None when it tagged none of the batch), and which of the
    batch's rows are error rows in its table."""
    if tagged_column(index) not in batch.column_names:  # the pass's only model: its rows are the batch
        numbers = batch.column(slice_column(index)).cast(pa.int64())
        rows = batch.drop_columns([slice_column(index)]).append_column(SLICE, numbers)
        return rows, batch.column("error_kind").is_valid().to_numpy(zero_copy_only=False)
    column = batch.column(tagged_column(index))
    valid = column.is_valid()
    errors = pc.is_valid(pc.struct_field(column, "error_kind")).to_numpy(zero_copy_only=False)
    if column.null_count == len(column):
        return None, np.zeros(len(column), bool)
    routing = batch.select([slice_column(index), DECODE_NODE])
    if column.null_count:  # rows only other models' tables need: none of this one's
        column, routing = column.filter(valid), routing.filter(valid)
    rows = pa.Table.from_batches([pa.RecordBatch.from_struct_array(chunk) for chunk in column.chunks])
    numbers = routing.column(0).cast(pa.int64())
    rows = rows.append_column(SLICE, numbers).append_column(DECODE_NODE, routing.column(1))
    if np.any(rows.column(SLICE).to_numpy() == NOT_NEEDED):
        raise RuntimeError(f"model {index} tagged a row its table did not ask for")
    return rows, errors & valid.to_numpy(zero_copy_only=False)
