"""The report's per-part summaries (issue 31): a report reads only the parts it has no
summary of, and its page is the page of a scan from scratch."""

from __future__ import annotations

import gzip
import json
import re
import threading
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import pipeline.corpus.report_scan as report_scan
from pipeline.corpus.drift import version_drift
from pipeline.corpus.report import build_report
from pipeline.corpus.report_figures import TOP_OOD, Accumulator, Figures, PartFigures
from pipeline.storage.filesystem import filesystem_for
from pipeline.table.tag_table import SUMMARIES_DIR, TagTable, commit_version
from pipeline.table.version_fields import RulesRecord

VOCAB = [f"tag_{i:03d}" for i in range(60)]
CATEGORIES = ["general", "character"]
KINDS = ["not_found", "decode_error"]


def _part(n: int, seed: int, error_rate: float = 0.05, tagged_errors: bool = False) -> pa.Table:
    """Tag rows with every column the report reads: tags with scores, per-category tags,
    OOD distances and flags, error rows (no tags, no distance)."""
    rng = np.random.default_rng(seed)
    error = rng.random(n) < error_rate
    per_row = np.where(error & ~tagged_errors, 0, rng.integers(1, 8, n))  # tagged_errors: the drift counts
    # only decoded rows' tags, so a part's drift tags are not its tag counts
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    weights = 1 / np.arange(1, len(VOCAB) + 1) ** 1.4  # a few common tags, a long tail; once a row
    index = np.concatenate(
        [rng.choice(len(VOCAB), k, replace=False, p=weights / weights.sum()) for k in per_row] + [[]]
    ).astype(np.int64)
    names = np.array(VOCAB, dtype=object)[index]
    tags = pa.ListArray.from_arrays(offsets, pa.array(names.tolist(), pa.string()))
    distance = rng.gamma(9.0, 0.3, n).astype(np.float32)
    columns = {
        "uri": pa.array([f"/corpus/{seed}/{i:05d}.jpg" for i in range(n)]),
        "error": pa.array(np.where(error, f"OSError: planted {seed}", None).tolist(), pa.string()),
        "error_kind": pa.array(np.where(error, rng.choice(KINDS, n), None).tolist(), pa.string()),
        "tags": tags,
        "scores": pa.ListArray.from_arrays(
            offsets, pa.array(rng.uniform(0.35, 1.0, offsets[-1]), pa.float32())
        ),
        "ood_distance": pa.array(np.where(error, np.nan, distance), pa.float32(), mask=error),
        "ood": pa.array(np.where(error, None, distance > 4.0).tolist(), pa.bool_()),
    }
    for c, category in enumerate(CATEGORIES):
        keep = index % len(CATEGORIES) == c
        counts = np.bincount(np.repeat(np.arange(n), per_row)[keep], minlength=n)
        columns[f"tags_{category}"] = pa.ListArray.from_arrays(
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
            pa.array(names[keep].tolist(), pa.string()),
        )
    return pa.table(columns)


def _commit(table: TagTable, files: list[str], parts: dict[str, pa.Table], threshold: float = 0.5) -> None:
    for file, part in parts.items():
        table.write_part(file, part)
    commit_version(
        table,
        table.current(),
        files,
        model_sha256="0" * 64,
        inference_key="k",
        rules_key=f"r{threshold}",
        run_id=f"run{len(table.versions()) + 1}",
        model_name="synthetic",
        rules=RulesRecord(default_threshold=threshold),
    )


def _page(path: Path) -> dict[str, str]:
    """The page's sections, without the time it was made."""
    return dict(re.findall(r"<section id='(\w+)'>(.*?)</section>", path.read_text(), re.S))


@pytest.fixture
def opened(monkeypatch):
    """The parts (data/...parquet) the local filesystem opens: every read of a part, of
    its footer or its rows, goes through fs.open."""
    fs, _ = filesystem_for("/")
    seen: list[str] = []
    real = fs.open

    def spy(path, *args, **kwargs):
        if str(path).endswith(".parquet") and "/data/" in str(path):
            seen.append("data/" + str(path).split("/data/", 1)[1])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fs, "open", spy)
    return seen


def _summaries(root: Path) -> list[Path]:
    return sorted((root / SUMMARIES_DIR).rglob("*.json.gz"))


