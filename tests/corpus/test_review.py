"""`tagpipe review` (issue 25 part 3): the queues ranked as their rules say (hand-worked),
--tag and --limit across parts, error rows kept out, the page rendered in headless
Chromium, and a reviewer's decisions round-tripped into the supplement export. Tables keep
their label columns in the label sidecar, as the label check writes them; some tests also
run on tables from before it (the columns inside the parts)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.core.errors import TagpipeError
from pipeline.core.schemas import LABEL_FIELDS, LABELS_SCHEMA, part_schema, tag_row_schema
from pipeline.corpus.review import ReviewSettings, rank_queue, run_review
from pipeline.table.labels import labels_file
from pipeline.table.tag_table import TagTable, commit_version
from pipeline.table.version_fields import RulesRecord
from tests.helpers import run_cli

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
    root,
    parts: list[list[dict]],
    rules: dict | None = None,
    labels: bool = True,
    model: str = "m" * 64,
    sidecar: bool = True,
) -> str:
    """A committed tag table, one part per list of rows; labels: with the label columns,
    in the label sidecar (one labels file per part), or, not sidecar, inside the parts."""
    table = TagTable(str(root))
    target = schema(labels and not sidecar)
    files = [
        table.write_part(
            f"data/k/part-{i:03d}.parquet",
            pa.Table.from_pylist(
                [{**{k: r.get(k) for k in target.names}, "model_sha256": model} for r in rows], target
            ),
        )
        for i, rows in enumerate(parts)
    ]
    sidecars = {
        file: table.write_part(
            labels_file(f"{i:032x}"),
            pa.Table.from_pylist([{k: r.get(k) for k in LABELS_SCHEMA.names} for r in rows], LABELS_SCHEMA),
        )
        for i, (file, rows) in enumerate(zip(files, parts))
        if labels and sidecar
    }
    commit_version(
        table,
        None,
        files,
        model_sha256=model,
        inference_key="i",
        rules_key="r",
        run_id="run",
        model_name="test",
        rules=RulesRecord.from_record(rules),
        labels=sidecars,
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


@pytest.mark.parametrize("sidecar", [True, False], ids=["sidecar", "inside parts"])
def test_likely_wrong_is_ranked_by_expected_wrong_tags_then_the_strongest(tmp_path, sidecar):
    # evidence per doubted tag: 1 - p (binary fractions: the sums are exact). a: 0.875 + 0.75;
    # c: 0.75; b: 0.5 + 0.25 = 0.75 too, but c's strongest (0.75) beats b's (0.5), whatever
    # the uris say; d and e: 0.625 each with the same strongest: by uri
    parts = [
        [wrong("e", ["x"], [0.375]), wrong("b", ["x", "y"], [0.5, 0.75])],
        [
            wrong("c", ["x"], [0.25]),
            wrong("z-error", ["x", "y", "w"], [0.0, 0.0, 0.0], error="boom", error_kind="decode_error"),
        ],
        [wrong("a", ["x", "y"], [0.125, 0.25]), wrong("d", ["y"], [0.375]), wrong("f", [], [])],
    ]
    got = queue(write_table(tmp_path / "t", parts, sidecar=sidecar), "likely-wrong")
    assert [r["uri"] for r in got] == ["a", "c", "b", "d", "e"]  # no error row, no row without doubts
    assert [r["rank"] for r in got] == [1, 2, 3, 4, 5]
    assert [r["score"] for r in got] == [1.625, 0.75, 0.75, 0.625, 0.625]
    assert got[0]["tags"] == ["x", "y"] and got[0]["tag_scores"] == [0.125, 0.25] and got[0]["decision"] == ""
    assert got[0]["source_tags"] == ["x", "y"] and "x (p=0.125)" in got[0]["reason"]
    # --tag y: only y's evidence, ranked by it: a 0.75 > d 0.625 > b 0.25
    by_y = queue(write_table(tmp_path / "t2", parts, sidecar=sidecar), "likely-wrong", tag="y")
    assert [(r["uri"], r["tags"], r["score"]) for r in by_y] == [
        ("a", ["y"], 0.75),
        ("d", ["y"], 0.625),
        ("b", ["y"], 0.25),
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
    done = run_cli("review", "--tags", table, "--kind", "likely-wrong", "--out", str(tmp_path / "q.jsonl"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("error: ") and "compare-tags" in done.stderr
    assert not (tmp_path / "q.jsonl").exists()


def _p(logit: float) -> float:
    """The probability of a logit as rows store it (float16)."""
    return 1 / (1 + np.exp(-float(np.float16(logit))))


@pytest.fixture(scope="module")
def demo_model(demo_bundle):
    from pipeline.model.bundle import load_bundle

    bundle = load_bundle(demo_bundle)
    return str(demo_bundle), bundle.fingerprint.model_sha256, list(bundle.vocabulary.tags)


def test_uncertain_is_ranked_by_distance_to_the_runs_thresholds(demo_model, tmp_path):
    model, sha, vocab = demo_model
    at = vocab.index
    rating = next(t for t in ("general", "sensitive") if t in vocab)

    def logits(uri, pairs, **values):
        return row(uri, logit_indices=[at(t) for t, _ in pairs], logit_values=[v for _, v in pairs], **values)

    rules = {
        "calibrate": False,
        "default_threshold": 0.5,
        "category_thresholds": {"character": 0.8},
        "exclude": ["blue_theme"],
    }
    parts = [
        [
            logits("a", [("red_theme", 0.2), ("green_theme", -0.1)]),  # margins 0.0498, 0.025
            logits("b", [("monochrome", 0.05), ("stripe_chan_(tagpipe)", 1.5)]),  # 0.0125; 0.8176 vs 0.8
        ],
        [
            logits("c", [("blue_theme", 0.0), (rating, 0.0), ("red_theme", 3.0)]),  # excluded, argmax, far
            logits("d", [("red_theme", -0.1)]),  # a's smallest margin, but one tag in the band, not two
            logits("e", [("red_theme", 0.0)], error="boom", error_kind="decode_error"),
        ],
    ]
    table = write_table(tmp_path / "t", parts, rules=rules, model=sha)
    got = queue(table, "uncertain", model=model)
    assert [r["uri"] for r in got] == ["b", "a", "d"]
    assert [r["score"] for r in got] == pytest.approx(
        [_p(0.05) - 0.5, 0.5 - _p(-0.1), 0.5 - _p(-0.1)], abs=1e-4
    )
    assert got[0]["tags"] == ["monochrome", "stripe_chan_(tagpipe)"] and got[0]["thresholds"] == [0.5, 0.8]
    assert got[0]["tag_scores"] == pytest.approx([_p(0.05), _p(1.5)], abs=1e-4)
    assert "monochrome 0.512 vs 0.500 (in)" in got[0]["reason"]
    assert "green_theme 0.475 vs 0.500 (out)" in got[1]["reason"]
    by_tag = queue(table, "uncertain", model=model, tag="red_theme")
    assert [(r["uri"], r["tags"]) for r in by_tag] == [("d", ["red_theme"]), ("a", ["red_theme"])]
    with pytest.raises(TagpipeError, match="not in the vocabulary.*did you mean red_theme"):
        queue(table, "uncertain", model=model, tag="red_thme")
    with pytest.raises(TagpipeError, match="pass --model DIR"):
        queue(table, "uncertain")  # no run manifest names the bundle
    (tmp_path / "t" / "_runs").mkdir()
    (tmp_path / "t" / "_runs" / "run.json").write_text(json.dumps({"model_dir": model}))
    assert [r["uri"] for r in queue(table, "uncertain")] == ["b", "a", "d"]  # the run's bundle
    other = write_table(tmp_path / "other", parts, rules=rules)
    with pytest.raises(TagpipeError, match="made by model m+, not by"):
        queue(other, "uncertain", model=model)


def test_uncertain_scores_are_calibrated_as_the_run_calibrated_them(demo_model, tmp_path):
    from pipeline.model.bundle import load_bundle

    model, sha, vocab = demo_model
    bundle = load_bundle(model)
    table_cal = bundle.tag_metrics.calibration_table
    threshold = bundle.profile.thresholds.default
    grid = np.linspace(-3, 3, 25)
    rows, expected = [], []
    for i, logit in enumerate(grid):
        tag = i % 8  # general tags
        p = np.float32(1 / (1 + np.exp(-np.float32(np.float16(logit)))))
        b = min(int(p * 100), 99)
        score = table_cal[tag, 98 if b == 99 else b]  # the noisy last bin is read as 98
        rows.append(row(f"r{i:02d}", logit_indices=[tag], logit_values=[logit]))
        if abs(score - threshold) < 0.1:
            expected.append((abs(float(score) - threshold), f"r{i:02d}", float(score)))
    assert len(expected) >= 2
    got = queue(write_table(tmp_path / "t", [rows], model=sha), "uncertain", model=model)
    assert [r["uri"] for r in got] == [uri for _, uri, _ in sorted(expected)]
    assert [r["tag_scores"][0] for r in got] == pytest.approx([s for *_, s in sorted(expected)], abs=1e-4)
    assert [r["thresholds"][0] for r in got] == pytest.approx([threshold] * len(got))


def _cli(*args: str):
    """A command in-process (CliRunner: Ray is imported once, not per command); a
    TagpipeError stays the exception, which `tagpipe` prints as one `error:` line."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture
def reviewed(tmp_path):
    """Four images with human tags, the label check's flags and the model's tags; one error row."""
    uris = [
        image(tmp_path / "images" / f"i{n}.png", colour)
        for n, colour in enumerate(["red", "green", "blue", "black"], start=1)
    ]
    i1, i2, i3, i4 = uris
    rows = [
        row(
            i1,
            source_tags=["cat", "dog", "outdoors"],
            likely_wrong=["dog"],
            likely_wrong_scores=[0.02],
            likely_missing=["sky"],
            likely_missing_scores=[0.95],
            tags=["cat", "sky", "outdoors"],
            scores=[0.9, 0.95, 0.7],
            label_quality=0.5,
            width=40,
            height=30,
        ),
        row(
            i2,
            source_tags=["cat", "hat"],
            likely_wrong=["hat"],
            likely_wrong_scores=[0.05],
            likely_missing=["tree"],
            likely_missing_scores=[0.9],
            tags=["cat"],
            scores=[0.8],
            width=40,
            height=30,
        ),
        row(
            i3,
            source_tags=["cat", "ball"],
            likely_wrong=["ball"],
            likely_wrong_scores=[0.1],
            likely_missing=[],
            likely_missing_scores=[],
            tags=["cat"],
            scores=[0.85],
            width=40,
            height=30,
        ),
        row(i4, tags=["dog"], scores=[0.6], width=40, height=30),  # no human tags
        row(
            str(tmp_path / "images" / "broken.png"),
            error="bad",
            error_kind="decode_error",
            likely_wrong=["x"],
            likely_wrong_scores=[0.0],
        ),
    ]
    return write_table(tmp_path / "tags", [rows[:2], rows[2:]]), uris


