"""Source (human) tags compared with the model: the rules worked by hand, the reader's
formats and errors, planted noise found on the demo model's real outputs, and the Ray
check over a real table, committed by `compare-tags` (its label sidecar, beside the parts:
tests/corpus/test_label_sidecar.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import ConfigError, TagpipeError
from pipeline.core.schemas import LABEL_COLUMNS, LABEL_FIELDS, LABELS_SCHEMA
from pipeline.corpus.label_quality import (
    LabelRules,
    TagStatistics,
    ema_scores,
    index_source_tags,
    judged_mask,
    label_table,
    part_statistics,
)
from pipeline.corpus.label_settings import LabelCheckSettings
from pipeline.corpus.source_tags import read_aliases, read_source_tags
from pipeline.job.plan import Change
from pipeline.model.bundle import TagMetrics, Vocabulary
from pipeline.model.postprocess import Postprocessor
from pipeline.model.profiles import Activation
from pipeline.model.rules import TagRules

TAGS = ("cat", "dog", "long_hair", "alice_(wonderland)", "general", "explicit")
CATEGORIES = ("general", "general", "general", "character", "rating", "rating")


def _post(table: np.ndarray | None = None) -> Postprocessor:
    metrics = TagMetrics(None, None, table) if table is not None else None
    return Postprocessor(
        Vocabulary(TAGS, CATEGORIES), Activation.SIGMOID, TagRules(default_threshold=0.5), metrics=metrics
    )


def _part(rows: dict[str, dict[str, float] | None]) -> pa.Table:
    """A part's columns the check reads; None: an error row. Probabilities as float16 logits."""
    index = {t: i for i, t in enumerate(TAGS)}
    indices, values = [], []
    for probabilities in rows.values():
        items = sorted((index[t], p) for t, p in (probabilities or {}).items())
        indices.append([i for i, _ in items] if probabilities is not None else None)
        values.append([np.log(p / (1 - p)) for _, p in items] if probabilities is not None else None)
    return pa.table(
        {
            "uri": list(rows),
            "error": [None if r is not None else "truncated" for r in rows.values()],
            "logit_indices": pa.array(indices, pa.list_(pa.int32())),
            "logit_values": pa.array(values, pa.list_(pa.float16())),
        }
    )


def _check(post, rows, source, **settings):
    settings = LabelCheckSettings.model_validate(settings)
    judged = judged_mask(post, settings.label_categories)
    indexed, counts = index_source_tags(pa.table(source), post, judged)
    part = _part(rows)
    rules = LabelRules.resolve(post, settings, part_statistics(part, indexed, post, judged))
    table, part_counts = label_table(part, indexed, post, rules)
    return {r["uri"]: r for r in table.to_pylist()}, rules, counts


# The data rule by hand, tag "cat": given on a (0.9), b (0.7), c (0.2): t1 = 0.6; not given
# on d (0.1), e (absent: 0), f (0.8): t0 = mean(0.9, 1.0, 0.2) = 0.7.
# c: lacks (0.8 >= 0.7) and predicted absent -> likely wrong. f: has (0.8 >= 0.6), predicted
# present -> likely missing. a, b: has, given. d: lacks, not given.
# Tag "long_hair": given on d (0.02) only: t1 = 0.02; not given on a, b, c, f (absent) and
# e (0.3): t0 = mean(1, 1, 1, 0.7, 1) = 0.94. d: both confident, the larger is "lacks" ->
# likely wrong. e: has (0.3 >= 0.02), not lacks (0.7 < 0.94): the confident joint calls it
# present, but the model predicts absent (0.3 <= 0.5), so, as in cleanlab, not flagged.
DATA_ROWS = {
    "a": {"cat": 0.9},
    "b": {"cat": 0.7},
    "c": {"cat": 0.2},
    "d": {"cat": 0.1, "long_hair": 0.02},
    "e": {"long_hair": 0.3},
    "f": {"cat": 0.8},
    "broken": None,
}
DATA_SOURCE = {
    "uri": ["a", "b", "c", "d", "e", "f", "broken", "not_in_table"],
    "source_tags": [["cat"], ["cat"], ["cat"], ["long_hair"], [], [], ["cat"], ["dog"]],
}


