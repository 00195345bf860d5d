"""Rows coming back from Ray, routed into their slice; a complete slice is one part.

A slice is the unit in progress: the rows that will become one part, the committed file.
The images to tag are cut in order into slices of rows_per_part rows. Ray returns rows
in any order and batch size, so the SliceWriter buffers each slice's rows until all of
them are back, then writes the slice as one immutable Parquet part (named from the
settings key and the rows' sources, so a rerun finds it) and returns what it wrote. A
slice that never completes is never written: nothing partial reaches the table.

Encoding a part is most of the driver's work per row (zstd Parquet of CL v2-sized rows;
docs/benchmarks.md, 'The driver's ceilings, after (issue 24)'), so in a run the slice
goes to a Ray task that checks, encodes and writes it (`in_tasks`), at most
`max_in_flight` at once; the driver only routes rows. More in flight than the cores can
encode made things slower (docs/decisions.md, 'Part writers'), so a run allows one per 8
CPUs, at least 2. A
part counts as written when its task has returned; one written by a task a crash cut
off is found and reused by the next run like any other.
"""

from __future__ import annotations

import collections
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.job.incremental import part_name
from pipeline.table.tag_table import DATA_DIR, TagTable

SLICE = "_slice"  # the column that carries each row's slice number


@dataclass(frozen=True)
class WrittenPart:
    file: str
    rows: int
    errors_by_kind: dict[str, int]  # error rows among them, by ErrorKind value


class SliceWriter:
    """Owns the slices' buffers and expected counts for one run's `pending` rows."""

    def __init__(
        self,
        table: TagTable,
        pending: pa.Table,
        rows_per_part: int,
        key: str,
        taken: set[str],
        run_id: str,
        in_tasks: bool = False,
        max_in_flight: int = 2,
    ):
        self.table, self.pending, self.rows_per_part = table, pending, rows_per_part
        self.naming = PartNaming(key, frozenset(taken), run_id)
        self.in_tasks, self.max_in_flight = in_tasks, max_in_flight
        self.in_flight: list = []  # Ray refs of parts being written
        self._task = self._naming_ref = None
        numbers = np.arange(pending.num_rows, dtype=np.int64) // rows_per_part
        self.expected = collections.Counter(numbers.tolist())
        self.slice_numbers = pa.array(numbers)
        self.buffers: dict[int, list[pa.Table]] = collections.defaultdict(list)
        self.received: collections.Counter = collections.Counter()
        self.written: list[WrittenPart] = []

    def work(self) -> pa.Table:
        """What to send: each pending uri with its slice number."""
        return self.pending.select(["uri"]).append_column(SLICE, self.slice_numbers)

    def add(self, batch: pa.Table) -> list[WrittenPart]:
        """A batch of tagged rows (with their slice number); returns the parts completed."""
        numbers = batch.column(SLICE).to_numpy()
        done = []
        for number in np.unique(numbers).tolist():
            mask = numbers == number
            self.buffers[number].append(batch.filter(pa.array(mask)))
            self.received[number] += int(mask.sum())
            if self.received[number] == self.expected[number]:
                done += self._write(number, self.buffers.pop(number))
        return done

    def _write(self, number: int, tables: list[pa.Table]) -> list[WrittenPart]:
        source = self.pending.slice(
            number * self.rows_per_part, self.rows_per_part
        )  # slices are cut in order
        if not self.in_tasks:
            part = write_slice(self.table, self.naming, number, tables, source)
            self.written.append(part)  # before the next write: a Ctrl-C there must count it
            return [part]
        # one contiguous table: Ray serialises a list of small sliced batches column by
        # column and copies their offsets, which costs the driver as much as encoding
        rows = pa.concat_tables(tables, promote_options="default").combine_chunks()
        self.in_flight.append(self._writer().remote(self.table, self._naming_ref, number, [rows], source))
        return self._collect(wait_for=max(0, len(self.in_flight) - self.max_in_flight))

    def _writer(self):
        """write_slice as a Ray task, made once: the naming (with `taken`) put once; on a
        local table pinned to this node, whose disk it is."""
        if self._task is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = ray.get_runtime_context().get_node_id()
            strategy = NodeAffinitySchedulingStrategy(here, soft=False) if self.table.local else "DEFAULT"
            self._task = ray.remote(num_cpus=0, max_retries=3, scheduling_strategy=strategy)(write_slice)
            self._naming_ref = ray.put(self.naming)
        return self._task

    def _collect(self, wait_for: int) -> list[WrittenPart]:
        """Parts whose tasks have returned (waiting for at least `wait_for` of them)."""
        import ray

        if not self.in_flight:
            return []
        ready, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=0)
        if len(ready) < wait_for:
            more, self.in_flight = ray.wait(self.in_flight, num_returns=wait_for - len(ready))
            ready += more
        if ready:  # written by other processes: this one's listing cache does not know them
            self.table.fs.invalidate_cache(self.table.join(DATA_DIR, self.naming.key))
        parts = ray.get(ready)  # all at once: none finished is left out of `written`
        self.written.extend(parts)
        return parts

    def settle(self, timeout: float) -> bool:
        """After an interrupt: parts whose tasks finish within `timeout` seconds count as
        written, so the message says what is kept. False: a second Ctrl-C stopped the wait."""
        if not self.in_flight:
            return True
        import ray

        try:
            ready, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=timeout)
            for ref in ready:
                try:
                    self.written.append(ray.get(ref))
                except Exception:  # a write that failed is not kept; the rerun redoes it
                    continue
        except KeyboardInterrupt:
            return False
        return True

    def finish(self) -> list[WrittenPart]:
        """Every part written; a slice Ray returned short of is an error, never a part."""
        if self.in_flight:
            self._collect(wait_for=len(self.in_flight))
        if self.buffers:
            missing = {s: f"{self.received[s]}/{self.expected[s]}" for s in sorted(self.buffers)}
            raise RuntimeError(
                f"slices came back incomplete (rows received/sent): {missing}; rerun to finish them"
            )
        return self.written


@dataclass(frozen=True)
class PartNaming:
    """What a part's name comes from: the settings key; `taken`, names a version holds
    (never overwritten); the run id that makes a retried name new."""

    key: str
    taken: frozenset[str]
    run_id: str


def write_slice(
    table: TagTable, naming: PartNaming, number: int, tables: list[pa.Table], source: pa.Table
) -> WrittenPart:
    """A complete slice's rows, checked against the rows sent, as one part (on the driver,
    or in a Ray task)."""
    rows = pa.concat_tables(tables, promote_options="default").sort_by("uri")
    if source.column("uri").to_pylist() != rows.column("uri").to_pylist():
        raise RuntimeError(f"slice {number}: the rows that came back do not match the rows sent")
    rows = rows.drop_columns([SLICE])
    for name in ("source_size", "etag", "mtime"):
        rows = rows.append_column(name, source.column(name))
    file = posixpath.join(DATA_DIR, naming.key, part_name(naming.key, rows))
    if file in naming.taken:  # the same sources retried with the same settings: never overwrite
        file = file.replace(".parquet", f"-{naming.run_id}.parquet")
    table.write_part(file, rows)
    errors = collections.Counter(rows.column("error_kind").drop_null().to_pylist())
    return WrittenPart(file, rows.num_rows, dict(errors))