def test_a_report_reads_only_the_parts_added_and_its_page_is_a_full_scans(tmp_path, opened):
    root = tmp_path / "tags"
    table = TagTable(str(root))
    files = [f"data/a/part-{i}.parquet" for i in range(4)]
    _commit(table, files, {f: _part(400, seed=i, tagged_errors=i == 0) for i, f in enumerate(files)})
    first = build_report(str(root), str(tmp_path / "1.html"))
    assert (first.scan.parts_read, first.scan.summaries_written, first.scan.summaries_reused) == (4, 4, 0)
    assert len(_summaries(root)) == 4 and "4 parts read, 0 part summaries reused" in first.text()

    # a nightly's shape: a new part (1% of a real table), and one part rewritten without some rows
    new = "data/b/part-new.parquet"
    _commit(table, [*files, new], {new: _part(50, seed=9, tagged_errors=True)})
    opened.clear()
    second = build_report(str(tmp_path / "tags"), str(tmp_path / "2.html"))
    assert opened == [new], opened  # not even an old part's footer
    assert (second.scan.parts_read, second.scan.summaries_reused, second.scan.summaries_written) == (1, 4, 1)
    assert second.drift.compared and second.drift.parts_read == 5

    kept = _part(400, seed=0, tagged_errors=True).slice(100)
    rewritten = "data/c/part-0-rewritten.parquet"
    _commit(table, [rewritten, *files[1:], new], {rewritten: kept})
    opened.clear()
    third = build_report(str(root), str(tmp_path / "3.html"))
    # the rewritten part is read; the part it replaced (version 2's own) counts for the
    # drift from the summary the first report kept
    assert opened == [rewritten], opened
    assert third.scan.parts_read == 1 and third.scan.summaries_reused == 4 + 1
    assert third.drift.parts_read == 6 and third.drift.rows_before == 1650 and third.drift.rows_after == 1550

    opened.clear()
    scratch = build_report(str(root), str(tmp_path / "scratch.html"), keep_summaries=False)
    assert sorted(set(opened)) == sorted([rewritten, *files, new])  # every part, summaries ignored
    assert scratch.scan.parts_read == 6 and scratch.scan.summaries_reused == 0
    assert _page(tmp_path / "3.html") == _page(tmp_path / "scratch.html")
    assert (third.rows, third.errors, third.thumbnails) == (scratch.rows, scratch.errors, scratch.thumbnails)
    assert asdict(third.drift) == asdict(scratch.drift)
    assert asdict(third.drift) == asdict(version_drift(str(root)))  # the drift's own reading

    # the figures themselves, field by field
    snapshot = table.current()
    summaries = report_scan.PartSummaries(table, 0.5)
    cached, _ = report_scan.scan(str(root), None, 0.5, table, snapshot, summaries)
    direct, counts = report_scan.scan(str(root), None, 0.5, table, snapshot)
    assert counts.parts_read == 5
    for name in (f.name for f in fields(Figures)):  # (asdict would make a Counter of the pairs)
        ours, theirs = getattr(cached, name), getattr(direct, name)
        if name == "ood_cdf":
            assert all(np.array_equal(a, b) for a, b in zip(ours, theirs)) and len(ours[0]), name
        else:
            assert np.array_equal(ours, theirs) if name == "score_hist" else ours == theirs, name
    assert direct.rows == 1550 and len(direct.top_ood) == TOP_OOD
    assert list(direct.by_category) == ["character", "general"]


def test_the_page_shows_the_tables_figures(tmp_path):
    """Counts in a page made from summaries are the rows': tags per category, errors,
    OOD flags and the most out-of-distribution rows."""
    root = tmp_path / "tags"
    table = TagTable(str(root))
    parts = {f"data/a/p{i}.parquet": _part(300, seed=20 + i) for i in range(3)}
    _commit(table, list(parts), parts)
    build_report(str(root), str(tmp_path / "warm.html"))
    summary = build_report(str(root), str(tmp_path / "r.html"))
    assert summary.scan.summaries_reused == 3 and summary.scan.parts_read == 0
    rows = pa.concat_tables(parts.values()).to_pylist()
    text = (tmp_path / "r.html").read_text()
    assert f">{len(rows)}</div><div>images<" in text
    for category in CATEGORIES:
        counts: dict = {}
        for row in rows:
            for tag in row[f"tags_{category}"] or []:
                counts[tag] = counts.get(tag, 0) + 1
        top = max(counts, key=lambda t: (counts[t], t))
        assert re.search(rf">{top}</text><rect [^>]*/><text [^>]*>{counts[top]:,}</text>", text), category
    errors = [r for r in rows if r["error_kind"]]
    assert summary.errors == len(errors)
    flagged = sum(bool(r["ood"]) for r in rows)
    assert f"<p>{flagged:,} of {len(rows) - len(errors):,} images flagged as OOD;" in text
    ood = sorted(((r["ood_distance"], r["uri"]) for r in rows if r["ood_distance"] is not None), reverse=True)
    shown = re.findall(r"<figure title='([^']+)'>", text[text.index("id='ood'") :])
    assert shown == [u for _, u in ood[:TOP_OOD]]