def test_queue_file_and_page_one_thumbnail_per_image(reviewed, tmp_path):
    from test_report import CHROMIUM, _chromium, console_errors, needs_chromium

    table, (i1, i2, i3, _) = reviewed
    settings = ReviewSettings(tags=table, kind="likely-wrong", out=str(tmp_path / "q.jsonl"))
    summary = run_review(settings)
    assert (summary.queued, summary.thumbnails) == (3, 3)
    lines = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [(r["rank"], r["uri"], r["tags"], r["decision"]) for r in lines] == [
        (1, i1, ["dog"], ""),
        (2, i2, ["hat"], ""),
        (3, i3, ["ball"], ""),
    ]
    page = tmp_path / "q.html"
    text = page.read_text()
    assert len(re.findall(r"<img src='data:image/jpeg;base64,", text)) == 3
    assert "<script" not in text and not re.search(r"""(src|href)=['"]?(https?:)?//""", text)
    with pytest.raises(TagpipeError, match="q.jsonl exists; nothing was written: pass --overwrite"):
        run_review(settings)
    (tmp_path / "q.jsonl").unlink()
    with pytest.raises(TagpipeError, match="q.html exists"):  # the page is guarded too
        run_review(settings)
    assert not (tmp_path / "q.jsonl").exists()
    run_review(settings.model_copy(update={"overwrite": True, "limit": 2}))
    assert len((tmp_path / "q.jsonl").read_text().splitlines()) == 2
    if needs_chromium.args[0]:  # skipif condition: no Chromium here
        pytest.skip("headless Chromium not installed")
    assert CHROMIUM
    dom = _chromium("--dump-dom", page=page)
    assert console_errors(dom.stderr) == []
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', dom.stdout)) == 2
    shot = tmp_path / "q.png"
    done = _chromium("--window-size=1000,700", f"--screenshot={shot}", page=page)
    assert shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), np.float32)
    assert pixels.std() > 20  # text and thumbnails, not a blank page


