"""Rows coming back from Ray, routed into their slice; a complete slice is one part.

The images to tag are cut in order into slices of rows_per_part rows. Ray returns rows
in any order and batch size, so the SliceWriter buffers each slice's rows until all of
them are back, then writes the slice as one immutable Parquet part (named from the
settings key and the rows' sources, so a rerun finds it) and returns what it wrote. A
slice that never completes is never written: nothing partial reaches the table.
"""

from __future__ import annotations

import collections
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.job.incremental import part_name
from pipeline.table.tag_table import DATA_DIR, TagTable

SHARD = "_shard"


@dataclass(frozen=True)
class WrittenPart:
    file: str
    rows: int
    errors_by_kind: dict[str, int]  # error rows among them, by ErrorKind value


class SliceWriter:
    """Owns the slices' buffers and expected counts for one run's `pending` rows."""

    def __init__(
        self, table: TagTable, pending: pa.Table, rows_per_part: int, key: str, taken: set[str], run_id: str
    ):
        self.table, self.pending, self.rows_per_part = table, pending, rows_per_part
        self.key, self.taken, self.run_id = key, taken, run_id
        shard_ids = np.arange(pending.num_rows, dtype=np.int64) // rows_per_part
        self.expected = collections.Counter(shard_ids.tolist())
        self.shard_ids = pa.array(shard_ids)
        self.buffers: dict[int, list[pa.Table]] = collections.defaultdict(list)
        self.received: collections.Counter = collections.Counter()
        self.written: list[WrittenPart] = []

    def work(self) -> pa.Table:
        """What to send: each pending uri with its slice number."""
        return self.pending.select(["uri"]).append_column(SHARD, self.shard_ids)

    def add(self, batch: pa.Table) -> list[WrittenPart]:
        """A batch of tagged rows (with their slice number); returns the parts completed."""
        shards = batch.column(SHARD).to_numpy()
        done = []
        for shard in np.unique(shards).tolist():
            mask = shards == shard
            self.buffers[shard].append(batch.filter(pa.array(mask)))
            self.received[shard] += int(mask.sum())
            if self.received[shard] == self.expected[shard]:
                part = self._write(shard, self.buffers.pop(shard))
                self.written.append(part)  # before the next write: a Ctrl-C there must count it
                done.append(part)
        return done

    def finish(self) -> list[WrittenPart]:
        """Every part written; a slice Ray returned short of is an error, never a part."""
        if self.buffers:
            missing = {s: f"{self.received[s]}/{self.expected[s]}" for s in sorted(self.buffers)}
            raise RuntimeError(
                f"slices came back incomplete (rows received/sent): {missing}; rerun to finish them"
            )
        return self.written

    def _write(self, shard: int, tables: list[pa.Table]) -> WrittenPart:
        rows = pa.concat_tables(tables, promote_options="default").sort_by("uri")
        source = self.pending.slice(shard * self.rows_per_part, self.rows_per_part)  # slices are cut in order
        if source.column("uri").to_pylist() != rows.column("uri").to_pylist():
            raise RuntimeError(f"slice {shard}: the rows that came back do not match the rows sent")
        rows = rows.drop_columns([SHARD])
        for name in ("source_size", "etag", "mtime"):
            rows = rows.append_column(name, source.column(name))
        file = posixpath.join(DATA_DIR, self.key, part_name(self.key, rows))
        if file in self.taken:  # the same sources retried with the same settings: never overwrite
            file = file.replace(".parquet", f"-{self.run_id}.parquet")
        self.table.write_part(file, rows)
        errors = collections.Counter(rows.column("error_kind").drop_null().to_pylist())
        return WrittenPart(file, rows.num_rows, dict(errors))
