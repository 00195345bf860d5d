"""Busy time: how much of the tagging's wall time the model sessions and decode worked.

Every tagged row carries its tagger actor's id and that actor's seconds inside
session.run so far (SessionRunner.busy, a union over overlapping calls), and its share of
its batch's decode seconds (pipeline/job/graph.py). The driver keeps each actor's
largest busy figure and sums the decode shares as the rows arrive, so the figures cost
no extra round trip and survive an actor that is replaced (its rows still came back).
The run record, the summary line and the HTML report show the result ("tagger busy 41%:
decode-bound").
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.job.graph import DECODE_SECONDS, actor_column, busy_column

MODEL_BOUND = 0.9  # a tagger busy this much of the time is what bounds the run


@dataclass(frozen=True)
class BusyTime:
    """Fractions of the tagging wall time (0..1), for one model of the pass."""

    wall_seconds: float = 0.0  # from the first batch asked of Ray to the last row back
    tagger: float = 0.0  # mean over the model's actors of their session-busy fraction
    tagger_actors: dict[str, float] = field(default_factory=dict)  # per actor id
    decode: float = 0.0  # decode seconds / (wall x images decoded at once, cluster-wide)
    decode_seconds: float = 0.0
    gpus: dict[str, float] = field(default_factory=dict)  # per GPU, through NVML; empty without one
    verdict: str = ""  # what bounds the run (bound_by), kept in the record for the report

    def text(self) -> str:
        return f"tagger busy {self.tagger:.0%}: {self.verdict}"


def bound_by(tagger: float, decode: float) -> str:
    """What bounds the run: the model when its sessions are busy, else what feeds them."""
    if tagger >= MODEL_BOUND:
        return "model-bound"
    return "decode-bound" if decode >= tagger else "waiting on reads, the driver or start-up"


class BusyMeter:
    """The driver's side: each batch's busy columns read, then dropped from the batch."""

    def __init__(self, models: int, decode_slots: int):
        self.started = time.monotonic()
        self.decode_slots = max(decode_slots, 1)
        self.decode_seconds = 0.0
        self.actors: list[dict[str, float]] = [{} for _ in range(models)]
        self.gpus = GpuSampler()

    def take(self, batch: pa.Table) -> pa.Table:
        """The batch without its busy columns, their figures kept."""
        names = set(batch.column_names)
        if DECODE_SECONDS in names:
            self.decode_seconds += float(pc.sum(batch.column(DECODE_SECONDS)).as_py() or 0.0)
        dropped = [DECODE_SECONDS]
        for index, actors in enumerate(self.actors):
            busy, ids = busy_column(index), actor_column(index)
            if busy in names:
                _keep_largest(actors, batch.column(ids), batch.column(busy))
            dropped += [busy, ids]
        return batch.drop_columns([name for name in dropped if name in names])

    def result(self, model: int) -> BusyTime:
        wall = max(time.monotonic() - self.started, 1e-9)
        actors = {actor: round(min(seconds / wall, 1.0), 4) for actor, seconds in self.actors[model].items()}
        decode = round(min(self.decode_seconds / (wall * self.decode_slots), 1.0), 4)
        tagger = round(float(np.mean(list(actors.values()))), 4) if actors else 0.0
        return BusyTime(
            wall_seconds=round(wall, 3),
            tagger=tagger,
            tagger_actors=actors,
            decode=decode,
            decode_seconds=round(self.decode_seconds, 3),
            gpus=self.gpus.result(),
            verdict=bound_by(tagger, decode),
        )


def _keep_largest(actors: dict[str, float], ids: pa.ChunkedArray, busy: pa.ChunkedArray) -> None:
    """Each actor's figure is cumulative: its largest row is its latest."""
    valid = pc.is_valid(ids)
    table = pa.table({"id": ids, "busy": busy}).filter(valid)
    for row in table.group_by("id").aggregate([("busy", "max")]).to_pylist():
        actors[row["id"]] = max(actors.get(row["id"], 0.0), row["busy_max"])


class GpuSampler:
    """Each GPU's utilisation averaged over the tagging, read through NVML every half
    second on a daemon thread, where pynvml and a GPU are present on the driver's node
    (a single-node run; a KubeRay head has none); nothing otherwise."""

    def __init__(self, interval: float = 0.5):
        self.samples: dict[str, list[float]] = {}
        self.stop = threading.Event()
        self.handles = _nvml_handles()
        if self.handles:
            threading.Thread(target=self._sample, args=(interval,), daemon=True, name="nvml").start()

    def _sample(self, interval: float) -> None:
        import pynvml

        while not self.stop.wait(interval):
            for i, handle in enumerate(self.handles):
                with contextlib.suppress(Exception):
                    rate = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
                    self.samples.setdefault(str(i), []).append(rate)

    def result(self) -> dict[str, float]:
        self.stop.set()
        return {gpu: round(float(np.mean(rates)), 4) for gpu, rates in self.samples.items() if rates}


def _nvml_handles() -> list:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no pynvml, no driver, no GPU
        return []
