"""The label sidecar (pipeline/table/labels.py): the label-check columns kept beside a tag
table's parts, keyed by uri, named per part in each version record.

Without Ray: the record's round trip, the join every reader goes through (labels from the
sidecar, from parts written before it, or nulls), rewrites taking their rows' labels along,
vacuum. With Ray (the real tag job, compare-tags and rethreshold on the demo corpus): a
source change rewrites only label files, version N reads version N's labels, a run killed
before its commit leaves the version it worked from as it was, tables labelled inside their
parts still read, and incremental runs keep the sidecar to the table's rows.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.core.schemas import LABEL_COLUMNS, LABEL_FIELDS, LABELS_SCHEMA
from pipeline.table.labels import LABELS_DIR, labels_file
from pipeline.table.reading import Pieces, read_parquet
from pipeline.table.rewrite import RewriteJob, rewrite_part
from pipeline.table.tag_table import Snapshot, TagTable, commit_version, read_current


def _labels(rows: dict[str, list[str] | None]) -> pa.Table:
    """Labels rows: uri -> likely_wrong (source_tags the same, quality 0.5)."""
    return pa.Table.from_pylist(
        [
            {"uri": uri, "source_tags": wrong, "likely_wrong": wrong, "label_quality": 0.5}
            for uri, wrong in rows.items()
        ],
        LABELS_SCHEMA,
    )


def _commit(table: TagTable, base, files, labels=None, run="r") -> Snapshot:
    return commit_version(
        table, base, files, model_sha256="m", inference_key="i", rules_key="r", run_id=run,
        model_name="n", rules={}, counts={}, labels=labels,
    )  # fmt: skip


@pytest.fixture
def labelled(tmp_path) -> TagTable:
    """Two parts (a, b | c); part 1's labels in the sidecar, in another order than its rows."""
    table = TagTable(str(tmp_path / "t"))
    one = table.write_part("data/k/part-1.parquet", pa.table({"uri": ["a", "b"], "x": [1, 2]}))
    two = table.write_part("data/k/part-2.parquet", pa.table({"uri": ["c"], "x": [3]}))
    sidecar = table.write_part(labels_file("1" * 64), _labels({"b": ["cat"], "a": []}))
    _commit(table, None, [one, two], {one: sidecar})
    return table


def test_the_version_record_names_each_parts_labels_file(labelled):
    record = json.loads(Path(labelled.join("_current.json")).read_text())
    assert record["labels"] == [{"part": "data/k/part-1.parquet", "file": labels_file("1" * 64)}]
    snapshot = labelled.snapshot()
    assert Snapshot.from_json(snapshot.to_json()) == snapshot
    unlabelled = Snapshot(1, ("p",), 1, "m", "i", "r", "run", "t")
    assert "labels" not in json.loads(unlabelled.to_json())  # the record earlier versions read
    assert Snapshot.from_json(unlabelled.to_json()).labels == {}
    assert os.path.exists(labelled.join(LABELS_DIR, "NOT_DATA-read_this_table_through__current.json.parquet"))
    with pytest.raises(ValueError, match="labels name parts the version does not have"):
        _commit(labelled, snapshot, list(snapshot.files), {"data/k/gone.parquet": labels_file("2" * 64)})


def test_readers_join_the_labels_by_uri(labelled):
    rows = read_current(labelled.uri).to_pylist()
    assert [(r["uri"], r["x"], r["likely_wrong"]) for r in rows] == [
        ("a", 1, []),
        ("b", 2, ["cat"]),
        ("c", 3, None),
    ]
    assert read_current(labelled.uri).schema.names == ["uri", "x", *LABEL_COLUMNS]
    assert read_current(labelled.uri, columns=["likely_wrong", "x"]).to_pylist() == [
        {"likely_wrong": [], "x": 1}, {"likely_wrong": ["cat"], "x": 2}, {"likely_wrong": None, "x": 3},
    ]  # fmt: skip
    assert labelled.labels().schema == LABELS_SCHEMA
    assert labelled.labels().column("likely_wrong").to_pylist() == [[], ["cat"], None]
    pieces = Pieces(labelled.uri)
    assert pieces.names == ["uri", "x", *LABEL_COLUMNS]
    assert [p.to_pylist() for _, p in pieces.stream(["uri", "likely_wrong"])] == [
        [{"uri": "a", "likely_wrong": []}, {"uri": "b", "likely_wrong": ["cat"]}],
        [{"uri": "c", "likely_wrong": None}],
    ]
    present = read_parquet(labelled.uri, columns=["uri", "label_quality", "nope"], only_present=True)
    assert present.column_names == ["uri", "label_quality"]


