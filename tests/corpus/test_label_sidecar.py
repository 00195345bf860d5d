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

import hashlib
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
from tests.corpus.test_label_quality import _source_file


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
        model_name="n", labels=labels,
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


def test_the_readmes_duckdb_join_reads_the_sidecar(labelled):
    import duckdb

    root = labelled.uri
    for name, field in (("files", "f"), ("labels", "f.file")):
        duckdb.execute(
            f"SET VARIABLE {name} = (SELECT list_transform({name}, lambda f: '{root}/' || {field}) "
            f"FROM read_json('{root}/_current.json'))"
        )
    rows = duckdb.execute(
        "select t.uri, l.likely_wrong from read_parquet(getvariable('files')) t "
        "left join read_parquet(getvariable('labels')) l using (uri) order by t.uri"
    ).fetchall()
    assert rows == [("a", []), ("b", ["cat"]), ("c", None)]


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


# ---- with Ray: the real tag job, compare-tags and rethreshold on the demo corpus -----------


def _files(root: Path, folder: str) -> dict[str, tuple[int, str]]:
    """Every file under root/folder: (mtime in ns, sha256 of its bytes), by relative path."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }


def _by_name(table: pa.Table, root: str) -> dict[str, dict]:
    return {r["uri"][len(root) + 1 :]: r for r in table.to_pylist()}


def _labels_hold_their_parts_rows(table: TagTable, snapshot: Snapshot) -> None:
    for part, sidecar in snapshot.labels.items():
        uris = table.read_part(part, ["uri"]).column("uri").to_pylist()
        assert sorted(table.read_part(sidecar, ["uri"]).column("uri").to_pylist()) == sorted(uris), part


def _drop_noise(source: Path) -> None:
    """blue_000's planted wrong tag taken out of the source file: one row changed."""
    text = source.read_text()
    assert "noise made_up_tag" in text
    source.write_text(text.replace("noise made_up_tag", "made_up_tag"))


def test_a_source_change_rewrites_only_label_files_and_each_version_reads_its_own(
    tagged, demo_bundle, tmp_path
):
    import shutil

    from pipeline.corpus.label_settings import LabelCheckSettings
    from pipeline.job.label_check import run_compare_tags
    from pipeline.job.rethreshold import run_rethreshold
    from pipeline.model.rules import RuleSettings

    tagged_table, corpus = tagged
    table = tmp_path / "tags"
    shutil.copytree(tagged_table, table)
    source = tmp_path / "source.csv"
    root = _source_file(corpus, source)
    calibrated = LabelCheckSettings(label_rule="calibrated")
    first = run_compare_tags(str(table), str(demo_bundle), str(source), settings=calibrated)
    assert first.version == 2 and first.labels_written == first.parts > 1
    parts = _files(table, "data")
    labels_before = _files(table, LABELS_DIR)

    _drop_noise(source)
    second = run_compare_tags(str(table), str(demo_bundle), str(source), settings=calibrated)
    assert second.version == 3 and second.labels_written == 1 and second.parts_skipped == first.parts - 1
    assert _files(table, "data") == parts  # no part written, touched or replaced
    labels_after = _files(table, LABELS_DIR)
    assert {k: v for k, v in labels_after.items() if k in labels_before} == labels_before  # none overwritten
    assert len(set(labels_after) - set(labels_before)) == 1
    tags = TagTable(str(table))
    v2, v3 = tags.snapshot(2), tags.snapshot(3)
    assert v2.files == v3.files and len(set(v3.labels.items()) - set(v2.labels.items())) == 1

    # version N reads version N's labels, through every reader
    assert _by_name(read_current(str(table), version=2), root)["blue/blue_000.jpg"]["likely_wrong"] == [
        "noise"
    ]
    assert _by_name(read_current(str(table), version=3), root)["blue/blue_000.jpg"]["likely_wrong"] == []
    assert _by_name(tags.labels(2), root)["blue/blue_000.jpg"]["source_tags"][-2:] == ["noise", "made_up_tag"]
    assert _by_name(tags.labels(3), root)["blue/blue_000.jpg"]["source_tags"][-1] == "made_up_tag"
    assert _by_name(tags.labels(), root)["red/red_000.jpg"]["likely_missing"] == ["red_theme"]  # unchanged
    for version in (2, 3):
        _labels_hold_their_parts_rows(tags, tags.snapshot(version))

    # rethreshold into another table takes the labels along (copied: its records are relative)
    other = tmp_path / "rethresholded"
    run_rethreshold(str(table), str(demo_bundle), str(other), RuleSettings.model_validate({"threshold": 0.9}))
    moved = TagTable(str(other))
    assert all(
        label.startswith(LABELS_DIR) and moved.exists(label) for label in moved.current().labels.values()
    )
    assert moved.labels().sort_by("uri").equals(tags.labels().sort_by("uri"))


