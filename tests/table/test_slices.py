"""Parts written by Ray tasks are the parts the driver would write: same names, same rows;
a slice that comes back wrong fails the run either way."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.schemas import MANIFEST_SCHEMA
from pipeline.job.slices import SLICE, SliceWriter
from pipeline.table.tag_table import TagTable

ROWS, PER_PART = 50, 8


def _pending() -> pa.Table:
    uris = [f"s3://b/{i:03d}.jpg" for i in range(ROWS)]
    return pa.Table.from_pylist(
        [{"uri": u, "source_size": i, "etag": f"e{i}", "mtime": 1.0} for i, u in enumerate(uris)],
        schema=MANIFEST_SCHEMA,
    )


def _batches(work: pa.Table, seed: int) -> list[pa.Table]:
    """The tagged rows as Ray returns them: shuffled, in batches of any size."""
    order = np.random.default_rng(seed).permutation(work.num_rows)
    rows = work.take(pa.array(order))
    kinds = [None if i % 7 else "decode" for i in order]
    rows = rows.append_column("error_kind", pa.array(kinds, pa.string()))
    rows = rows.append_column("score", pa.array(order.astype(np.float32)))
    cuts = [0, 3, 4, 20, 21, 40, ROWS]
    return [rows.slice(a, b - a) for a, b in zip(cuts, cuts[1:], strict=False)]


def _write_all(root, in_tasks: bool, taken=frozenset()) -> list:
    pending = _pending()
    writer = SliceWriter(TagTable(str(root)), pending, PER_PART, "k", set(taken), "run1", in_tasks, 2)
    for batch in _batches(writer.work(), seed=3):
        writer.add(batch)
    return writer.finish()


def test_parts_written_in_tasks_match_the_drivers(tmp_path, ray_session):
    inline = _write_all(tmp_path / "inline", in_tasks=False)
    tasks = _write_all(tmp_path / "tasks", in_tasks=True)
    assert sorted(p.file for p in inline) == sorted(p.file for p in tasks)
    assert len(tasks) == -(-ROWS // PER_PART) and sum(p.rows for p in tasks) == ROWS
    by_file = {p.file: p for p in inline}
    for part in tasks:
        assert part == by_file[part.file]  # rows and errors by kind
        a = pq.read_table(tmp_path / "inline" / part.file)
        b = pq.read_table(tmp_path / "tasks" / part.file)
        assert a.equals(b) and SLICE not in b.column_names
        assert b.column("uri").to_pylist() == sorted(b.column("uri").to_pylist())
    taken = {tasks[0].file}  # a name a version holds is never overwritten: the run id makes it new
    again = _write_all(tmp_path / "tasks", in_tasks=True, taken=taken)
    assert tasks[0].file not in {p.file for p in again}
    assert tasks[0].file.replace(".parquet", "-run1.parquet") in {p.file for p in again}


def test_a_wrong_slice_fails_in_a_task_too(tmp_path, ray_session):
    pending = _pending()
    writer = SliceWriter(TagTable(str(tmp_path)), pending, PER_PART, "k", set(), "run1", True, 2)
    work = writer.work()
    wrong = work.set_column(0, "uri", pa.array([f"s3://b/x{i}.jpg" for i in range(ROWS)]))
    with pytest.raises(Exception, match="do not match the rows sent"):
        writer.add(wrong)
        writer.finish()
