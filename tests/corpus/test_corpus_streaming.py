"""Export and split at corpus scale (issue 31): they read a table part by part and only
the columns they need, and write what a whole-table read would have written.

The oracle is the whole read the stages did before: every row of the table in one Arrow
table, sorted by uri, each row a Python dict. Tables are real: parts written and
committed through the table API, rows in the declared part schema, embeddings included.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import TagpipeError
from pipeline.core.schemas import part_schema, tag_row_schema
from pipeline.corpus import export_rows
from pipeline.corpus.export import CaptionOptions, TextOptions, caption_path, export_tags
from pipeline.corpus.export_text import caption_text, row_line
from pipeline.storage.outputs import OUTPUT_MARKER
from pipeline.table.reading import read_parquet
from pipeline.table.tag_table import TagTable, commit_version

CATEGORIES = ["general", "character", "copyright", "rating"]
VOCAB = [f"tag_{i:03d}" for i in range(60)] + ["stripe_chan_(tagpipe)", "^_^"]
WIDTH = 8


def tag_rows(uris: list[str], seed: int, error_every: int = 7) -> pa.Table:
    """Rows in the part schema: 2-9 tags by score, split into categories, scores, rating,
    size, an embedding; every error_every-th row an error row (no tags)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, uri in enumerate(uris):
        error = i % error_every == error_every - 1
        tags = [] if error else list(rng.choice(VOCAB, int(rng.integers(2, 10)), replace=False))
        row = {
            "uri": uri,
            "error": "OSError: planted" if error else None,
            "error_kind": "read_error" if error else None,
            "width": int(rng.integers(100, 3000)),
            "height": int(rng.integers(100, 3000)),
            "tags": None if error else tags,
            "scores": None if error else sorted(rng.uniform(0.3, 1, len(tags)).tolist(), reverse=True),
            "rating": None if error else str(rng.choice(["general", "sensitive", "explicit"])),
            "quality": None if error else "best_quality",
            "embedding": None if error else rng.normal(size=WIDTH).astype(np.float16).tolist(),
        }
        for k, name in enumerate(CATEGORIES):
            row[f"tags_{name}"] = None if error else [t for t in tags if VOCAB.index(t) % 4 == k]
        rows.append(row)
    schema = part_schema(tag_row_schema(CATEGORIES, WIDTH))
    return pa.Table.from_pylist(rows, schema=schema)


def commit(root, parts: dict[str, pa.Table], keep: tuple[str, ...] = ()) -> str:
    """A new version of the table at root: the parts written through the table API, plus
    `keep` (parts of the version before)."""
    table = TagTable(str(root))
    for file, part in parts.items():
        table.write_part(file, part)
    commit_version(
        table,
        table.current(),
        [*keep, *parts],
        model_sha256="0" * 64,
        inference_key="k",
        rules_key="r",
        run_id=f"run{len(table.versions()) + 1}",
        model_name="synthetic",
    )
    return str(root)


def uris_of(numbers) -> list[str]:
    return [f"/corpus/img/{n // 10:03d}/{n:05d}.jpg" for n in numbers]


@pytest.fixture
def runs_table(tmp_path):
    """A first run's table: each part a range of uris, its rows in any order, the parts
    listed out of uri order."""
    rng = np.random.default_rng(1)
    parts = {}
    for k, start in enumerate((200, 0, 100)):
        numbers = rng.permutation(np.arange(start, start + 100))
        parts[f"data/k/part-{k}.parquet"] = tag_rows(uris_of(numbers), seed=k)
    return commit(tmp_path / "runs", parts)


@pytest.fixture
def grown_table(runs_table):
    """The same table after a later run whose new images fall between the old ones."""
    new = {"data/k2/part-new.parquet": tag_rows(uris_of(range(1000, 1300, 3)) + uris_of([5005]), seed=9)}
    new["data/k2/part-new2.parquet"] = tag_rows(uris_of(range(1001, 1300, 3)), seed=10)
    return commit(runs_table, new, keep=TagTable(runs_table).snapshot().files)


def whole_read(tags: str) -> list[dict]:
    """The oracle: every row at once, sorted by uri, error rows left out."""
    return [r for r in read_parquet(tags).sort_by("uri").to_pylist() if r["error"] is None]


def expected_lines(tags: str, fmt: str, text: TextOptions) -> bytes:
    return ("\n".join(row_line(row, fmt, text) for row in whole_read(tags)) + "\n").encode()