def test_data_rule_thresholds_and_flags_worked_by_hand():
    post = _post()
    rows, rules, _ = _check(post, DATA_ROWS, DATA_SOURCE, label_rule="data")
    assert rules.rule == "data"
    assert rules.upper[0] == pytest.approx(0.6, abs=2e-3) and rules.lower[0] == pytest.approx(0.7, abs=2e-3)
    assert rules.upper[2] == pytest.approx(0.02, abs=1e-4) and rules.lower[2] == pytest.approx(0.94, abs=1e-3)
    assert rules.upper[1] == 2.0  # no row was given dog: never confidently present
    assert rows["c"]["likely_wrong"] == ["cat"]
    assert rows["c"]["likely_wrong_scores"][0] == pytest.approx(0.2, 1e-3)
    assert rows["f"]["likely_missing"] == ["cat"]
    assert rows["d"]["likely_wrong"] == ["long_hair"] and rows["d"]["likely_missing"] == []
    for uri in "abe":
        assert rows[uri]["likely_missing"] == rows[uri]["likely_wrong"] == [], uri
    # label_quality: cleanlab's EMA (alpha 0.8) of the self-confidences sorted high to low,
    # the tags nobody gave and the model puts below the floor counting as one leading 1
    assert rows["a"]["label_quality"] == pytest.approx(0.8 * 0.9 + 0.2 * 1.0, abs=2e-3)
    assert rows["f"]["label_quality"] == pytest.approx(0.8 * 0.2 + 0.2 * 1.0, abs=2e-3)
    assert rows["e"]["label_quality"] == pytest.approx(0.8 * 0.7 + 0.2 * 1.0, abs=2e-3)
    # d: 1, then 1 - 0.1 (cat, not given), then 0.02 (long_hair, given)
    assert rows["d"]["label_quality"] == pytest.approx(0.8 * 0.02 + 0.2 * (0.8 * 0.9 + 0.2), abs=2e-3)
    assert rows["broken"]["source_tags"] == ["cat"]  # joined, but an error row is not judged
    assert rows["broken"]["likely_missing"] is None and rows["broken"]["label_quality"] is None


def test_data_rule_keeps_only_issues_the_prediction_agrees_with():
    """Tag "dog", mostly present: given on g1 (0.6) and g2 (0.99): t1 = 0.795; not given on
    n1..n3 (0.9): t0 = 0.1. g1 is confidently "lacks" only (0.4 >= 0.1, 0.6 < 0.795), a
    confident-joint issue, but the model predicts dog (0.6 > 0.5): not flagged, as cleanlab
    drops issues where the prediction equals the given label. n1..n3: both confident, the
    larger is "has": likely missing."""
    rows = {
        "g1": {"dog": 0.6},
        "g2": {"dog": 0.99},
        "n1": {"dog": 0.9},
        "n2": {"dog": 0.9},
        "n3": {"dog": 0.9},
    }
    source = {"uri": list(rows), "source_tags": [["dog"], ["dog"], [], [], []]}
    found, rules, _ = _check(_post(), rows, source, label_rule="data")
    assert rules.upper[1] == pytest.approx(0.795, abs=2e-3) and rules.lower[1] == pytest.approx(0.1, abs=2e-3)
    assert found["g1"]["likely_wrong"] == [] and found["g2"]["likely_wrong"] == []
    assert [found[u]["likely_missing"] for u in ("n1", "n2", "n3")] == [["dog"]] * 3


