"""The corpus stages' run-level records read JSON written before they were typed, and write
the same field names back: an index version, dedup's _summary.json, split's _report.json,
audit.json. Each old record below is what the earlier code wrote (plain dicts, asdict)."""

from __future__ import annotations

import json

from pipeline.corpus.audit import AuditReport
from pipeline.corpus.dedup import DedupSummary
from pipeline.corpus.duplicate_index import IndexCounts, IndexedTable, IndexVersion
from pipeline.corpus.embedding_threshold import IndexSearch
from pipeline.corpus.index_partitions import Placement
from pipeline.corpus.split import Bridge, SplitReport

LAYOUT = {
    "kind": "flat",
    "dim": 8,
    "lists": 0,
    "probes": 0,
    "subquantizers": 0,
    "neighbours": 16,
    "designed_for": 40,
    "screen": [1.0, 0.0, 0.01],
}
OLD_VERSION = {  # an early index version: no counts, no format, a threshold without chosen_by
    "version": 3,
    "run_id": "r3",
    "committed_at": "2026-01-01T00:00:00Z",
    "table": {"uri": "/t", "version": 7, "run_id": "t7", "inference_key": None},
    "layout": LAYOUT,
    "trained": "trained-r1.faiss",
    "segments": ["seg-r1", "seg-r3"],
    "state": "state-r3.parquet",
    "entries": "entries-r3.parquet",
    "edges": "edges-r3.parquet",
    "next_entry": 40,
    "threshold": {"threshold": 0.93, "floor": 0.9, "search_recall": {"queries": 12}},
    "max_distance": 6,
}


def test_an_old_index_version_reads_typed_with_defaults_and_writes_its_field_names_back():
    version = IndexVersion.from_json(json.dumps(OLD_VERSION).encode())
    assert version.table == IndexedTable("/t", 7, "t7", None)
    assert version.layout is not None and version.layout.screen == (1.0, 0.0, 0.01)
    assert version.threshold.threshold == 0.93 and version.threshold.chosen_by == "given"
    assert version.threshold.search_recall == {"queries": 12} and version.counts == IndexCounts()
    assert version.segments == ("seg-r1", "seg-r3") and version.format == 1
    written = json.loads(version.to_json())
    assert set(written) == {*OLD_VERSION, "format", "counts"}
    assert written["layout"] == LAYOUT and written["table"] == OLD_VERSION["table"]
    assert IndexVersion.from_json(version.to_json()) == version  # both ways


def test_an_index_version_without_vectors_keeps_its_empty_layout():
    record = {**OLD_VERSION, "layout": {}, "trained": "", "segments": [], "threshold": {}}
    version = IndexVersion.from_record(record)
    assert version.layout is None and not version.threshold.used
    assert json.loads(version.to_json())["layout"] == {}


OLD_DEDUP = {  # a _summary.json from before the records were typed (an unknown name included)
    "images": 12,
    "clusters": 9,
    "giant_clusters": [{"cluster_id": "ab", "size": 5000, "diameter_hops": 12, "spread_bits": 9}],
    "unmatched_hashes": {"flat": 2},
    "edges": {"sha256": 1, "phash": 2, "embedding": 0},
    "embedding": {"threshold": None, "chosen_by": "off", "reason": "--embedding-threshold off"},
    "index": {
        "version": 2,
        "mode": "incremental",
        "reason": "",
        "hashes_searched": 3,
        "rows": 12,
        "rows_read": 3,
        "partitions": [{"segments": 1, "entries": 9, "node": "local"}],
        "timings": {"exact": 0.1},
    },
    "from_a_newer_tagpipe": 1,
}


def test_an_old_dedup_summary_reads_typed_and_writes_the_same_names_and_values():
    summary = DedupSummary.from_record(OLD_DEDUP)
    (giant,) = summary.giant_clusters
    assert giant.size == 5000 and giant.diameter_hops == 12
    assert summary.index.version == 2 and summary.index.vectors.rows_read == 3
    assert summary.index.vectors.partitions == (Placement(1, 9, "local"),)
    assert "index version 2: incremental, 3 embeddings read" in summary.text()
    written = json.loads(json.dumps(summary.record()))
    for name, value in OLD_DEDUP.items():
        if name == "from_a_newer_tagpipe":
            continue
        if isinstance(value, dict) and name in ("index", "embedding"):
            assert {k: written[name][k] for k in value} == value, name
        else:
            assert written[name] == value, name
    assert DedupSummary.from_record(written) == summary
    assert DedupSummary.from_record({}).index.text() == "no index"  # a bare clusters file


def test_an_old_audit_record_reads_its_index_search_or_none():
    old = {
        "eval_images": 4,
        "leaks": 1,
        "asked": ["sha256", "phash", "embedding"],
        "embedding": {"threshold": 0.9, "chosen_by": "given", "index": {}},
    }
    report = AuditReport.from_record(old)
    assert report.embedding.index is None and report.asked == ("sha256", "phash", "embedding")
    assert report.record()["embedding"]["index"] == {} and report.record()["asked"] == old["asked"]
    searched = {
        "eval_vectors": 4,
        "train_vectors": 9,
        "eval_searched": 1,
        "train_searched": 2,
        "mode": "incremental",
    }
    report = AuditReport.from_record({**old, "embedding": {**old["embedding"], "index": searched}})
    assert report.embedding.index == IndexSearch("incremental", 4, 9, 1, 2)
    assert report.record()["embedding"]["index"] == searched
    assert "searched in dedup's index (incremental: 1 eval and 2 train vectors)" in report.text()


def test_an_old_split_report_reads_its_bridges():
    old = {
        "images": 10,
        "bridges": [{"cluster_id": "c", "previous_splits": ["test", "val"], "held_out": 1}],
        "empty_splits": ["val"],
        "sizes": {"train": 10},
    }
    report = SplitReport.from_record(old)
    assert report.bridges == (Bridge("c", ("test", "val"), 1),) and report.empty_splits == ("val",)
    written = json.loads(json.dumps(report.record()))
    assert {k: written[k] for k in old} == old