@pytest.fixture
def small_slices(monkeypatch):
    """Slices and buckets of a few rows, so tables of hundreds of rows take many of each."""
    monkeypatch.setattr(export_rows, "SLICE_ROWS", 16)
    monkeypatch.setattr(export_rows, "BUCKET_ROWS", 40)
    monkeypatch.setattr(export_rows, "MAX_BUCKETS", 4)
    spilled = []
    bucketed = export_rows._bucketed
    monkeypatch.setattr(export_rows, "_bucketed", lambda *a: spilled.append(1) or bucketed(*a))
    return spilled


@pytest.mark.parametrize("fmt", ["jsonl", "dart"])
@pytest.mark.parametrize("layout", ["runs", "grown"])
def test_line_exports_are_the_whole_read_sorted_by_uri(layout, fmt, request, tmp_path, small_slices):
    tags = request.getfixturevalue(f"{layout}_table")
    text = TextOptions(spaces=True, exclude=frozenset({"tag_001"}))
    summary = export_tags(tags, str(tmp_path / "out"), fmt, text)
    name = "tags.jsonl" if fmt == "jsonl" else "dart_prompts.jsonl"
    assert (tmp_path / "out" / name).read_bytes() == expected_lines(tags, fmt, text)
    assert summary.written == 1 and summary.skipped_errors == len(read_parquet(tags)) - len(whole_read(tags))
    assert bool(small_slices) == (layout == "grown")  # interleaved parts are sorted through bucket files


def test_captions_of_a_grown_table_are_the_whole_reads(grown_table, tmp_path, small_slices):
    caption = CaptionOptions(rating="last", character_first=True, separator="; ")
    summary = export_tags(grown_table, str(tmp_path / "out"), "captions", caption=caption)
    rows = whole_read(grown_table)
    assert summary.written == len(rows) == len(list((tmp_path / "out").rglob("*.txt")))
    for row in rows:  # the common folder of every row, though each part has its own
        target = tmp_path / "out" / caption_path(row["uri"][len("/corpus/img/") :])
        assert target.read_text() == caption_text(row, TextOptions(), caption, None)


def _corrupt_column(path, column: str) -> None:
    """Overwrite the bytes of one column's chunks in a Parquet file: reading that column
    fails, reading the others still works."""
    meta = pq.read_metadata(path)
    data = bytearray(path.read_bytes())
    for group in range(meta.num_row_groups):
        for index in range(meta.num_columns):
            chunk = meta.row_group(group).column(index)
            if chunk.path_in_schema.split(".")[0] == column:
                start = chunk.dictionary_page_offset or chunk.data_page_offset
                data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


def test_exports_never_read_the_embeddings(grown_table, tmp_path):
    before = {fmt: tmp_path / f"before-{fmt}" for fmt in ("jsonl", "dart", "captions")}
    for fmt, out in before.items():
        export_tags(grown_table, str(out), fmt)
    for part in TagTable(grown_table).snapshot().files:
        _corrupt_column(tmp_path / "runs" / part, "embedding")
    with pytest.raises((OSError, pa.ArrowException)):  # the corruption is real: a whole read fails on it
        read_parquet(grown_table)
    for fmt, out in before.items():
        export_tags(grown_table, str(tmp_path / f"after-{fmt}"), fmt)
        files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        assert files and all(
            (out / f).read_bytes() == (tmp_path / f"after-{fmt}" / f).read_bytes() for f in files
        )


def test_plain_parquet_row_groups_and_a_folder_missing_a_column(tmp_path, small_slices):
    rows = tag_rows(uris_of(np.random.default_rng(3).permutation(300)), seed=3)
    pq.write_table(rows, tmp_path / "one.parquet", row_group_size=64)  # unsorted, five row groups
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(tag_rows(uris_of(range(300, 400)), seed=4), folder / "a.parquet")
    pq.write_table(tag_rows(uris_of(range(400, 450)), seed=5).drop(["tags_rating"]), folder / "b.parquet")
    for tags in (tmp_path / "one.parquet", folder):
        export_tags(str(tags), str(tmp_path / f"out-{tags.stem}"), "jsonl")
        assert (tmp_path / f"out-{tags.stem}" / "tags.jsonl").read_bytes() == expected_lines(
            str(tags), "jsonl", TextOptions()
        )
    assert small_slices  # the unsorted file took the bucket path
    last = json.loads((tmp_path / "out-folder" / "tags.jsonl").read_text().splitlines()[-1])
    assert last["tags_rating"] == []  # read as null where the file lacks it, as a whole read does


