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

    def describe(self) -> str:
        where = (
            f"{self.tagger_gpus:g} GPU" if self.on_gpu else f"CPU, {self.intra_op_threads} intra-op threads"
        )
        return (
            f"{self.tagger_actors} tagger actor(s) on {where}, "
            f"{self.batches_in_flight} batch(es) in flight each; "
            f"decode tasks {self.decode_cpus:g} CPU each"
        )


def plan_placement(cfg: TagJobConfig, cluster_gpus: float) -> Placement:
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
    """
    on_gpu = cfg.gpus_per_actor > 0 and cluster_gpus > 0
    if cfg.gpus_per_actor > 0 and not on_gpu:
        log.info("no GPU in the Ray cluster: tagger actors run ONNX Runtime on CPU")
    return Placement(
        decode_cpus=cfg.decode_cpus,
        tagger_actors=cfg.tagger_actors,
        tagger_gpus=cfg.gpus_per_actor if on_gpu else 0.0,
        tagger_cpus=cfg.tagger_cpus if on_gpu else 0.0,
        intra_op_threads=0 if on_gpu else max(1, int(cfg.tagger_cpus)),
        on_gpu=on_gpu,
        batches_in_flight=cfg.batches_in_flight or (2 if on_gpu else 1),
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
    stage = DecodeStage(preprocess, options, storage_options, timeout, max_file_bytes)
    out = stage(batch, _needed(batch, needed_by))
    out[DECODE_NODE] = np.full(len(out["uri"]), _node_id(), object)
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
        self.struct_type = pa.struct([*self.tagger.schema, pa.field(TAGGER_NODE, pa.string())])

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.model.alone:  # every row is this model's, and no other's rows ride along
            rows = self.tagger(self._decoded(batch)).append_column(TAGGER_NODE, self._nodes(batch.num_rows))
            routing = (slice_column(self.index), DECODE_NODE)
            return rows.append_column(routing[0], batch.column(routing[0])).append_column(
                routing[1], batch.column(routing[1])
            )
        mask = batch.column(slice_column(self.index)).to_numpy() != NOT_NEEDED
        if mask.all():  # every row (always, with one model): no row to pick
            column = self._struct(self._decoded(batch))
        elif mask.any():
            decoded = {name: values[mask] for name, values in self._decoded(batch).items()}
            positions = np.where(mask, np.cumsum(mask) - 1, 0)
            column = self._struct(decoded).take(pa.array(positions, pa.int64(), mask=~mask))
        else:
            column = pa.nulls(batch.num_rows, self.struct_type)
        return batch.drop_columns(list(self.model.drop)).append_column(tagged_column(self.index), column)

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
    """Decode once for every model, then each model's pool in turn (see the module's text)."""
    needed_by = tuple(
        tuple(slice_column(i) for i, m in enumerate(models) if m.preprocessing == g)
        for g in range(len(preprocesses))
    )
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
