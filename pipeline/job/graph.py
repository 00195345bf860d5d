"""The one place that builds the Ray Data graph and decides where work runs.

manifest blocks -> read+decode+preprocess (CPU tasks) -> one tagger actor pool per
model, chained (GPU, or CPU with intra-op threads when the cluster has no GPU) -> rows
for the writers.

Every run is a pass of one model or more. The decode tasks emit each distinct
preprocessing's columns (schemas.geometry_column), then model i's pool tags the rows its
table needs (`_slice_i` set) from its preprocessing's columns and adds its rows as one
struct column (`_tagged_i`), null on rows it skipped; pixels no later model needs are
dropped there. The driver unpacks each model's rows for that model's SliceWriter. The
pass's only model has no other model's rows to keep apart: its rows are the batch itself,
with no struct column to build and unpack (that hop cost a run of one model time:
docs/benchmarks.md, 'One tagging path: one model (issue 33)'). The stage itself
(pipeline/model/tagger.py) knows nothing of Ray; here it is only placed.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.core.schemas import FILE_COLUMNS, GEOMETRY_COLUMNS, geometry_column
from pipeline.image.decode import DecodeStage
from pipeline.image.imaging import DecodeOptions
from pipeline.job.settings import TagJobConfig
from pipeline.model.profiles import Preprocess
from pipeline.model.tagger import TaggerSettings, TaggerStage

log = logging.getLogger(__name__)
# Where each row was decoded and tagged: counted by the driver into the run manifest
# (work per node), dropped before the rows are written.
DECODE_NODE = "_decode_node"
TAGGER_NODE = "_tagger_node"
# Busy time, on every row for the driver to sum (pipeline/job/busy.py): a row's share of
# its batch's decode seconds, and the tagging actor's id and session-busy seconds so far
DECODE_SECONDS = "_decode_seconds"


def busy_column(model: int) -> str:
    """Model i's actor's seconds inside session.run so far (cumulative, per row)."""
    return f"_busy_{model}"


def actor_column(model: int) -> str:
    """Which of model i's actors tagged the row."""
    return f"_actor_{model}"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


@dataclass(frozen=True)
class Placement:
    decode_cpus: float
    tagger_actors: int
    tagger_gpus: float
    tagger_cpus: float
    intra_op_threads: int  # 0 on GPU
    on_gpu: bool
    batches_in_flight: int = 1  # concurrent calls per tagger actor
    fused: bool = False  # decode in the tagger actors (FusedTagger)
    decode_slots: int = 1  # images decoded at once, cluster-wide (busy time's denominator)

    def describe(self) -> str:
        where = (
            f"{self.tagger_gpus:g} GPU" if self.on_gpu else f"CPU, {self.intra_op_threads} intra-op threads"
        )
        decode = (
            "decoding its own batches (fused)"
            if self.fused
            else f"decode tasks {self.decode_cpus:g} CPU each"
        )
        return (
            f"{self.tagger_actors} tagger actor(s) on {where}, "
            f"{self.batches_in_flight} batch(es) in flight each; {decode}"
        )