def test_a_check_killed_before_its_commit_leaves_the_version_as_it_was(
    tagged, demo_bundle, tmp_path, monkeypatch
):
    """The labels files are written first; creating the version record is the commit. A
    run stopped in between leaves version N with N's labels, and its rerun commits without
    checking a part again."""
    import shutil

    import pipeline.table.tag_table as tag_table_module
    from pipeline.core.errors import TagpipeError
    from pipeline.job.label_check import run_compare_tags

    tagged_table, corpus = tagged
    table = tmp_path / "tags"
    shutil.copytree(tagged_table, table)
    source = tmp_path / "source.csv"
    root = _source_file(corpus, source)
    assert run_compare_tags(str(table), str(demo_bundle), str(source)).version == 2
    before = read_current(str(table))
    _drop_noise(source)

    def killed(*args, **kwargs):
        raise TagpipeError("killed before the commit")

    with monkeypatch.context() as patch:
        patch.setattr(tag_table_module, "create_exclusive", killed)
        with pytest.raises(TagpipeError, match="killed before the commit"):
            run_compare_tags(str(table), str(demo_bundle), str(source))
    tags = TagTable(str(table))
    assert tags.current().version == 2 and tags.versions() == [1, 2]
    assert read_current(str(table)).equals(before)
    assert _by_name(before, root)["blue/blue_000.jpg"]["likely_wrong"] == ["noise"]
    unnamed = set(_files(table, LABELS_DIR)) - set(tags.current().labels.values())
    assert len({f for f in unnamed if "labels-" in f}) == 1  # written, named by no version
    rerun = run_compare_tags(str(table), str(demo_bundle), str(source))
    assert rerun.version == 3 and rerun.labels_written == 0  # the killed run's file is found
    assert _by_name(read_current(str(table)), root)["blue/blue_000.jpg"]["likely_wrong"] == []