def test_the_ood_sketch_adds_up_and_stays_within_its_precision():
    rng = np.random.default_rng(0)
    values = [rng.gamma(9.0, 0.3, n).astype(np.float32) for n in (5_000, 7_000, 1, 20_000)]
    adding = Accumulator()
    for i, v in enumerate(values):
        part = pa.table({"uri": [f"u{i}-{k}" for k in range(len(v))], "ood_distance": v})
        record = PartFigures.of_part(part, 0.5).record()
        adding.add(PartFigures.from_record(json.loads(json.dumps(record))))
    acc = adding.result()
    every = np.concatenate(values)
    assert acc.ood_count == len(every) == adding.ood_buckets.sum()
    for q in (0.01, 0.5, 0.9, 0.999):
        assert acc.ood_quantile(q) == pytest.approx(np.quantile(every, q), rel=1e-3), q
    edges = np.linspace(0.0, float(np.percentile(every, 99.9)) * 1.05, 41)
    exact = np.histogram(np.clip(every, edges[0], edges[-1]), edges)[0]
    ours = acc.ood_histogram(edges)
    assert ours.sum() == len(every) and np.abs(ours - exact).max() <= max(3, 0.005 * exact.max())
    top = sorted(
        ((float(d), f"u{i}-{k}") for i, v in enumerate(values) for k, d in enumerate(v)), reverse=True
    )
    assert sorted(acc.top_ood, reverse=True) == top[:TOP_OOD]
    # a sketch is small: buckets, not values
    assert np.count_nonzero(adding.ood_buckets) < len(every) / 5


def test_another_threshold_is_another_key(tmp_path):
    root = tmp_path / "tags"
    table = TagTable(str(root))
    parts = {f"data/a/p{i}.parquet": _part(300, seed=30 + i) for i in range(2)}
    _commit(table, list(parts), parts, threshold=0.5)
    build_report(str(root), str(tmp_path / "a.html"))
    _commit(table, list(parts), {}, threshold=0.7)  # rethreshold's shape: same rows, new rule
    moved = build_report(str(root), str(tmp_path / "b.html"))
    assert moved.scan.parts_read == 2 and moved.scan.summaries_written == 2 and len(_summaries(root)) == 4
    build_report(str(root), str(tmp_path / "c.html"), keep_summaries=False)
    assert _page(tmp_path / "b.html")["scores"] == _page(tmp_path / "c.html")["scores"]
    assert _page(tmp_path / "a.html")["scores"] != _page(tmp_path / "b.html")["scores"]
    again = build_report(str(root), str(tmp_path / "d.html"), version=1)
    assert again.scan.parts_read == 0 and again.scan.summaries_reused == 2


def test_a_table_the_report_cannot_write_to_is_read_as_before(tmp_path, monkeypatch, caplog):
    root = tmp_path / "tags"
    table = TagTable(str(root))
    parts = {f"data/a/p{i}.parquet": _part(200, seed=40 + i) for i in range(3)}
    _commit(table, list(parts), parts)
    tries = []

    def denied(uri, data, storage_options=None):
        tries.append(uri)
        raise PermissionError(f"[Errno 13] Permission denied: '{uri}'")

    monkeypatch.setattr(report_scan, "create_exclusive", denied)
    with caplog.at_level("DEBUG", logger="pipeline.corpus.report_scan"):
        summary = build_report(str(root), str(tmp_path / "r.html"))
    assert summary.rows == 600 and summary.scan.parts_read == 3 and summary.scan.summaries_written == 0
    assert len(tries) == 1  # one refusal, then no more tries
    assert "Permission denied" in summary.scan.cache and "summaries not kept" in summary.text()
    assert any("part summaries not kept" in r.getMessage() for r in caplog.records)
    assert not (root / SUMMARIES_DIR).exists()
    build_report(str(root), str(tmp_path / "scratch.html"), keep_summaries=False)
    assert _page(tmp_path / "r.html") == _page(tmp_path / "scratch.html")