def test_decisions_round_trip_into_the_supplement_export(reviewed, tmp_path):
    table, (i1, i2, i3, i4) = reviewed
    wrong_q, missing_q = tmp_path / "wrong.jsonl", tmp_path / "missing.csv"
    for kind, out in (("likely-wrong", wrong_q), ("likely-missing", missing_q)):
        done = _cli("review", "--tags", table, "--kind", kind, "--out", str(out))
        assert done.exit_code == 0, done.output
    # the reviewer: dog on i1 is wrong, hat on i2 is right, ball on i3 left undecided;
    # sky on i1 is not there (a per-tag decision, in CSV as a JSON object), tree on i2 is
    rows = [json.loads(line) for line in wrong_q.read_text().splitlines()]
    assert [r["uri"] for r in rows] == [i1, i2, i3]
    rows[0]["decision"], rows[1]["decision"] = "reject", "accept"
    wrong_q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with missing_q.open(newline="") as handle:
        table_rows = list(csv.DictReader(handle))
    assert [(r["uri"], json.loads(r["tags"])) for r in table_rows] == [(i1, ["sky"]), (i2, ["tree"])]
    table_rows[0]["decision"], table_rows[1]["decision"] = '{"sky": "reject"}', "Accept"
    with missing_q.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(table_rows[0]))
        writer.writeheader()
        writer.writerows(table_rows)

    out = tmp_path / "export"
    done = _cli("export", "--tags", table, "-o", str(out), "-f", "jsonl", "--supplement",
                "--decisions", str(wrong_q), "--decisions", str(missing_q))  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "4 reviewer decisions applied" in done.output and "1 error row skipped" in done.output
    got = {r["uri"]: r for r in map(json.loads, (out / "tags.jsonl").read_text().splitlines())}
    assert (got[i1]["tags"], got[i1]["provenance"]) == (["cat", "outdoors"], ["both", "both"])
    assert got[i1]["reviewed"] == {"dog": "reject", "sky": "reject"}
    assert (got[i2]["tags"], got[i2]["provenance"]) == (["cat", "hat", "tree"], ["both", "source", "model"])
    assert got[i2]["scores"] == [0.8, None, None]
    assert (got[i3]["tags"], got[i3]["provenance"]) == (["cat"], ["both"])  # ball: doubted, undecided
    assert (got[i4]["tags"], got[i4]["provenance"]) == (["dog"], ["model"])  # no human tags

    captions = tmp_path / "captions"
    done = _cli("export", "--tags", table, "-o", str(captions), "--supplement",
                "--decisions", str(wrong_q), "--decisions", str(missing_q))  # fmt: skip
    assert done.exit_code == 0, done.output
    assert (captions / "i2.txt").read_text() == "cat, hat, tree\n"
    assert (captions / "i1.txt").read_text() == "cat, outdoors\n"
    # without decisions: doubted human tags out, the model's tags in
    plain = tmp_path / "plain"
    assert _cli("export", "--tags", table, "-o", str(plain), "-f", "jsonl", "--supplement").exit_code == 0
    got = {r["uri"]: r for r in map(json.loads, (plain / "tags.jsonl").read_text().splitlines())}
    assert (got[i1]["tags"], got[i1]["provenance"]) == (["cat", "sky", "outdoors"], ["both", "model", "both"])
    assert got[i2]["tags"] == ["cat"] and got[i2]["reviewed"] == {}


def test_decisions_that_cannot_be_applied_are_one_line_errors(reviewed, tmp_path):
    table, (i1, *_) = reviewed
    plain_table = write_table(tmp_path / "plain", [[row(i1, tags=["cat"], scores=[0.9])]], labels=False)
    queue_file = tmp_path / "q.jsonl"

    def refused(*args, decision=None) -> str:
        if decision is not None:
            rows = [
                {"rank": 1, "uri": i1, "kind": "likely-wrong", "tags": ["dog"], "decision": d}
                for d in decision
            ]
            queue_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        done = _cli("export", "--tags", table, "-o", str(tmp_path / "out"), "-f", "jsonl", *args)
        assert isinstance(done.exception, TagpipeError) and "\n" not in str(done.exception), done.output
        assert not (tmp_path / "out").exists()
        return str(done.exception)

    assert "add --supplement" in refused("--decisions", str(queue_file), decision=["accept"])
    assert "q.jsonl:1: decision 'maybe'" in refused(
        "--supplement", "--decisions", str(queue_file), decision=["maybe"]
    )
    text = refused("--supplement", "--decisions", str(queue_file), decision=["accept", "reject"])
    assert "'dog' is accepted and rejected (" in text and "q.jsonl:1 and " in text
    text = refused("--supplement", "--decisions", str(queue_file), decision=[{"cat": "accept"}])
    assert "names 'cat', which is not one of the row's tags" in text
    done = _cli("export", "--tags", plain_table, "-o", str(tmp_path / "out"), "--supplement")
    assert isinstance(done.exception, TagpipeError)
    assert "--source-tags" in str(done.exception) and "compare-tags" in str(done.exception)
    assert "Dart prompts" in refused("--supplement", "-f", "dart")


@pytest.mark.parametrize("sidecar", [True, False], ids=["sidecar", "inside parts"])
def test_parts_from_before_the_table_had_source_tags_queue_nothing(tmp_path, sidecar):
    table = write_table(tmp_path / "t", [[wrong("a", ["x"], [0.25])]], sidecar=sidecar)
    old = pa.Table.from_pylist(
        [{k: v for k, v in row("b").items() if k in schema(False).names}], schema(False)
    )
    snapshot = TagTable(table).snapshot()
    files = [*snapshot.files, TagTable(table).write_part("data/k/part-old.parquet", old)]
    commit_version(
        TagTable(table), snapshot, files, model_sha256="m" * 64, inference_key="i", rules_key="r",
        run_id="run2", model_name="test", labels=snapshot.labels,
    )  # fmt: skip
    assert [r["uri"] for r in queue(table, "likely-wrong")] == ["a"]
