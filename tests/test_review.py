"""`tagpipe review` (issue 25 part 3): the queues ranked as their rules say (hand-worked),
--tag and --limit across parts, error rows kept out, the page rendered in headless
Chromium, and a reviewer's decisions round-tripped into the supplement export."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.core.errors import TagpipeError
from pipeline.core.schemas import part_schema, tag_row_schema
from pipeline.corpus.review import LABEL_FIELDS, ReviewSettings, rank_queue
from pipeline.table.tag_table import TagTable, commit_version

CATEGORIES = ("character", "general", "rating")


def schema(labels: bool = True) -> pa.Schema:
    fields = part_schema(tag_row_schema(CATEGORIES, None))
    for field in LABEL_FIELDS if labels else ():
        fields = fields.append(field)
    return fields


def row(uri: str, **values) -> dict:
    base = {name: None for name in schema().names}
    base.update(uri=uri, model_sha256="m" * 64, tags=[], scores=[], logit_indices=[], logit_values=[])
    base.update(values)
    return base


def write_table(
    root, parts: list[list[dict]], rules: dict | None = None, labels: bool = True, model: str = "m" * 64
) -> str:
    """A committed tag table, one part per list of rows."""
    table = TagTable(str(root))
    target = schema(labels)
    files = [
        table.write_part(
            f"data/k/part-{i:03d}.parquet",
            pa.Table.from_pylist(
                [{**{k: r.get(k) for k in target.names}, "model_sha256": model} for r in rows], target
            ),
        )
        for i, rows in enumerate(parts)
    ]
    commit_version(
        table,
        None,
        files,
        model_sha256=model,
        inference_key="i",
        rules_key="r",
        run_id="run",
        model_name="test",
        rules=rules or {},
        counts={},
    )
    return str(root)


def image(path, colour) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return str(path)


def queue(tags: str, kind: str, **options) -> list[dict]:
    settings = ReviewSettings(tags=tags, kind=kind, out="/nonexistent/q.jsonl", **options)
    return rank_queue(settings)[0]


def wrong(uri: str, tags: list[str], scores: list[float], **values) -> dict:
    return row(
        uri, likely_wrong=tags, likely_wrong_scores=scores, source_tags=tags, label_quality=0.5, **values
    )


def test_likely_wrong_is_ranked_by_expected_wrong_tags_then_the_strongest(tmp_path):
    # evidence per doubted tag: 1 - p (binary fractions: the sums are exact). a: 0.875 + 0.75;
    # b: 0.75; c: 0.5 + 0.25 = 0.75 too, but b's strongest (0.75) beats c's (0.5); d and e:
    # 0.625 each with the same strongest: by uri
    parts = [
        [wrong("e", ["x"], [0.375]), wrong("c", ["x", "y"], [0.5, 0.75])],
        [
            wrong("b", ["x"], [0.25]),
            wrong("z-error", ["x", "y", "w"], [0.0, 0.0, 0.0], error="boom", error_kind="decode_error"),
        ],
        [wrong("a", ["x", "y"], [0.125, 0.25]), wrong("d", ["y"], [0.375]), wrong("f", [], [])],
    ]
    got = queue(write_table(tmp_path / "t", parts), "likely-wrong")
    assert [r["uri"] for r in got] == ["a", "b", "c", "d", "e"]  # no error row, no row without doubts
    assert [r["rank"] for r in got] == [1, 2, 3, 4, 5]
    assert [r["score"] for r in got] == [1.625, 0.75, 0.75, 0.625, 0.625]
    assert got[0]["tags"] == ["x", "y"] and got[0]["tag_scores"] == [0.125, 0.25] and got[0]["decision"] == ""
    assert got[0]["source_tags"] == ["x", "y"] and "x (p=0.125)" in got[0]["reason"]
    # --tag y: only y's evidence, ranked by it: a 0.75 > d 0.625 > c 0.25
    by_y = queue(write_table(tmp_path / "t2", parts), "likely-wrong", tag="y")
    assert [(r["uri"], r["tags"], r["score"]) for r in by_y] == [
        ("a", ["y"], 0.75),
        ("d", ["y"], 0.625),
        ("c", ["y"], 0.25),
    ]


def test_likely_missing_is_ranked_by_expected_missing_tags(tmp_path):
    def missing(uri, tags, scores, **values):
        return row(uri, likely_missing=tags, likely_missing_scores=scores, source_tags=[], **values)

    parts = [
        [missing("a", ["x"], [0.875]), missing("b", ["x", "y"], [0.75, 0.5])],
        [missing("c", ["y"], [0.9375]), missing("d", [], []), missing("e", ["x"], [0.97], error="x")],
    ]
    got = queue(write_table(tmp_path / "t", parts), "likely-missing")
    assert [(r["uri"], r["score"]) for r in got] == [("b", 1.25), ("c", 0.9375), ("a", 0.875)]
    assert "tags the humans left out: x (p=0.750), y (p=0.500)" == got[0]["reason"]
    assert [r["uri"] for r in queue(write_table(tmp_path / "t2", parts), "likely-missing", tag="x")] == [
        "a",
        "b",
    ]


def test_limit_keeps_the_true_top_n_across_parts(tmp_path):
    rng = np.random.default_rng(3)
    parts, everything = [], []
    for p in range(6):
        rows = []
        for i in range(40):
            k = int(rng.integers(1, 4))
            scores = np.round(rng.uniform(0, 0.6, k), 3).tolist()
            rows.append(wrong(f"u{p}-{i:02d}", [f"t{j}" for j in range(k)], scores))
            everything.append((-sum(1 - s for s in scores), -max(1 - s for s in scores), f"u{p}-{i:02d}"))
        parts.append(rows)
    expected = [uri for *_, uri in sorted(everything)[:7]]
    assert len({uri.split("-")[0] for uri in expected}) > 1  # the top spans parts
    got = queue(write_table(tmp_path / "t", parts), "likely-wrong", limit=7)
    assert [r["uri"] for r in got] == expected


def test_top_rows_never_holds_more_than_the_limit(tmp_path):
    from pipeline.corpus.review_rank import ReviewKind, Source, TopRows, label_ranking

    parts = [[wrong(f"p{p}-{i}", ["x"], [i / 100]) for i in range(50)] for p in range(4)]
    source = Source.open(write_table(tmp_path / "t", parts))
    top, held = TopRows(3), []
    for part in source.parts(["uri", "error", "likely_wrong", "likely_wrong_scores"]):
        assert part.column_names == ["uri", "error", "likely_wrong", "likely_wrong_scores"]  # only these
        top.add(part, label_ranking(part, ReviewKind.LIKELY_WRONG, None))
        held.append(len(top.kept))
    assert held == [3, 3, 3, 3]
    assert [r["uri"] for r in top.records(ReviewKind.LIKELY_WRONG)] == ["p0-0", "p1-0", "p2-0"]


def test_ood_queue_holds_flagged_rows_by_distance(tmp_path):
    parts = [
        [
            row("a", ood_distance=30.0, ood=True, tags=["cat"]),
            row("b", ood_distance=50.0, ood=False, tags=["cat"]),  # not flagged
            row("c", ood_distance=40.0, ood=True, tags=["dog"]),
        ],
        [
            row("d", ood_distance=35.0, ood=True, tags=["cat", "dog"]),
            row("e", ood_distance=99.0, ood=True, error="gone", error_kind="not_found"),
            row("f", ood_distance=None, ood=None),
        ],
    ]
    table = write_table(tmp_path / "t", parts, labels=False)  # ood needs no label columns
    assert [(r["uri"], r["score"]) for r in queue(table, "ood")] == [("c", 40.0), ("d", 35.0), ("a", 30.0)]
    assert [r["uri"] for r in queue(table, "ood", tag="cat")] == ["d", "a"]


def test_a_table_without_label_columns_is_one_line_error(tmp_path):
    table = write_table(tmp_path / "t", [[row("a")]], labels=False)
    for kind in ("likely-wrong", "likely-missing"):
        with pytest.raises(TagpipeError, match="--source-tags.*compare-tags"):
            queue(table, kind)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "review",
            "--tags",
            table,
            "--kind",
            "likely-wrong",
            "--out",
            str(tmp_path / "q.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("error: ") and "compare-tags" in done.stderr
    assert not (tmp_path / "q.jsonl").exists()