def test_parts_labelled_before_the_sidecar_read_as_written(tmp_path):
    """An old table (the columns inside its parts, no labels in the record) reads as it did;
    once the version names a labels file for a part, the sidecar's columns replace them."""
    table = TagTable(str(tmp_path / "old"))
    old = pa.table({"uri": ["a", "b"], "x": [1, 2]})
    for field, column in zip(LABEL_FIELDS, _labels({"a": ["dog"], "b": None}).columns[1:]):
        old = old.append_column(field, column)
    part = table.write_part("data/k-Labcdef12/part-1.parquet", old)
    plain = table.write_part("data/k/part-2.parquet", pa.table({"uri": ["c"], "x": [3]}))
    first = _commit(table, None, [part, plain])
    assert read_current(table.uri).column("likely_wrong").to_pylist() == [["dog"], None, None]
    assert table.labels().column("likely_wrong").to_pylist() == [["dog"], None, None]
    assert read_current(table.uri, columns=["uri", "likely_wrong"]).num_rows == 3
    assert Pieces(table.uri).names == ["uri", "x", *LABEL_COLUMNS]
    sidecar = table.write_part(labels_file("3" * 64), _labels({"a": ["cow"], "b": []}))
    _commit(table, first, [part, plain], {part: sidecar})
    assert read_current(table.uri).column("likely_wrong").to_pylist() == [["cow"], [], None]
    assert read_current(table.uri).column_names.count("likely_wrong") == 1
    assert read_current(table.uri, version=1).column("likely_wrong").to_pylist() == [["dog"], None, None]


def test_a_rewritten_part_takes_only_its_kept_rows_labels(labelled):
    snapshot = labelled.snapshot()
    part, sidecar = "data/k/part-1.parquet", snapshot.labels["data/k/part-1.parquet"]
    dropped = rewrite_part(
        RewriteJob(labelled.uri, part, labelled.uri, "data/k/part-1b.parquet", ("a",), labels=sidecar), {}
    )
    assert dropped.labels not in (None, sidecar)
    assert labelled.read_part(dropped.labels).column("uri").to_pylist() == ["b"]  # a does not come back
    again = rewrite_part(
        RewriteJob(labelled.uri, part, labelled.uri, "data/k/part-1b.parquet", ("a",), labels=sidecar), {}
    )
    assert again.already_done and again.labels == dropped.labels
    same = rewrite_part(
        RewriteJob(labelled.uri, part, labelled.uri, "data/k/part-1c.parquet", labels=sidecar), {}
    )
    assert same.labels == sidecar  # the same rows in the same table: the same file
    other = TagTable(labelled.uri + "-copy")
    copied = rewrite_part(
        RewriteJob(labelled.uri, part, other.uri, "data/k/part-1.parquet", labels=sidecar), {}
    )
    assert copied.labels != sidecar and other.read_part(copied.labels).num_rows == 2


def test_vacuum_deletes_label_files_no_kept_version_names(labelled):
    first = labelled.snapshot()
    newer = labelled.write_part(labels_file("4" * 64), _labels({"a": ["x"], "b": []}))
    _commit(labelled, first, list(first.files), {first.files[0]: newer})
    stray = labelled.write_part(labels_file("5" * 64), _labels({"a": []}))  # a check that never committed
    long_ago = time.time() - 7200
    for name in (first.labels[first.files[0]], newer, stray):
        os.utime(labelled.join(name), (long_ago, long_ago))
    report = labelled.vacuum(keep_versions=2, grace_hours=1)
    assert report["label_files_deleted"] == 1 and not labelled.exists(stray)
    report = labelled.vacuum(keep_versions=1, grace_hours=1)
    assert report["label_files_deleted"] == 1 and not labelled.exists(first.labels[first.files[0]])
    assert labelled.exists(newer) and read_current(labelled.uri).column("likely_wrong").to_pylist()[0] == [
        "x"
    ]