def test_a_failed_line_export_leaves_no_half_file(runs_table, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tags.jsonl").write_text("the previous export\n")
    calls = []

    def failing(row, fmt, text):
        calls.append(1)
        if len(calls) > 150:
            raise RuntimeError("disk full")
        return row_line(row, fmt, text)

    monkeypatch.setattr("pipeline.corpus.export.row_line", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_tags(runs_table, str(out), "jsonl", existing="overwrite")
    # no temp file left beside it (the mark that names tags.jsonl as tagpipe's output stays)
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "tags.jsonl"]
    assert (out / "tags.jsonl").read_text() == "the previous export\n"


def test_caption_checks_span_every_part_before_any_write(grown_table, tmp_path):
    out = tmp_path / "out"
    last = whole_read(grown_table)[-1]["uri"]  # in a part read after others
    mine = out / caption_path(last[len("/corpus/img/") :])
    mine.parent.mkdir(parents=True)
    mine.write_text("my own words\n")
    with pytest.raises(TagpipeError, match="1 of the .* files to write already exist"):
        export_tags(grown_table, str(out), "captions")
    assert [p for p in out.rglob("*") if p.is_file()] == [mine]
    clash = commit(
        tmp_path / "clash",
        {
            "data/k/part-a.parquet": tag_rows(["/corpus/img/a/x.jpg", "/corpus/img/b/y.jpg"], seed=1),
            "data/k/part-b.parquet": tag_rows(["/corpus/img/a/x.png"], seed=2),
        },
    )
    with pytest.raises(
        TagpipeError, match=r"/corpus/img/a/x.jpg and /corpus/img/a/x.png would write the same"
    ):
        export_tags(clash, str(tmp_path / "clash-out"), "captions")
    assert not (tmp_path / "clash-out").exists()


def test_supplement_export_merges_and_counts_over_every_part(tmp_path, small_slices):
    from pipeline.corpus.supplement import Decisions, supplement_rows

    def labelled(numbers, seed):
        part, rng = tag_rows(uris_of(numbers), seed), np.random.default_rng(seed)
        source = [None if rng.random() < 0.2 else list(rng.choice(VOCAB, 4, replace=False)) for _ in numbers]
        wrong = [None if s is None else s[:1] for s in source]
        part = part.append_column("source_tags", pa.array(source, pa.list_(pa.string())))
        return part.append_column("likely_wrong", pa.array(wrong, pa.list_(pa.string())))

    tags = commit(tmp_path / "t", {f"data/k/p{k}.parquet": labelled(range(k, 240, 3), k) for k in range(3)})
    decisions = Decisions(
        {uris_of([4])[0]: {VOCAB[0]: True, "new_tag": True}, "/elsewhere.jpg": {"x": False}}
    )
    summary = export_tags(tags, str(tmp_path / "out"), "jsonl", supplement=decisions)
    merged, counts = supplement_rows(whole_read(tags), decisions)
    want = "\n".join(row_line(row, "jsonl", TextOptions()) for row in merged) + "\n"
    assert (tmp_path / "out" / "tags.jsonl").read_text() == want and summary.supplement == counts
    assert counts.decisions_applied == 2 and counts.decisions_unmatched == 1 and small_slices


# ---- split -----------------------------------------------------------------------------


def _split_case(tmp_path):
    """A two-part tag table (interleaved uris), clusters A-D, and a previous split:
    A all seen before (kept as they were, though A's own draw may differ), B seen in val
    (its new image joins val), C seen in train and test (its new image bridges them:
    held out), D all new (drawn). c2 was in the previous split with other bytes (new
    again); b3 is an error row; a9 is clustered but not tagged; c3 was held out."""
    uri = {name: f"/corpus/{name}.jpg" for name in "a1 a2 b1 b2 c1 c2 c3 c4 d1 d2 b3 a9".split()}
    tagged = [uri[n] for n in "a1 a2 b1 b2 c1 c2 c3 c4 d1 d2 b3".split()]
    parts = {
        "data/k/p0.parquet": tag_rows(tagged[0::2], seed=1, error_every=99),
        "data/k/p1.parquet": tag_rows(tagged[1::2], seed=2, error_every=99),
    }
    parts["data/k/p0.parquet"] = parts["data/k/p0.parquet"].set_column(
        1, "sha256", pa.array([f"sha-{u}" for u in tagged[0::2]])
    )
    parts["data/k/p1.parquet"] = parts["data/k/p1.parquet"].set_column(
        1, "sha256", pa.array([f"sha-{u}" for u in tagged[1::2]])
    )
    errors = [None if u != uri["b3"] else "OSError: planted" for u in tagged[0::2]]
    parts["data/k/p0.parquet"] = parts["data/k/p0.parquet"].set_column(
        8, "error", pa.array(errors, pa.string())
    )
    tags = commit(tmp_path / "tags", parts)
    cluster = {n: "cluster-" + n[0].upper() for n in uri}
    pq.write_table(
        pa.table(
            {
                "uri": list(uri.values()),
                "sha256": [f"sha-{u}" for u in uri.values()],
                "phash": pa.array(range(len(uri)), pa.uint64()),
                "cluster_id": [cluster[n] for n in uri],
            }
        ),
        tmp_path / "clusters.parquet",
    )
    before = {
        "a1": "test",
        "a2": "val",
        "b1": "val",
        "c1": "train",
        "c2": "test",
        "c3": "held_out",
        "c4": "test",
    }
    before_sha = {n: f"sha-{uri[n]}" if n != "c2" else "other bytes" for n in before}
    pq.write_table(
        pa.table(
            {
                "uri": [uri[n] for n in before],
                "split": list(before.values()),
                "sha256": [before_sha[n] for n in before],
            }
        ),
        tmp_path / "previous.parquet",
    )
    return tags, uri


def test_split_keeps_previous_splits_and_holds_out_bridges(tmp_path, monkeypatch):
    from pipeline.corpus import split_columns
    from pipeline.corpus.split import HELD_OUT, Bridge, assign, cluster_unit, run_split

    monkeypatch.setattr(split_columns, "BLOCK_ROWS", 3)  # tags counted over several blocks
    tags, uri = _split_case(tmp_path)
    ratios = {"train": 0.5, "val": 0.25, "test": 0.25}
    clusters, previous = str(tmp_path / "clusters.parquet"), str(tmp_path / "previous.parquet")
    report = run_split(tags, clusters, str(tmp_path / "out"), ratios=ratios, seed=7, previous=previous)
    drawn = assign(cluster_unit(7, "cluster-D"), ratios)
    want = {"a1": "test", "a2": "val", "b1": "val", "b2": "val", "c1": "train", "c2": HELD_OUT}
    want |= {"c3": HELD_OUT, "c4": "test", "d1": drawn, "d2": drawn}
    out = pq.read_table(tmp_path / "out" / "splits.parquet")
    assert out.column("uri").to_pylist() == sorted(uri[n] for n in want)
    assert dict(zip(out.column("uri").to_pylist(), out.column("split").to_pylist())) == {
        uri[n]: s for n, s in want.items()
    }
    assert report.bridges == (  # A is reported too: its earlier images sit in two splits, none new
        Bridge("cluster-A", ("test", "val"), 0),
        Bridge("cluster-C", ("test", "train"), 1),
    )
    assert report.kept_from_previous == 6 and report.clusters == 4 and report.images == 10
    rows = {r["uri"]: r for r in read_parquet(tags).to_pylist()}
    positives: dict = {}
    for u, s in zip(out.column("uri").to_pylist(), out.column("split").to_pylist()):
        for t in rows[u]["tags"]:
            positives.setdefault(t, {}).setdefault(s, 0)
            positives[t][s] += 1
    assert report.positives == positives and list(report.positives) == list(positives)


def test_split_never_reads_the_embeddings(tmp_path):
    from pipeline.corpus.split import run_split

    tags, _ = _split_case(tmp_path)
    clusters = str(tmp_path / "clusters.parquet")
    given = {"ratios": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 7}
    run_split(tags, clusters, str(tmp_path / "before"), **given, previous=str(tmp_path / "previous.parquet"))
    for part in TagTable(tags).snapshot().files:
        _corrupt_column(tmp_path / "tags" / part, "embedding")
    with pytest.raises((OSError, pa.ArrowException)):
        read_parquet(tags)
    run_split(tags, clusters, str(tmp_path / "after"), **given, previous=str(tmp_path / "previous.parquet"))
    for name in ("splits.parquet", "_report.json"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()
