"""A tag table's label sidecar: the label-check columns kept beside the parts, keyed by uri.

A table checked against source (human) tags keeps the check's columns (LABEL_FIELDS,
pipeline/core/schemas.py) out of its parts, in

    _labels/labels-<digest>.parquet   one file per labelled part: uri + the label columns,
                                      exactly that part's rows (LABELS_SCHEMA)

and each version record names, per part, the labels file that goes with it
(Snapshot.labels; in the JSON a list of {"part", "file"}). Label files are written before
the commit, never overwritten (a new check writes new names), so a reader of version N
gets version N's labels, a run killed before its commit leaves the version it worked from
as it was, and a new source-tags file rewrites label files only, never a part. Readers
join them by uri (TagTable.read_rows); where a version names no labels file for a part, the
part reads as written, so tables labelled before the sidecar (the columns inside their
parts) read as they did.

This module is the layout and the join, with no table of its own: tag_table.py reads and
vacuums label files through it, the label check (pipeline/job/label_check.py) writes them,
and rewritten parts (rewrite.py) take their rows' labels along.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.schemas import LABEL_COLUMNS, LABELS_SCHEMA

LABELS_DIR = "_labels"
LABELS_PREFIX = "labels-"


def labels_file(digest: str) -> str:
    """A labels file's path relative to the table root, from a digest of what decides it."""
    return posixpath.join(LABELS_DIR, f"{LABELS_PREFIX}{digest[:32]}.parquet")


def copied_labels_file(part: str, source_labels: str) -> str:
    """The labels file of a rewritten part: its rows' labels copied from its source part's
    labels file; named from both, so a rerun finds it written."""
    return labels_file(hashlib.sha256(f"{part}\0{source_labels}".encode()).hexdigest())


def is_labels_file(name: str) -> bool:
    base = posixpath.basename(name)
    return base.startswith(LABELS_PREFIX) and base.endswith(".parquet")


def labels_record(labels: dict[str, str]) -> list[dict[str, str]]:
    """Snapshot.labels as its JSON says it: a list of {"part", "file"}, by part (a list
    of records reads in DuckDB as a list of structs; part paths as keys would not)."""
    return [{"part": part, "file": labels[part]} for part in sorted(labels)]


def labels_from_record(record: Iterable[dict[str, str]] | dict[str, str] | None) -> dict[str, str]:
    if not record:
        return {}
    if isinstance(record, dict):
        return dict(record)
    return {entry["part"]: entry["file"] for entry in record}


def label_columns(columns: Sequence[str] | None) -> list[str]:
    """Of the columns asked for (None: every column), the label columns, in order."""
    return list(LABEL_COLUMNS) if columns is None else [c for c in columns if c in LABEL_COLUMNS]


def join_labels(part: pa.Table, labels: pa.Table, names: Sequence[str]) -> pa.Table:
    """`part` with the label columns `names` appended (as LABELS_SCHEMA types them), each
    row's from the labels row of its uri; nulls where `labels` has no row for it."""
    at = pc.index_in(part.column("uri"), value_set=labels.column("uri").combine_chunks())
    for name in names:
        field = LABELS_SCHEMA.field(name)
        part = part.append_column(field, pc.take(labels.column(name), at).cast(field.type))
    return part


def null_labels(part: pa.Table, names: Sequence[str]) -> pa.Table:
    """`part` with the label columns `names` appended as nulls (never checked)."""
    for name in names:
        field = LABELS_SCHEMA.field(name)
        part = part.append_column(field, pa.nulls(part.num_rows, field.type))
    return part


def labels_of_rows(labels: pa.Table, uris: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The rows of `labels` whose uri is among `uris` (a rewritten part's), as LABELS_SCHEMA."""
    if isinstance(uris, pa.ChunkedArray):
        uris = uris.combine_chunks()
    kept = labels.filter(pc.is_in(labels.column("uri"), value_set=uris))
    return kept.select(LABELS_SCHEMA.names).cast(LABELS_SCHEMA)


class PartReader(Protocol):
    """What reading a part's rows takes of a table (TagTable has it)."""

    def read_part(self, relative: str, columns: list[str] | None = None) -> pa.Table: ...

    def read_part_metadata(self, relative: str) -> Any: ...


def read_rows(table: PartReader, sidecar: str | None, relative: str, columns: list[str] | None) -> pa.Table:
    """Part `relative` with the label columns of `sidecar` (its labels file, None: the
    version names none) joined by uri, replacing any the part carries; without a labels
    file, as written (a table labelled before the sidecar has the columns inside its
    parts). Label columns asked for that neither has read as nulls (rows never checked)."""
    wanted = label_columns(columns)
    if sidecar is None or not wanted:
        return _read_part_or_null_labels(table, relative, columns)
    own = None if columns is None else [c for c in columns if c not in LABEL_COLUMNS]
    if own is not None and "uri" not in own:
        own.append("uri")  # the join's key, left out again by the select below
    part = table.read_part(relative, own)
    part = part.drop_columns([c for c in LABEL_COLUMNS if c in part.column_names])
    joined = join_labels(part, table.read_part(sidecar, ["uri", *wanted]), wanted)
    return joined if columns is None else joined.select(columns)


def _read_part_or_null_labels(table: PartReader, relative: str, columns: list[str] | None) -> pa.Table:
    try:
        return table.read_part(relative, columns)
    except pa.ArrowInvalid as exc:
        if columns is None or "No match for FieldRef" not in str(exc):
            raise
        names = set(table.read_part_metadata(relative).schema.to_arrow_schema().names)
        if any(c not in names and c not in LABEL_COLUMNS for c in columns):
            raise
    part = table.read_part(relative, [c for c in columns if c in names])
    return null_labels(part, [c for c in columns if c not in names]).select(columns)


def row_schema(part: pa.Schema, labelled: bool) -> pa.Schema:
    """A part's schema (from its footer) as read_rows gives its rows; labelled: the
    version names a labels file for it."""
    if not labelled:
        return part
    kept = pa.schema([f for f in part if f.name not in LABEL_COLUMNS], metadata=part.metadata)
    return pa.unify_schemas([kept, pa.schema(list(LABELS_SCHEMA)[1:])])