def test_a_summary_is_never_replaced_and_a_bad_one_is_read_around(tmp_path):
    root = tmp_path / "tags"
    table = TagTable(str(root))
    parts = {f"data/a/p{i}.parquet": _part(200, seed=50 + i) for i in range(2)}
    _commit(table, list(parts), parts)
    key = report_scan.summary_key(0.5)
    from pipeline.table.tag_table import summary_record

    bad = root / summary_record("data/a/p0.parquet", key)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not gzip")
    summary = build_report(str(root), str(tmp_path / "r.html"))
    assert summary.scan.parts_read == 2 and summary.scan.summaries_written == 1
    assert bad.read_bytes() == b"not gzip"  # created exclusively: never replaced
    build_report(str(root), str(tmp_path / "scratch.html"), keep_summaries=False)
    assert _page(tmp_path / "r.html") == _page(tmp_path / "scratch.html")
    # another part's summary under this part's name is not taken for it
    good = root / summary_record("data/a/p1.parquet", key)
    bad.unlink()
    bad.write_bytes(good.read_bytes())
    again = build_report(str(root), str(tmp_path / "again.html"))
    assert again.scan.parts_read == 1 and _page(tmp_path / "again.html") == _page(tmp_path / "scratch.html")


def test_reports_at_once_write_each_summary_once(tmp_path):
    root = tmp_path / "tags"
    table = TagTable(str(root))
    parts = {f"data/a/p{i}.parquet": _part(300, seed=60 + i) for i in range(6)}
    _commit(table, list(parts), parts)
    start = threading.Barrier(3)
    results: dict = {}

    def report(name: str) -> None:
        start.wait()
        results[name] = build_report(str(root), str(tmp_path / f"{name}.html"))

    threads = [threading.Thread(target=report, args=(n,)) for n in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.scan.summaries_written for r in results.values()) == 6
    files = _summaries(root)
    assert len(files) == 6 and all(json.loads(gzip.decompress(f.read_bytes()))["part"] for f in files)
    assert not [p for p in (root / SUMMARIES_DIR).rglob("*") if ".tmp-" in p.name]
    pages = [_page(tmp_path / f"{n}.html") for n in ("a", "b", "c")]
    assert pages[0] == pages[1] == pages[2]
    assert build_report(str(root), str(tmp_path / "d.html")).scan.parts_read == 0


def test_plain_parquet_is_scanned_directly(tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "plain").mkdir()
    for i in range(2):
        pq.write_table(_part(200, seed=70 + i), tmp_path / "plain" / f"x{i}.parquet")
    summary = build_report(str(tmp_path / "plain"), str(tmp_path / "p.html"))
    assert summary.rows == 400 and summary.scan is None and "parts read" not in summary.text()
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["x0.parquet", "x1.parquet"]
    text = (tmp_path / "p.html").read_text()
    assert "<h3>character" in text and "<h3>general" in text and "images flagged as OOD" in text


def test_vacuum_deletes_the_summaries_of_the_parts_it_deletes(tmp_path):
    root = tmp_path / "tags"
    table = TagTable(str(root))
    parts = {f"data/a/part-{i}.parquet": _part(100, seed=80 + i) for i in range(3)}
    _commit(table, list(parts), parts)
    build_report(str(root), str(tmp_path / "r.html"))
    kept = _part(100, seed=80).slice(10)
    _commit(
        table,
        ["data/b/part-0.parquet", "data/a/part-1.parquet", "data/a/part-2.parquet"],
        {"data/b/part-0.parquet": kept},
    )
    build_report(str(root), str(tmp_path / "r.html"))
    assert len(_summaries(root)) == 4
    done = table.vacuum(keep_versions=1, grace_hours=0)
    assert done["parts_deleted"] == 1 and done["summaries_deleted"] == 1
    left = [str(p.relative_to(root / SUMMARIES_DIR)) for p in _summaries(root)]
    assert len(left) == 3 and not any(name.startswith("data/a/part-0.") for name in left)
    assert build_report(str(root), str(tmp_path / "r.html")).scan.parts_read == 0