def plan_placement(cfg: TagJobConfig, cluster_gpus: float, cluster_cpus: float = 1.0) -> Placement:
    """GPU cluster: each tagger actor reserves its GPU(s) and tagger_cpus CPUs.

    CPU fallback: the actor runs tagger_cpus intra-op threads but reserves no CPU slot,
    so decode tasks can use every core and the OS shares them between decode and
    inference as the load falls. Reserving a core for it left a core idle whenever
    inference was lighter than decode, slower than a plain loop (docs/benchmarks.md,
    'Tag job on local Ray vs a plain loop').

    Batches in flight: on a GPU, a second concurrent call does its CPU work (Ray's
    batching, the 100k-wide output's screening, the Arrow rows) while the first is in
    the session, which releases the GIL; one call at a time leaves the GPU idle for
    that work. On CPU the session already uses the actor's threads, so one.

    Fused (decode_placement; auto: without a GPU): one actor per decode slot (decode_cpus
    CPUs each, so Ray spreads them as it would decode tasks) decodes its own batches and
    tags them; on a GPU, tagger_actors actors, each decoding on one core (docs/decisions.md,
    'Fused decode and tag').
    """
    on_gpu = cfg.gpus_per_actor > 0 and cluster_gpus > 0
    if cfg.gpus_per_actor > 0 and not on_gpu:
        log.info("no GPU in the Ray cluster: tagger actors run ONNX Runtime on CPU")
    fused = cfg.decode_placement == "fused" or (cfg.decode_placement == "auto" and not on_gpu)
    cpu_slots = max(1, int(cluster_cpus // cfg.decode_cpus))
    decode_slots = min(cpu_slots, cfg.max_decode_tasks or cpu_slots)
    fused_actors = cfg.tagger_actors if on_gpu else max(cfg.tagger_actors, decode_slots)
    return Placement(
        decode_cpus=cfg.decode_cpus,
        tagger_actors=fused_actors if fused else cfg.tagger_actors,
        tagger_gpus=cfg.gpus_per_actor if on_gpu else 0.0,
        tagger_cpus=cfg.tagger_cpus if on_gpu else (cfg.decode_cpus if fused else 0.0),
        intra_op_threads=0 if on_gpu else max(1, int(cfg.tagger_cpus)),
        on_gpu=on_gpu,
        batches_in_flight=1 if fused else cfg.batches_in_flight or (2 if on_gpu else 1),
        fused=fused,
        decode_slots=fused_actors if fused else decode_slots,
    )


def decode_options(cfg: TagJobConfig) -> DecodeOptions:
    """How the run decodes each image (the decode tasks, and tag-time edit calibration)."""
    return DecodeOptions(
        exact=cfg.exact_decode,
        max_pixels=cfg.max_pixels,
        draft_ratio=cfg.draft_ratio,
        max_memory=cfg.max_decode_memory,
    )


NOT_NEEDED = -1  # a row's slice number for a model whose table does not need it (null
# would become a float NaN in a numpy batch)


def slice_column(model: int) -> str:
    """The slice of model i's table a row goes to (NOT_NEEDED: that model does not need it)."""
    return f"_slice_{model}"


def tagged_column(model: int) -> str:
    """Model i's tag rows, one struct per row it tagged."""
    return f"_tagged_{model}"


def work_blocks(work: pa.Table, cfg: TagJobConfig) -> list[pa.Table]:
    """The work as the dataset's input blocks: a few decode batches each."""
    rows = max(cfg.decode_batch_size, 64)
    return [work.slice(i, rows) for i in range(0, work.num_rows, rows)]


def decode_batch(
    batch,
    preprocess: Preprocess | tuple[Preprocess, ...],
    options: DecodeOptions,
    storage_options: dict,
    timeout: float,
    max_file_bytes: int,
    needed_by: tuple[tuple[str, ...], ...] = (),
):
    """Task-style wrapper: Ray runs this as stateless CPU tasks that scale freely.
    needed_by: per preprocessing, the slice columns of the models that use it (a row no
    such model needs is not decoded for it)."""
    started = time.monotonic()
    stage = DecodeStage(preprocess, options, storage_options, timeout, max_file_bytes)
    out = stage(batch, _needed(batch, needed_by))
    rows = len(out["uri"])
    out[DECODE_NODE] = np.full(rows, _node_id(), object)
    out[DECODE_SECONDS] = np.full(rows, (time.monotonic() - started) / max(rows, 1))
    return out


def _needed(batch, needed_by: tuple[tuple[str, ...], ...]) -> list[np.ndarray] | None:
    """Per preprocessing, the rows some model using it needs (None: every row)."""
    if not needed_by:
        return None
    return [np.any([np.asarray(batch[c]) != NOT_NEEDED for c in columns], axis=0) for columns in needed_by]


@dataclass(frozen=True)
class ModelInPass:
    """One model of a pass: its tagger, which of the pass's preprocessings it reads, its pool."""

    settings: TaggerSettings
    preprocessing: int  # index into the pass's distinct preprocessings (geometry_column)
    placement: Placement
    drop: tuple[str, ...] = ()  # columns no later model needs, dropped after this one
    alone: bool = False  # the pass's only model: its rows are the batch, no struct column


class PassTagger:
    """Model `index` of a pass, as an actor pool's callable: Arrow in, Arrow out (the
    earlier models' struct columns pass through untouched)."""

    def __init__(self, index: int, model: ModelInPass):
        self.index, self.model = index, model
        self.tagger = TaggerStage(model.settings)
        self.node = _node_id()
        self.actor = uuid.uuid4().hex[:8]
        self.struct_type = pa.struct([*self.tagger.schema, pa.field(TAGGER_NODE, pa.string())])

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.tag(batch, self._decoded(batch))

    def tag(self, batch: pa.Table, decoded: dict[str, np.ndarray]) -> pa.Table:
        """The batch with this model's rows: `decoded` is its preprocessing's columns under
        their plain names (from the batch's columns, or decoded in this actor: fused)."""
        if self.model.alone:  # every row is this model's, and no other's rows ride along
            rows = self.tagger(decoded).append_column(TAGGER_NODE, self._nodes(batch.num_rows))
            routing = [
                c for c in (slice_column(self.index), DECODE_NODE, DECODE_SECONDS) if c in batch.column_names
            ]
            for name in routing:
                rows = rows.append_column(name, batch.column(name))
            return self._with_busy(rows)
        mask = batch.column(slice_column(self.index)).to_numpy() != NOT_NEEDED
        if mask.all():  # every row (always, with one model): no row to pick
            column = self._struct(decoded)
        elif mask.any():
            picked = {name: values[mask] for name, values in decoded.items()}
            positions = np.where(mask, np.cumsum(mask) - 1, 0)
            column = self._struct(picked).take(pa.array(positions, pa.int64(), mask=~mask))
        else:
            column = pa.nulls(batch.num_rows, self.struct_type)
        dropped = [c for c in self.model.drop if c in batch.column_names]
        return self._with_busy(batch.drop_columns(dropped).append_column(tagged_column(self.index), column))

    def _with_busy(self, batch: pa.Table) -> pa.Table:
        """The actor's id and its session-busy seconds so far on every row: the driver
        keeps each actor's largest (busy time, pipeline/job/busy.py)."""
        rows = batch.num_rows
        busy = pa.array(np.full(rows, self.tagger.runner.busy.seconds))
        ids = pa.array([self.actor] * rows, pa.string())
        return batch.append_column(busy_column(self.index), busy).append_column(actor_column(self.index), ids)

    def _struct(self, decoded: dict[str, np.ndarray]) -> pa.StructArray:
        """The model's rows of a batch, and the node that tagged them, as one struct column."""
        tagged = self.tagger(decoded).combine_chunks()
        arrays = [tagged.column(f.name).chunk(0) for f in self.tagger.schema] + [self._nodes(tagged.num_rows)]
        return pa.StructArray.from_arrays(arrays, fields=list(self.struct_type))

    def _nodes(self, rows: int) -> pa.Array:
        return pa.array([self.node] * rows, pa.string())

    def _decoded(self, rows: pa.Table) -> dict[str, np.ndarray]:
        """The decoded columns of this model's preprocessing, under the names TaggerStage
        reads (converted by Ray itself: its tensor columns, whichever tensor format is
        set; numpy views, so only the rows picked are copied). Filtering the Arrow table
        instead copied every geometry's pixels of every row (docs/benchmarks.md,
        'Several models in one pass')."""
        from ray.data.block import BlockAccessor

        names = {
            geometry_column(name, self.model.preprocessing): name
            for name in (*FILE_COLUMNS, *GEOMETRY_COLUMNS)
        }
        arrays = BlockAccessor.for_block(rows.select(list(names))).to_batch_format("numpy")
        return {names[column]: values for column, values in arrays.items()}


def build_pass_dataset(
    blocks: list[pa.Table], cfg: TagJobConfig, preprocesses: tuple[Preprocess, ...], models: list[ModelInPass]
):
    """Decode once for every model, then each model's pool in turn (see the module's
    text); fused: one pool that does both (FusedTagger)."""
    needed_by = tuple(
        tuple(slice_column(i) for i, m in enumerate(models) if m.preprocessing == g)
        for g in range(len(preprocesses))
    )
    if models[0].placement.fused:
        return _fused_dataset(blocks, cfg, preprocesses, models, needed_by)
    ds = _decoded_dataset(blocks, cfg, preprocesses, models[0].placement.decode_cpus, needed_by)
    for index, model in enumerate(models):
        ds = ds.map_batches(
            PassTagger,
            fn_constructor_args=(index, model),
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            # a fixed pool, one model session per actor, running batches_in_flight calls at once
            compute=_pool(model.placement),
            num_gpus=model.placement.tagger_gpus,
            num_cpus=model.placement.tagger_cpus,
        )
    return ds


FUSED_CHUNKS = 4  # model batches per fused call: decode of one overlaps the model on the one before


class FusedTagger:
    """Decode and every model of the pass in one actor, so pixels never cross the object
    store. A call's rows are cut into model batches; a helper thread runs the models on
    batch j while the main thread decodes batch j+1 (ONNX Runtime and Pillow release the
    GIL). Decode stays on the actor's main thread, the one where its per-image time
    limit (SIGALRM) and memory budget (RLIMIT_AS) act, so its rows are the split
    stages' rows (tests/job/test_fused.py)."""

    def __init__(self, models: list[ModelInPass], preprocesses, decode_kwargs: dict, needed_by, chunk: int):
        self.decode_kwargs, self.needed_by, self.chunk = decode_kwargs, needed_by, chunk
        self.decoder = DecodeStage(preprocesses, **decode_kwargs)
        self.taggers = [PassTagger(index, model) for index, model in enumerate(models)]
        self.tagging = ThreadPoolExecutor(1, thread_name_prefix="tagger")
        self.node = _node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        pending, done = None, []
        for start in range(0, batch.num_rows, self.chunk):
            rows = batch.slice(start, self.chunk)
            decoded = self._decode(rows)
            if pending is not None:
                done.append(pending.result())
            pending = self.tagging.submit(self._tag, rows, decoded)
        if pending is not None:
            done.append(pending.result())
        return pa.concat_tables(done)

    def _decode(self, rows: pa.Table) -> tuple[dict[str, np.ndarray], float]:
        started = time.monotonic()
        columns = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}
        decoded = self.decoder(columns, _needed(columns, self.needed_by))
        return decoded, time.monotonic() - started

    def _tag(self, rows: pa.Table, decoded_and_seconds: tuple[dict[str, np.ndarray], float]) -> pa.Table:
        decoded, seconds = decoded_and_seconds
        n = rows.num_rows
        batch = rows.append_column(DECODE_NODE, pa.array([self.node] * n, pa.string()))
        batch = batch.append_column(DECODE_SECONDS, pa.array(np.full(n, seconds / max(n, 1))))
        for tagger in self.taggers:
            names = (*FILE_COLUMNS, *GEOMETRY_COLUMNS)
            g = tagger.model.preprocessing
            batch = tagger.tag(batch, {name: decoded[geometry_column(name, g)] for name in names})
        return batch


def _fused_dataset(blocks, cfg: TagJobConfig, preprocesses, models: list[ModelInPass], needed_by):
    import ray.data

    placement = models[0].placement
    decode_kwargs = dict(
        options=decode_options(cfg),
        storage_options=cfg.storage_options,
        timeout=cfg.decode_timeout,
        max_file_bytes=cfg.max_file_bytes,
    )
    return ray.data.from_arrow(blocks).map_batches(
        FusedTagger,
        fn_constructor_args=(models, preprocesses, decode_kwargs, needed_by, cfg.batch_size),
        batch_size=cfg.batch_size * FUSED_CHUNKS,
        batch_format="pyarrow",
        compute=_pool(placement),
        num_gpus=sum(m.placement.tagger_gpus for m in models),
        num_cpus=placement.tagger_cpus,
    )


def _pool(placement: Placement):
    """A fixed pool, one model session per actor, running batches_in_flight calls at once."""
    import ray.data

    return ray.data.ActorPoolStrategy(
        size=placement.tagger_actors,
        max_concurrent_calls_per_actor=placement.batches_in_flight,
        enable_true_multi_threading=placement.batches_in_flight > 1,
    )


def _decoded_dataset(
    blocks: list[pa.Table], cfg: TagJobConfig, preprocess, decode_cpus: float, needed_by: tuple = ()
):
    import ray.data

    ds: ray.data.Dataset = ray.data.from_arrow(blocks)
    return ds.map_batches(
        # fn_kwargs gives the rest of its arguments
        decode_batch,  # type: ignore[arg-type]
        fn_kwargs=dict(
            preprocess=preprocess,
            options=decode_options(cfg),
            storage_options=cfg.storage_options,
            timeout=cfg.decode_timeout,
            max_file_bytes=cfg.max_file_bytes,
            needed_by=needed_by,
        ),
        batch_size=cfg.decode_batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=cfg.max_decode_tasks),  # None: Ray Data scales it
        # Ray Data retries a decode task lost with its worker (its default); decode is
        # idempotent, and its per-image limits keep a file from killing the worker. The
        # CPUs asked here differ from the tagger's on every placement, which keeps Ray
        # from fusing decode into the tagger actors (serialising it behind inference).
        num_cpus=decode_cpus,
    )