def test_calibrated_rule_uses_the_calibrated_probability_and_category_cutoffs():
    table = np.tile(np.arange(100, dtype=np.float32) / 100, (len(TAGS), 1))
    table[1, :] = 0.99  # dog: calibrated 0.99 whatever the raw probability
    post = _post(table)
    rows = {"x": {"cat": 0.95, "dog": 0.3, "alice_(wonderland)": 0.03}, "y": {"cat": 0.03, "dog": 0.3}}
    source = {"uri": ["x", "y"], "source_tags": [["alice_(wonderland)", "long_hair"], ["cat", "dog"]]}
    found, rules, _ = _check(post, rows, source)
    assert rules.rule == "calibrated"  # auto: the bundle has a calibration table
    assert found["x"]["likely_missing"] == ["dog", "cat"]  # surest first: 0.99, then bin 95
    assert found["x"]["likely_missing_scores"] == pytest.approx([0.99, 0.95])
    # long_hair not stored: probability 0, calibrated table[tag, 0] = 0; alice at 0.03 is
    # above the character cut-off (0.01), so only long_hair is likely wrong
    assert found["x"]["likely_wrong"] == ["long_hair"] and found["x"]["likely_wrong_scores"] == [0.0]
    assert found["y"]["likely_wrong"] == ["cat"]  # general's cut-off is 0.05
    stricter, _, _ = _check(post, rows, source, category_wrong_cutoffs={"character": 0.05})
    assert stricter["x"]["likely_wrong"] == ["long_hair", "alice_(wonderland)"]
    with pytest.raises(ConfigError, match="calibrated needs the bundle's calibration table"):
        _check(_post(), rows, source, label_rule="calibrated")


def test_judged_categories_and_unknown_tags_are_counted():
    post = _post()
    source = {"uri": ["a"], "source_tags": [["cat", "explicit", "nope", "nope_2", "nope"]]}
    _, _, counts = _check(post, {"a": {"cat": 0.9}}, source)
    assert (counts.tags, counts.judged, counts.unknown, counts.unknown_tags) == (5, 1, 3, 2)
    assert counts.unknown_examples[0] == ("nope", 2)
    with pytest.raises(ConfigError, match="rating is a softmax group"):
        judged_mask(post, ("rating",))
    with pytest.raises(ConfigError, match="did you mean general"):
        judged_mask(post, ("genral",))
    only_character = judged_mask(post, ("character",))
    assert only_character.tolist() == [False, False, False, True, False, False]


def test_ema_matches_cleanlabs_worked_examples():
    rows = np.array([0, 0, 0, 1, 1, 1])
    values = np.array([0.9, 0.9, 0.3, 0.4, 0.9, 0.6])
    assert ema_scores(rows, values, 3, 0.8) == pytest.approx([0.42, 0.452, 1.0])
    assert ema_scores(rows, values, 2, 0.5) == pytest.approx([0.6, 0.575])


def test_statistics_add_up_across_parts():
    post = _post()
    judged = judged_mask(post, ())
    indexed, _ = index_source_tags(pa.table(DATA_SOURCE), post, judged)
    whole = part_statistics(_part(DATA_ROWS), indexed, post, judged)
    first = part_statistics(_part(dict(list(DATA_ROWS.items())[:3])), indexed, post, judged)
    rest = part_statistics(_part(dict(list(DATA_ROWS.items())[3:])), indexed, post, judged)
    total = first + rest
    assert total.rows == whole.rows == 6 and np.allclose(total.p_all, whole.p_all)
    assert np.allclose(total.thresholds(), whole.thresholds())
    assert TagStatistics.empty(2).thresholds()[0].tolist() == [2.0, 2.0]


# ---- the reader -----------------------------------------------------------------------


