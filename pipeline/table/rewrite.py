"""Copies of a version's parts: without some rows, and optionally transformed.

The tag job drops deleted or changed rows from the parts it keeps, and rethreshold
re-tags parts from their stored logits; both are a RewriteJob per part, run as Ray
tasks. A rewritten part's name comes from its source, what it drops and the settings
key, so a rerun finds the parts an interrupted run already wrote and skips them.
The transform (rethreshold's) is any picklable callable: this layer knows nothing of
models or rules. A part with a labels file (pipeline/table/labels.py) takes its rows'
labels along: the same file where the rows and the table are the same, else a copy of
the kept rows' labels, written before the part (so a part found written has its labels).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.progress import ProgressSettings
from pipeline.core.ray_session import results_in_order
from pipeline.table.labels import copied_labels_file, labels_of_rows
from pipeline.table.tag_table import DATA_DIR, TagTable

# (rows of one part, "URI/FILE" for messages) -> (transformed rows, rows whose tags changed)
PartTransform = Callable[[pa.Table, str], tuple[pa.Table, int]]


@dataclass(frozen=True)
class RewriteJob:
    """One part copied from a source table into a target table (often the same one)."""

    source_uri: str
    source_file: str
    target_uri: str
    target_file: str
    drop: tuple[str, ...] = ()  # uris of rows left out
    transform: PartTransform | None = None
    labels: str | None = None  # the source part's labels file, relative to the source table


@dataclass(frozen=True)
class RewriteResult:
    file: str | None  # the target file; None when no row was left
    rows: int
    rows_changed: int  # rows the transform changed
    already_done: bool  # written by an earlier attempt, left as it was
    labels: str | None = None  # the target part's labels file (None: it has none)


def rewrite_name(source_file: str, key: str, drop: list[str] | tuple[str, ...]) -> str:
    """A rewritten part's name: from its source part, what it drops and the settings
    key, so a rerun finds it done."""
    digest = hashlib.sha256(f"{source_file}\0{key}".encode())
    for uri in sorted(drop):
        digest.update(b"\0" + uri.encode())
    return posixpath.join(DATA_DIR, key, f"part-{digest.hexdigest()[:24]}.parquet")


def rewrite_part(job: RewriteJob, storage_options: dict) -> RewriteResult:
    """One part, copied without the job's `drop` rows and through its transform."""
    target = TagTable(job.target_uri, storage_options)
    if target.exists(job.target_file):
        uris = target.read_part(job.target_file, ["uri"]).column("uri") if job.labels else None
        labels = _labels(job, target, storage_options, uris)
        rows = target.read_part_metadata(job.target_file).num_rows
        return RewriteResult(job.target_file, rows, 0, True, labels)
    table = TagTable(job.source_uri, storage_options).read_part(job.source_file)
    if job.drop:
        dropped = pc.is_in(table.column("uri"), pa.array(list(job.drop), pa.string()))
        table = table.filter(pc.invert(dropped))
    if not table.num_rows:
        return RewriteResult(None, 0, 0, False)
    changed = 0
    if job.transform is not None:
        table, changed = job.transform(table, f"{job.source_uri}/{job.source_file}")
    labels = _labels(job, target, storage_options, table.column("uri"))
    target.write_part(job.target_file, table)
    return RewriteResult(job.target_file, table.num_rows, changed, False, labels)


def _labels(job: RewriteJob, target: TagTable, storage_options: dict, uris) -> str | None:
    """The target part's labels file: the source part's when the rows and the table are
    the same, else the kept rows' labels copied (deleted rows never come back)."""
    if job.labels is None:
        return None
    if not job.drop and job.source_uri == job.target_uri:
        return job.labels
    name = copied_labels_file(job.target_file, job.labels)
    if not target.exists(name):
        labels = TagTable(job.source_uri, storage_options).read_part(job.labels)
        target.write_part(name, labels_of_rows(labels, uris))
    return name


def rewrite_parts(
    jobs: list[RewriteJob],
    storage_options: dict,
    progress_label: str,
    progress: ProgressSettings | None = None,
) -> list[RewriteResult]:
    """Run rewrite_part for each job as Ray tasks; results in job order."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=3)(rewrite_part)
    refs = [task.remote(job, storage_options) for job in jobs]
    return [r for r in results_in_order(refs, progress_label, progress) if r is not None]