def test_a_table_labelled_inside_its_parts_still_reads(tagged, demo_bundle, tmp_path):
    """A table from before the sidecar: its version's parts carry the six columns (written
    here as that version of compare-tags wrote them: each part rewritten, data/<key>-L..).
    Readers, the review queue and a new check all take it; the new check's labels win."""
    import shutil

    from pipeline.corpus.review import ReviewSettings, rank_queue
    from pipeline.job.label_check import run_compare_tags

    tagged_table, corpus = tagged
    table = tmp_path / "tags"
    shutil.copytree(tagged_table, table)
    source = tmp_path / "source.csv"
    root = _source_file(corpus, source)
    checked = tmp_path / "checked"
    shutil.copytree(tagged_table, checked)
    run_compare_tags(str(checked), str(demo_bundle), str(source))
    labels = TagTable(str(checked)).labels()
    tags = TagTable(str(table))
    base = tags.current()
    old_parts = []
    for file in base.files:
        part = tags.read_part(file)
        joined = labels.take(pa.compute.index_in(part.column("uri"), value_set=labels.column("uri")))
        for field in LABEL_FIELDS:
            part = part.append_column(field, joined.column(field.name))
        folder = Path(file).parent.name
        old_parts.append(tags.write_part(f"data/{folder}-Labcdef12/{Path(file).name}", part))
    commit_version(
        tags, base, old_parts, model_sha256=base.model_sha256, inference_key=base.inference_key,
        rules_key=base.rules_key, run_id="old-compare-tags", model_name=base.model_name, rules=base.rules,
    )  # fmt: skip
    assert tags.current().labels == {}

    rows = _by_name(read_current(str(table)), root)
    assert rows["blue/blue_000.jpg"]["likely_wrong"] == ["noise"]
    assert _by_name(tags.labels(), root)["red/red_000.jpg"]["likely_missing"] == ["red_theme"]
    assert set(LABEL_COLUMNS) <= set(Pieces(str(table)).names)
    queued, _ = rank_queue(
        ReviewSettings(tags=str(table), kind="likely-wrong", out=str(tmp_path / "q.jsonl"))
    )
    assert [r["uri"][len(root) + 1 :] for r in queued] == ["blue/blue_000.jpg"]

    _drop_noise(source)
    parts = _files(table, "data")
    assert run_compare_tags(str(table), str(demo_bundle), str(source)).version == 3
    assert _files(table, "data") == parts
    assert (
        _by_name(read_current(str(table)), root)["blue/blue_000.jpg"]["likely_wrong"] == []
    )  # the sidecar's
    assert _by_name(read_current(str(table), version=2), root)["blue/blue_000.jpg"]["likely_wrong"] == [
        "noise"
    ]


def test_incremental_runs_keep_the_sidecar_to_the_tables_rows(tagged, demo_bundle, tmp_path):
    """Rows deleted from the table leave the sidecar with them; new rows have no labels
    until a run with source tags, which checks them."""
    import shutil

    from pipeline.job.settings import make_tag_config
    from pipeline.job.tag_job import run_tag_job

    _, original = tagged
    corpus = tmp_path / "corpus"
    shutil.copytree(original, corpus)
    source = tmp_path / "source.csv"
    root = _source_file(corpus, source)
    out = tmp_path / "tags"

    def run(with_source: bool):
        cfg = make_tag_config(
            inputs=[str(corpus / "images")],
            output=str(out),
            model=str(demo_bundle),
            rows_per_part=16,
            source_tags=str(source) if with_source else None,
        )
        return run_tag_job(cfg)

    assert run(True).version == 1
    tags = TagTable(str(out))
    gone = "red/red_001.png"
    assert _by_name(tags.labels(), root)[gone]["source_tags"] is not None
    (corpus / "images" / gone).unlink()
    second = run(False)
    assert second.version == 2 and second.deleted == 1 and second.label_check is None
    v2 = tags.snapshot(2)
    assert sorted(v2.labels) == list(v2.files)  # kept and rewritten parts keep their labels
    _labels_hold_their_parts_rows(tags, v2)
    labelled = _by_name(tags.labels(2), root)
    assert gone not in labelled and labelled["blue/blue_000.jpg"]["likely_wrong"] == ["noise"]

    shutil.copy(corpus / "images" / "red" / "red_000.jpg", corpus / "images" / "green" / "green_added.jpg")
    added = "green/green_added.jpg"
    third = run(False)
    assert third.version == 3 and third.new == 1
    assert _by_name(read_current(str(out)), root)[added]["source_tags"] is None  # not checked yet
    with source.open("a") as handle:
        handle.write(f"{root}/{added},red_theme\n")
    fourth = run(True)
    assert fourth.version == 4 and fourth.images == 0 and fourth.change == "source tags changed"
    v4 = tags.snapshot(4)
    assert sorted(v4.labels) == list(v4.files)
    _labels_hold_their_parts_rows(tags, v4)
    rows = _by_name(read_current(str(out)), root)
    assert rows[added]["source_tags"] == ["red_theme"] and rows[added]["label_quality"] is not None
    assert gone not in rows and fourth.label_check.with_source == len(rows) - 1  # green_001: no source row