def test_reader_formats_separators_and_aliases(tmp_path):
    booru = tmp_path / "booru.csv"
    booru.write_text("uri,tag_string\nx,long_hair  1girl solo\ny,\nx,solo blue_eyes\n", encoding="utf-8")
    table = read_source_tags(str(booru))
    assert table.to_pylist() == [
        {"uri": "x", "source_tags": ["long_hair", "1girl", "solo", "blue_eyes"]},  # repeated uri: merged
        {"uri": "y", "source_tags": []},
    ]
    assert table.schema.metadata[b"tagpipe.merged_rows"] == b"1"
    captions = tmp_path / "captions.csv"
    captions.write_text('uri,tags\nx,"long hair, 1girl , blue   eyes"\n', encoding="utf-8")
    assert read_source_tags(str(captions)).column("source_tags").to_pylist() == [
        ["long_hair", "1girl", "blue_eyes"]
    ]
    assert read_source_tags(str(captions), separator=" ").column("source_tags").to_pylist() == [
        ["long", "hair,", "1girl", ",", "blue", "eyes"]
    ]
    listed = tmp_path / "listed.parquet"
    pq.write_table(pa.table({"path": ["x", "z"], "labels": [["Long hair", "o_o", "O_O"], None]}), listed)
    table = read_source_tags(str(listed), uri_column="path", tags_column="labels")
    assert table.column("source_tags").to_pylist() == [["Long_hair", "o_o", "O_O"], []]  # case kept
    danbooru = tmp_path / "aliases.csv"
    danbooru.write_text(
        "id,antecedent_name,consequent_name,status\n1,1girl,one_girl,active\n2,solo,alone,deleted\n",
        encoding="utf-8",
    )
    assert read_aliases(str(danbooru)) == {"1girl": "one_girl"}
    aliased = read_source_tags(str(booru), aliases=str(danbooru))
    assert aliased.column("source_tags").to_pylist()[0] == ["long_hair", "one_girl", "solo", "blue_eyes"]
    as_json = tmp_path / "aliases.json"
    as_json.write_text(json.dumps({"long hair": "long_hair_(x)"}), encoding="utf-8")
    assert read_source_tags(str(captions), aliases=str(as_json)).column("source_tags").to_pylist() == [
        ["long_hair_(x)", "1girl", "blue_eyes"]
    ]
    headless = tmp_path / "plain.csv"
    headless.write_text("solo,alone\n", encoding="utf-8")
    assert read_aliases(str(headless)) == {"solo": "alone"}


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        ({"path": ["x"], "tags": ["a"]}, {}, "no column 'uri'"),
        ({"uri": ["x"], "labels": ["a"]}, {}, "no tags column source_tags or tags or tag_string"),
        ({"uri": ["x"], "tags": [3]}, {}, "column 'tags' is int64, expected a list of strings or a string"),
        ({"uri": ["x"], "tags": [[1]]}, {}, "column 'tags' is list<element: int64>"),
        ({"uri": [None, "y"], "tags": ["a", "b"]}, {}, "column 'uri' has 1 empty values"),
        ({"uri": ["", "y"], "tags": ["a", "b"]}, {}, "column 'uri' has 1 empty values"),
        ({"uri": ["x"], "tags": ["a"]}, {"tags_column": "tag"}, "no tags column 'tag'"),
    ],
)
def test_reader_errors_name_the_file_and_the_column(tmp_path, data, kwargs, message):
    path = tmp_path / "source.parquet"
    pq.write_table(pa.table(data), path)
    with pytest.raises(TagpipeError) as raised:
        read_source_tags(str(path), **kwargs)
    text = str(raised.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_reader_refuses_unreadable_files(tmp_path):
    text = tmp_path / "tags.parquet"
    text.write_text("uri,tags\n", encoding="utf-8")
    with pytest.raises(TagpipeError, match="not a readable Parquet file"):
        read_source_tags(str(text))
    with pytest.raises(TagpipeError, match="no such file"):
        read_source_tags(str(tmp_path / "missing.csv"))
    bad = tmp_path / "aliases.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TagpipeError, match="expected a JSON object"):
        read_aliases(str(bad))


# ---- planted noise on the demo model's real outputs (ORT, no Ray) ---------------------


def _demo_rows(bundle_dir, per_kind: int = 6):
    """The demo model run by ONNX Runtime on jittered renders of every kind but noise,
    post-processed as the tagger does: (part columns, each uri's true tags)."""
    import onnxruntime as ort

    from pipeline.demo.model import reference_pixels
    from pipeline.demo.synthetic import KINDS
    from pipeline.model.bundle import load_bundle
    from pipeline.model.rules import RuleSettings

    bundle = load_bundle(bundle_dir)
    post = Postprocessor.for_bundle(bundle, RuleSettings.model_validate({}), dense_logits=True)
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    kinds = [k for k in KINDS.values() if k.recipe != "noise"]  # reference_pixels' order
    pixels = reference_pixels(per_kind * len(kinds), seed=7)
    outputs = [
        session.run(["logits"], {"pixel_values": pixels[i : i + 11]})[0] for i in range(0, len(pixels), 11)
    ]
    columns = post(np.concatenate(outputs), None)
    uris = [f"img{i:03d}" for i in range(len(pixels))]
    part = pa.table(
        {
            "uri": uris,
            "error": pa.nulls(len(uris), pa.string()),
            "logit_indices": pa.array(columns["logit_indices"], pa.list_(pa.int32())),
            "logit_values": pa.array(columns["logit_values"], pa.list_(pa.float16())),
        }
    )
    truth = {uri: sorted(kinds[i % len(kinds)].tags) for i, uri in enumerate(uris)}
    return bundle, post, part, truth


@pytest.fixture(scope="module")
def demo_rows(demo_bundle):
    return _demo_rows(demo_bundle)


# Recall floors under what the demo model gives on this set, deterministic (seeded): data
# missing 10/15, wrong 4/8; calibrated 14/15, 5/8 (docs/benchmarks.md: 1,233 images).
FLOORS = {"data": (0.6, 0.45), "calibrated": (0.85, 0.55)}


@pytest.mark.parametrize("rule", ["data", "calibrated"])
def test_planted_noise_is_found_on_the_demo_models_outputs(demo_rows, rule):
    from pipeline.demo.label_noise import measure, plant_noise
    from pipeline.demo.model import vocabulary

    bundle, post, part, truth = demo_rows
    meaningful = [t for t, c in zip(*vocabulary()) if c not in ("rating", "quality") and "unused" not in t]
    noise = plant_noise(truth, meaningful, seed=3)
    source = pa.table({"uri": list(noise.source), "source_tags": list(noise.source.values())})
    settings = LabelCheckSettings.model_validate({"label_rule": rule})
    judged = judged_mask(post, ())
    indexed, _ = index_source_tags(source, post, judged)
    rules = LabelRules.resolve(post, settings, part_statistics(part, indexed, post, judged))
    labelled, counts = label_table(part, indexed, post, rules)
    found = measure(labelled.to_pylist(), noise)
    assert len(noise.removed) >= 15 and len(noise.added) >= 7
    missing_recall, wrong_recall = FLOORS[rule]
    assert found["likely_missing"].precision >= 0.95 and found["likely_missing"].recall >= missing_recall
    assert found["likely_wrong"].precision >= 0.95 and found["likely_wrong"].recall >= wrong_recall
    assert counts.likely_missing == found["likely_missing"].flagged


# ---- the Ray check over a real table, and readers of labelled parts ------------------


def _source_file(corpus, path):
    """Every image's true tags as a booru CSV, but: one image left out, one tag removed from
    `red_000`, `noise` added to `blue_000`, an unknown tag, and the broken files tagged."""
    from pipeline.demo.synthetic import load_expected

    root = str((corpus / "images").resolve())
    lines = ["uri,tag_string"]
    for rel, entry in sorted(load_expected(corpus).items()):
        if rel.split("/")[0] not in ("red", "green", "blue", "broken"):
            continue
        tags = list(entry.tags) if not entry.broken else ["red_theme"]
        if rel == "green/green_001.png":
            continue
        if rel.startswith("red/red_000."):
            tags.remove("red_theme")
        if rel.startswith("blue/blue_000."):
            tags += ["noise", "made_up_tag"]
        lines.append(f"{root}/{rel},{' '.join(tags)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_compare_tags_commits_a_labelled_version_that_readers_take(tagged, demo_bundle, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.corpus.dedup import run_dedup
    from pipeline.corpus.export import export_tags
    from pipeline.corpus.report import build_report
    from pipeline.job.rethreshold import run_rethreshold
    from pipeline.model.rules import RuleSettings
    from pipeline.table.tag_table import TagTable, read_current

    tagged, corpus = tagged
    table = tmp_path / "tags"
    shutil.copytree(tagged, table)
    root = _source_file(corpus, tmp_path / "source.csv")
    command = [
        "compare-tags",
        "--tags",
        str(table),
        "-m",
        str(demo_bundle),
        "--source-tags",
        str(tmp_path / "source.csv"),
    ]
    result = CliRunner().invoke(app, [*command, "--label-rule", "calibrated", "-q"])
    assert result.exit_code == 0, result.output
    assert "compare-tags (calibrated rule):" in result.output and "made_up_tag (1)" in result.output
    assert (
        "1 likely missing and 1 likely wrong tags on 2 rows" in result.output and "version 2" in result.output
    )
    snapshot = TagTable(str(table)).current()
    assert snapshot.version == 2 and snapshot.counts.label_check.likely_wrong == 1
    # the parts as they were; the columns in the label sidecar, one labels file per part
    assert snapshot.files == TagTable(str(tagged)).current().files
    assert not set(LABEL_COLUMNS) & set(pq.read_schema(table / snapshot.files[0]).names)
    assert sorted(snapshot.labels) == list(snapshot.files)
    assert pq.read_schema(table / snapshot.labels[snapshot.files[0]]).equals(LABELS_SCHEMA)
    assert f"{len(snapshot.files)} of {len(snapshot.files)} label files new" in result.output
    rows = {r["uri"][len(root) + 1 :]: r for r in read_current(str(table)).to_pylist()}
    assert rows["red/red_000.jpg"]["likely_missing"] == ["red_theme"]
    assert rows["blue/blue_000.jpg"]["likely_wrong"] == ["noise"]
    assert rows["blue/blue_000.jpg"]["source_tags"][-1] == "made_up_tag"  # kept, not judged
    assert rows["red/red_000.jpg"]["label_quality"] < 0.5 < rows["red/red_001.png"]["label_quality"]
    assert (
        rows["green/green_001.png"]["source_tags"] is None
        and rows["green/green_001.png"]["label_quality"] is None
    )
    broken = rows["broken/truncated.jpg"]
    assert (
        broken["source_tags"] == ["red_theme"]
        and broken["likely_wrong"] is None
        and broken["label_quality"] is None
    )
    again = CliRunner().invoke(app, [*command, "--label-rule", "calibrated", "-q"])
    assert again.exit_code == 0 and "version 2" in again.output  # done already: no new version
    assert "0 of" in again.output

    # readers of labelled parts: rethreshold keeps the columns; export, report, dedup read them
    summary = run_rethreshold(
        str(table), str(demo_bundle), None, RuleSettings.model_validate({"threshold": 0.9})
    )
    assert summary.version == 3
    relabelled = {r["uri"][len(root) + 1 :]: r for r in read_current(str(table)).to_pylist()}
    assert relabelled["blue/blue_000.jpg"]["likely_wrong"] == ["noise"]
    assert export_tags(str(table), str(tmp_path / "export"), "jsonl").written >= 1
    build_report(str(table), str(tmp_path / "report.html"))
    assert run_dedup(str(table), str(tmp_path / "dedup")).images == len(rows)

    # the data rule over the same table: a new version, labels replaced (not stacked)
    data = CliRunner().invoke(app, [*command, "--label-rule", "data", "-q"])
    assert data.exit_code == 0 and "compare-tags (data rule):" in data.output, data.output
    current = TagTable(str(table)).current()
    assert current.version == 4 and not set(current.labels.values()) & set(snapshot.labels.values())
    assert read_current(str(table)).column_names.count("likely_wrong") == 1


def test_readme_table_says_what_label_fields_declare():
    from tests.corpus.test_contracts import _check as check_readme_table

    check_readme_table("Label-check columns, in the label sidecar", pa.schema(list(LABEL_FIELDS)))
    with pytest.raises(AssertionError):
        check_readme_table(
            "Label-check columns, in the label sidecar", pa.schema([*LABEL_FIELDS, pa.field("x", pa.int8())])
        )


def test_a_tag_run_with_source_tags_commits_the_label_columns(tagged, demo_bundle, tmp_path):
    """`tagpipe tag --source-tags`: the first run's version carries the columns; a rerun
    with the same sources commits nothing; changed sources commit a relabelled version."""
    from pipeline.job.settings import make_tag_config
    from pipeline.job.tag_job import run_tag_job
    from pipeline.table.tag_table import TagTable, read_current

    _, corpus = tagged
    root = _source_file(corpus, tmp_path / "source.csv")
    out = tmp_path / "tags"

    def run():
        cfg = make_tag_config(
            inputs=[str(corpus / "images")],
            output=str(out),
            model=str(demo_bundle),
            rows_per_part=16,
            source_tags=str(tmp_path / "source.csv"),
            labels={"label_rule": "calibrated"},
        )
        return run_tag_job(cfg)

    first = run()
    assert first.version == 1 and first.label_check.likely_missing == 1
    assert "1 likely missing, 1 likely wrong" in first.text()
    rows = {r["uri"][len(root) + 1 :]: r for r in read_current(str(out)).to_pylist()}
    assert rows["red/red_000.jpg"]["likely_missing"] == ["red_theme"]
    assert rows["blue/blue_000.jpg"]["likely_wrong"] == ["noise"]
    assert rows["green/green_001.png"]["source_tags"] is None  # not in the source file
    assert run().version == 1  # same sources, nothing tagged: no new version
    text = (tmp_path / "source.csv").read_text().replace("noise made_up_tag", "made_up_tag")
    (tmp_path / "source.csv").write_text(text)
    third = run()
    assert third.version == 2 and third.images == 0 and third.label_check.likely_wrong == 0
    assert third.change is Change.SOURCE_TAGS_CHANGED and "(source tags changed)" in third.text()
    record = json.loads((out / "_runs" / f"{third.run_id}.json").read_text())
    assert record["summary"]["change"] == "source tags changed"  # the run record keeps the words
    assert TagTable(str(out)).current().counts.label_check.likely_wrong == 0
    # one source row changed, one labels file rewritten (the calibrated rule's cut-offs are
    # fixed); every part as it was (tests/corpus/test_label_sidecar.py checks their bytes)
    assert third.label_check.label_files_written == 1
    v1, v2 = TagTable(str(out)).snapshot(1), TagTable(str(out)).snapshot(2)
    assert v1.files == v2.files and len(set(v2.labels.items()) - set(v1.labels.items())) == 1


def test_an_empty_uri_cell_in_a_csv_is_refused(tmp_path):
    path = tmp_path / "source.csv"
    path.write_text("uri,tags\n,a\ny,b\n", encoding="utf-8")
    with pytest.raises(TagpipeError, match="column 'uri' has 1 empty values"):
        read_source_tags(str(path))


def test_the_uncertain_queue_finds_the_model_past_a_compare_tags_version(tagged, tmp_path):
    """compare-tags writes no run manifest of its own: the review finds the bundle in the
    manifest of the tag run before it."""
    import shutil

    from pipeline.corpus.review import ReviewSettings, rank_queue
    from pipeline.job.label_check import run_compare_tags
    from pipeline.table.tag_table import TagTable

    tagged_table, corpus = tagged
    table = tmp_path / "tags"
    shutil.copytree(tagged_table, table)
    _source_file(corpus, tmp_path / "source.csv")
    model = json.loads(next((table / "_runs").glob("*.json")).read_text())["model_dir"]
    assert run_compare_tags(str(table), model, str(tmp_path / "source.csv")).version == 2
    assert TagTable(str(table)).current().version == 2
    rows, read = rank_queue(
        ReviewSettings.model_validate(
            {"tags": str(table), "kind": "uncertain", "out": str(tmp_path / "q.jsonl")}
        )
    )
    assert read > 0


def test_a_source_file_that_names_almost_no_image_is_refused_and_nothing_is_committed(
    tagged, demo_bundle, tmp_path
):
    """Relative uris against the table's absolute ones: exit 2, one line naming the cause
    with an example uri of each side, before any work; the table stays at its version."""
    import shutil

    from pipeline.table.tag_table import TagTable
    from tests.helpers import run_cli

    tagged, corpus = tagged
    table = tmp_path / "tags"
    shutil.copytree(tagged, table)
    root = _source_file(corpus, tmp_path / "absolute.csv")
    relative = (tmp_path / "absolute.csv").read_text(encoding="utf-8").replace(root + "/", "")
    (tmp_path / "relative.csv").write_text(relative, encoding="utf-8")
    done = run_cli(
        "compare-tags", "--tags", table, "-m", demo_bundle, "--source-tags", tmp_path / "relative.csv"
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "likely relative paths" in lines[0] and "0 of its" in lines[0], lines[0]
    assert "'red/red_000" in lines[0] or "'blue/" in lines[0] or "'green/" in lines[0], lines[0]
    assert f"'{root}/" in lines[0], lines[0]  # the table's side, absolute
    assert TagTable(str(table)).current().version == 1 and not (table / "_labels").exists()
    # a tag run given the same file stops after listing, before any image is tagged
    from pipeline.job.settings import make_tag_config
    from pipeline.job.tag_job import run_tag_job

    cfg = make_tag_config(
        inputs=[str(corpus / "images")], output=str(tmp_path / "new"), model=str(demo_bundle),
        source_tags=str(tmp_path / "relative.csv"),
    )  # fmt: skip
    with pytest.raises(TagpipeError, match="likely relative paths"):
        run_tag_job(cfg)
    assert not (tmp_path / "new" / "_current.json").exists()


def test_a_mismatch_names_the_prefix_and_the_share_is_a_setting():
    from pipeline.corpus.source_match import check_source_match, likely_cause

    table = [f"/data/set/{k}/{i}.jpg" for k in ("a", "b") for i in range(5)]
    moved = [u.replace("/data/set/", "/mnt/old/set/") for u in table]
    cause = likely_cause(moved, table)
    assert "another prefix" in cause and "'/mnt/old/' in place of '/data/'" in cause, cause
    half = pa.array(table[:4] + moved[:6])  # 4 of 10 rows match
    with pytest.raises(TagpipeError, match="only 4 of its 10 rows"):
        check_source_match("src.csv", half, [pa.array(table)], 0.5)
    assert check_source_match("src.csv", half, [pa.array(table)], 0.4) == 4
    assert check_source_match("src.csv", half, [pa.array(table[:5]), pa.array(table[5:])], 0.4) == 4


def test_a_file_that_mixes_separators_is_refused_unless_one_is_given(tmp_path):
    """The issue's file: booru rows and one comma row; auto split everything on commas and
    made `monochrome man camera` one tag."""
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(
        'uri,tags\n/a.jpg,monochrome man camera\n/b.jpg,"long hair, 1girl"\n/c.jpg,solo\n', encoding="utf-8"
    )
    with pytest.raises(TagpipeError, match=r"mixed.csv: column 'tags' mixes separators: row 2 .*row 1"):
        read_source_tags(str(mixed))
    per_row = read_source_tags(str(mixed), separator="per-row").column("source_tags").to_pylist()
    assert per_row == [["monochrome", "man", "camera"], ["long_hair", "1girl"], ["solo"]]
    given = read_source_tags(str(mixed), separator=" ").column("source_tags").to_pylist()
    assert given[0] == ["monochrome", "man", "camera"] and given[1] == ["long", "hair,", "1girl"]
