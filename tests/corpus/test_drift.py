"""Drift between versions of a tag table (issue 25, part 4): planted shifts are named
(a changed threshold, a new sub-corpus, an OOD or error-rate rise), random splits of
the same rows are not (false-alarm control), `tagpipe report` shows it, and `tagpipe
nightly` exits 3 on drift past its limits and 0 otherwise."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.errors import TagpipeError
from pipeline.corpus.drift import (
    ALL_ERRORS,
    DriftSettings,
    RateCounts,
    compare_counts,
    two_proportion_p_values,
    version_drift,
)
from pipeline.corpus.report import build_report
from pipeline.table.tag_table import TagTable, commit_version, read_current
from pipeline.table.version_fields import RulesRecord
from tests.corpus.test_report import _chromium, console_errors, needs_chromium

TAG_RATES = np.geomspace(0.002, 0.6, 150)  # a long tail of rare tags, a few common ones
VOCAB = [f"tag_{i:03d}" for i in range(len(TAG_RATES))]
KINDS = ["read_error", "decode_error", "truncated"]


def _rows(n: int, seed: int, rates=TAG_RATES, ood_rate=0.05, error_rate=0.02, extra=()) -> pa.Table:
    """n tag rows drawn independently: each tag with its rate, OOD flags, error rows
    (no tags, no OOD flag); `extra` tags on every decoded row (a sub-corpus of one kind)."""
    rng = np.random.default_rng(seed)
    error = rng.random(n) < error_rate
    hits = (rng.random((n, len(rates))) < rates) & ~error[:, None]
    names = np.array(VOCAB + list(extra), dtype=object)
    if extra:
        hits = np.concatenate([hits, np.repeat(~error[:, None], len(extra), axis=1)], axis=1)
    row, column = np.nonzero(hits)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=n))]).astype(np.int32)
    tags = pa.ListArray.from_arrays(offsets, pa.array(names[column].tolist(), pa.string()))
    ood = rng.random(n) < ood_rate
    return pa.table(
        {
            "uri": pa.array([f"s3://corpus/{seed}/{i:06d}.jpg" for i in range(n)]),
            "tags": pc_where_null(tags, error),
            "ood": pa.array(np.where(error, None, ood).tolist(), pa.bool_()),
            "error": pa.array(np.where(error, "OSError: planted", None).tolist(), pa.string()),
            "error_kind": pa.array(np.where(error, rng.choice(KINDS, n), None).tolist(), pa.string()),
        }
    )


def pc_where_null(values: pa.Array, mask: np.ndarray) -> pa.Array:
    import pyarrow.compute as pc

    return pc.if_else(pa.array(mask), pa.scalar(None, values.type), values)


def _commit(table: TagTable, files: list[str], parts: dict[str, pa.Table]) -> int:
    """A version naming `files`; those in `parts` are written first (others exist)."""
    for file, part in parts.items():
        table.write_part(file, part)
    snapshot = commit_version(
        table,
        table.current(),
        files,
        model_sha256="0" * 64,
        inference_key="k",
        rules_key="r",
        run_id=f"run{len(table.versions()) + 1}",
        model_name="synthetic",
        rules=RulesRecord(default_threshold=0.5),
    )
    return snapshot.version


def _split(table: pa.Table, pieces: int) -> list[pa.Table]:
    size = -(-table.num_rows // pieces)
    return [table.slice(i * size, size) for i in range(pieces)]


# ---- the test itself -------------------------------------------------------------
def test_the_z_test_is_pearsons_chi_square_without_correction():
    from scipy.stats import chi2_contingency

    cases = [(30, 200, 55, 210), (0, 50, 4, 60), (990, 1000, 970, 1000), (5, 10_000_000, 9, 9_000_000)]
    ours = two_proportion_p_values([c[0] for c in cases], 0, [0], 0)  # an empty side: nothing to test
    assert list(ours) == [1.0] * 4
    for k1, n1, k2, n2 in cases:
        expected = chi2_contingency([[k1, n1 - k1], [k2, n2 - k2]], correction=False).pvalue
        assert two_proportion_p_values([k1], n1, [k2], n2)[0] == pytest.approx(expected, rel=1e-9)
    assert two_proportion_p_values([0, 7], 7, [0, 9], 9).tolist() == [1.0, 1.0]  # no room to differ


def _counts(tags: np.ndarray, n: int) -> RateCounts:
    return RateCounts(rows=n, decoded=n, tags=Counter({VOCAB[i]: int(k) for i, k in enumerate(tags) if k}))


def test_false_alarms_on_same_distribution_stay_within_the_significance():
    """400 seeded pairs of samples from one distribution, 150 tags each, no minimum
    change: the share of pairs with any tag flagged is at most the significance (BH over
    the family; per-tag tests alone would flag nearly every pair)."""
    rng = np.random.default_rng(7)
    settings = DriftSettings(significance=0.05, min_rate_change=0)
    n, trials = 2000, 400
    alarms = 0
    for _ in range(trials):
        before, after = rng.binomial(n, TAG_RATES), rng.binomial(n, TAG_RATES)
        alarms += compare_counts(_counts(before, n), _counts(after, n), settings).tag_movers > 0
    assert alarms / trials <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / trials), alarms


def test_a_tiny_move_of_a_huge_table_is_significant_but_not_a_mover():
    n = 10_000_000
    before = RateCounts(rows=n, decoded=n, tags=Counter({"sky": 1_000_000}))
    after = RateCounts(rows=n, decoded=n, tags=Counter({"sky": 1_010_000}))  # +0.1 points
    default = compare_counts(before, after, DriftSettings())
    assert default.tag_movers == 0 and default.largest_change.adjusted_p < 1e-10 and not default.drift
    loose = compare_counts(before, after, DriftSettings(min_rate_change=0))
    assert loose.tag_movers == 1 and loose.drift and loose.movers[0].name == "sky"


# ---- versions of a table -----------------------------------------------------------
def test_random_splits_of_the_same_rows_are_not_drift(tmp_path):
    """The null case at the default settings: one population shuffled and cut in two,
    each half a version (seeded)."""
    rows = _rows(40_000, seed=1)
    rows = rows.take(np.random.default_rng(2).permutation(rows.num_rows))
    first, second = _split(rows, 2)
    table = TagTable(str(tmp_path / "tags"))
    _commit(
        table,
        ["data/a/p0.parquet", "data/a/p1.parquet"],
        dict(zip(["data/a/p0.parquet", "data/a/p1.parquet"], _split(first, 2))),
    )
    _commit(
        table,
        ["data/b/p0.parquet", "data/b/p1.parquet"],
        dict(zip(["data/b/p0.parquet", "data/b/p1.parquet"], _split(second, 2))),
    )
    drift = version_drift(str(tmp_path / "tags"))
    assert drift.compared and (drift.before_version, drift.after_version) == (1, 2)
    assert drift.tags_compared == len(VOCAB) and drift.rows_before + drift.rows_after == 40_000
    assert drift.tag_movers == 0 and not drift.ood.moved and not any(e.moved for e in drift.errors)
    assert not drift.drift and drift.reasons == () and drift.parts_read == 4
    assert "no drift past the limits" in drift.text()


def test_a_new_sub_corpus_names_its_tags_and_shared_parts_are_read_once(tmp_path):
    base = _rows(20_000, seed=3)
    files = [f"data/a/p{i}.parquet" for i in range(4)]
    table = TagTable(str(tmp_path / "tags"))
    _commit(table, files, dict(zip(files, _split(base, 4))))
    batch = _rows(3_000, seed=4, rates=TAG_RATES * 0, extra=("noise", "explicit", "worst_quality"))
    _commit(table, [*files, "data/b/new.parquet"], {"data/b/new.parquet": batch})
    drift = version_drift(str(tmp_path / "tags"))
    top = [m.name for m in drift.movers[:3]]
    assert sorted(top) == ["explicit", "noise", "worst_quality"], drift.text()
    noise = drift.movers[0]
    decoded = drift.decoded_after
    assert noise.before == 0 and noise.after == pytest.approx(noise.count_after / decoded)
    assert noise.count_after == sum(e is None for e in batch.column("error_kind").to_pylist())
    assert drift.drift and "tags moved" in drift.reasons[0]
    # the four parts both versions name were read once, for both
    assert drift.parts_shared == 4 and drift.parts_read == 5
    # the common tags are diluted by the new rows: they fall, and a big one falls beyond noise
    common = {m.name: m for m in drift.movers}
    assert VOCAB[-1] in common and common[VOCAB[-1]].change < -0.05


def test_ood_and_error_rate_rises_are_drift(tmp_path):
    table = TagTable(str(tmp_path / "tags"))
    _commit(table, ["data/a/p.parquet"], {"data/a/p.parquet": _rows(10_000, seed=5)})
    worse = _rows(10_000, seed=6, ood_rate=0.12, error_rate=0.06)
    _commit(table, ["data/b/p.parquet"], {"data/b/p.parquet": worse})
    drift = version_drift(str(tmp_path / "tags"))
    assert drift.tag_movers == 0 or all(abs(m.change) < 0.03 for m in drift.movers)
    assert drift.ood.moved and drift.ood.change == pytest.approx(0.07, abs=0.015)
    errors = {e.name: e for e in drift.errors}
    assert errors[ALL_ERRORS].moved and errors[ALL_ERRORS].change == pytest.approx(0.04, abs=0.01)
    assert set(errors) == {ALL_ERRORS, *KINDS} and all(errors[k].change > 0 for k in KINDS)
    assert any(r.startswith("OOD rate") for r in drift.reasons)
    assert any(r.startswith("all errors rate") for r in drift.reasons)
    # a table that got better is not drift by its error rate, only by what else moved
    back = version_drift(str(tmp_path / "tags"), before=2, after=1)
    assert not any(r.startswith(("all errors", *KINDS)) for r in back.reasons)
    relaxed = DriftSettings(max_ood_rate_change=0.2, max_error_rate_change=0.2, max_tag_movers=1000)
    assert not version_drift(str(tmp_path / "tags"), settings=relaxed).drift


# ---- the report --------------------------------------------------------------------
@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """Three versions: a base, the same (re-drawn), and a noise sub-corpus added."""
    root = tmp_path_factory.mktemp("shifted") / "tags"
    table = TagTable(str(root))
    _commit(table, ["data/a/p.parquet"], {"data/a/p.parquet": _rows(6_000, seed=8)})
    _commit(table, ["data/b/p.parquet"], {"data/b/p.parquet": _rows(6_000, seed=9)})
    batch = _rows(1_500, seed=10, rates=TAG_RATES * 0, extra=("noise", "explicit"))
    _commit(table, ["data/b/p.parquet", "data/c/new.parquet"], {"data/c/new.parquet": batch})
    return root


def test_report_compares_with_the_previous_version_or_the_one_given(shifted, tmp_path):
    page = tmp_path / "r.html"
    summary = build_report(str(shifted), str(page))
    drift = summary.drift
    assert (drift.before_version, drift.after_version) == (2, 3) and drift.drift
    text = page.read_text()
    section = text[text.index("id='drift'") : text.index("id='tags'")]
    assert "<b>Drift</b> past the limits" in section and "version 2" in section
    assert re.search(r"<td>noise</td><td>0\.00% \(0 of [0-9,]+\)</td><td>[12][0-9]\.[0-9]{2}%", section)
    assert "drift: version 2" in summary.text() and "DRIFT:" in summary.text()

    result = CliRunner().invoke(
        app,
        ["report", "--tags", str(shifted), "-o", str(page), "--compare-version", "1", "--log-format", "json"],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["drift"]["before_version"] == 1 and record["drift"]["after_version"] == 3
    assert {"noise", "explicit"} <= {m["name"] for m in record["drift"]["movers"]}

    # versions 1 and 2 are drawn from one distribution: nothing moved
    result = CliRunner().invoke(
        app, ["report", "--tags", str(shifted), "-o", str(page), "--compare-version", "2"]
    )
    assert result.exit_code == 0 and "DRIFT" in result.output
    same = build_report(str(shifted), str(page), version=2)
    assert same.drift.tag_movers == 0 and not same.drift.drift
    assert "No drift past the limits" in page.read_text() and "No tag moved" in page.read_text()

    # settings from the command line
    result = CliRunner().invoke(
        app, ["report", "--tags", str(shifted), "-o", str(page), "--drift-max-tag-movers", "1000"]
    )
    assert result.exit_code == 0 and "no drift past the limits" in result.output, result.output
    bad = CliRunner().invoke(
        app, ["report", "--tags", str(shifted), "-o", str(page), "--compare-version", "9"]
    )
    assert isinstance(bad.exception, TagpipeError) and "no version 9" in str(bad.exception)


def test_one_version_or_plain_parquet_has_nothing_to_compare(tmp_path):
    import pyarrow.parquet as pq

    table = TagTable(str(tmp_path / "tags"))
    _commit(table, ["data/a/p.parquet"], {"data/a/p.parquet": _rows(500, seed=11)})
    summary = build_report(str(tmp_path / "tags"), str(tmp_path / "r.html"))
    assert not summary.drift.compared and "first version" in summary.drift.note
    assert (
        "Nothing to compare with: version 1 is the table&#x27;s first version"
        in (tmp_path / "r.html").read_text()
    )
    (tmp_path / "plain").mkdir()
    pq.write_table(_rows(100, seed=12), tmp_path / "plain" / "x.parquet")
    summary = build_report(str(tmp_path / "plain"), str(tmp_path / "p.html"))
    assert not summary.drift.compared and "not a versioned tag table" in summary.text()
    result = CliRunner().invoke(
        app,
        [
            "report",
            "--tags",
            str(tmp_path / "plain"),
            "-o",
            str(tmp_path / "p.html"),
            "--compare-version",
            "1",
        ],
    )
    assert isinstance(result.exception, TagpipeError) and "not a tag table" in str(result.exception)


@needs_chromium
def test_the_drift_section_renders_in_headless_chromium(shifted, tmp_path):
    import numpy as np
    from PIL import Image

    page = tmp_path / "report.html"
    build_report(str(shifted), str(page))
    dom = _chromium("--dump-dom", page=page)
    assert console_errors(dom.stderr) == []
    section = dom.stdout[dom.stdout.index('id="drift"') : dom.stdout.index('id="tags"')]
    assert "Drift" in section and '<a href="#drift">Drift</a>' in dom.stdout
    assert re.search(
        r"<text [^>]*>noise</text><rect [^>]*></rect><text [^>]*>\+[0-9]+\.[0-9]{2}</text>", section
    )
    assert re.search(r'<rect [^>]*class="down"', section)  # the diluted common tags fall
    screenshot = tmp_path / "drift.png"
    shot = _chromium("--window-size=1280,1400", f"--screenshot={screenshot}", page=page)
    assert screenshot.exists() and console_errors(shot.stderr) == []
    pixels = np.asarray(Image.open(screenshot).convert("RGB"), np.int16)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 100) & (pixels[..., 2] < 110)  # falling bars
    assert red.sum() > 200


# ---- nightly and a real threshold change (the demo model, real Ray) -----------------
def _nightly_config(tmp_path: Path, corpus: Path, bundle: Path, drift: str = "") -> Path:
    tag = {"inputs": [str(corpus)], "output": str(tmp_path / "tags"), "model": str(bundle)}
    lines = ["[tag]", *(f"{k} = {json.dumps(v)}" for k, v in tag.items()), "rows_per_part = 16"]
    # hashes only: the demo's flat-colour images are unchecked (exit 4); this file tests drift's 3
    lines += ["[nightly]", 'ratios = "train=0.6,val=0.2,test=0.2"', 'embedding_threshold = "off"']
    lines += ["fail_on_unchecked = false"]
    path = tmp_path / "nightly.toml"
    path.write_text("\n".join(lines) + "\n" + drift)
    return path


@pytest.fixture(scope="module")
def nightly_runs(ray_session, demo_bundle, tmp_path_factory):
    """Four nightly runs over one corpus, through the command: the first version; no
    change; a batch of 60 noise images added (a new sub-corpus); one image changed."""
    from PIL import Image

    from pipeline.demo.synthetic import KINDS, make_corpus, render

    root = tmp_path_factory.mktemp("nightly")
    make_corpus(root / "corpus", images_per_kind=2)
    corpus = root / "corpus" / "images"
    config = _nightly_config(root, corpus, demo_bundle)
    runs = [CliRunner().invoke(app, ["nightly", "-c", str(config), "--no-progress"]) for _ in range(2)]
    (corpus / "scraped").mkdir()
    for i in range(60):
        render(KINDS["noise"], 320, 320, seed=500 + i).save(corpus / "scraped" / f"noise_{i:03d}.png")
    runs.append(CliRunner().invoke(app, ["nightly", "-c", str(config), "--no-progress"]))
    Image.open(corpus / "green" / "green_000.jpg").save(corpus / "green" / "green_000.jpg", quality=80)
    runs.append(CliRunner().invoke(app, ["nightly", "-c", str(config), "--no-progress"]))
    records = [json.loads(p.read_text()) for p in sorted((root / "tags" / "_runs").glob("*.nightly.json"))]
    return root, runs, sorted(records, key=lambda r: r["finished_at"])


def test_nightly_exits_3_on_drift_and_0_without(nightly_runs):
    root, runs, records = nightly_runs
    assert [r.exit_code for r in runs] == [0, 0, 3, 0], [r.output[-800:] for r in runs]
    assert [r["version"] for r in records] == [1, 1, 2, 3]
    first, unchanged, grown, touched = records
    assert not first["drift"]["compared"] and "first version" in first["drift"]["note"]
    assert not unchanged["drift"]["compared"] and "committed no new version" in unchanged["drift"]["note"]
    assert grown["drift"]["drift"] and (
        grown["drift"]["before_version"],
        grown["drift"]["after_version"],
    ) == (1, 2)
    movers = [m["name"] for m in grown["drift"]["movers"]]
    assert {"noise", "explicit", "worst_quality"} <= set(movers[:4]), movers
    assert all(m["change"] > 0 for m in grown["drift"]["movers"] if m["name"] in ("noise", "explicit"))
    assert touched["drift"]["compared"] and not touched["drift"]["drift"]
    assert touched["drift"]["tag_movers"] == 0
    assert "DRIFT: " in runs[2].output and "noise" in runs[2].output and "; DRIFT;" in runs[2].output
    # the page beside the run's record, with its drift section
    page = Path(grown["report"])
    assert page.parent == root / "tags" / "_runs" and page.name.endswith(".report.html")
    text = page.read_text()
    assert "id='drift'" in text and "<b>Drift</b> past the limits" in text and "id='splits'" in text


def test_nightly_drift_limits_come_from_the_config(nightly_runs, demo_bundle, tmp_path):
    from pipeline.job.settings import load_nightly_config

    root, _, _ = nightly_runs
    loose = "[nightly.drift]\nmax_tag_movers = 1000\nmax_ood_rate_change = 1\nmax_error_rate_change = 1\n"
    cfg = load_nightly_config(_nightly_config(tmp_path, root / "corpus" / "images", demo_bundle, loose))
    assert cfg.drift.max_tag_movers == 1000 and cfg.drift.significance == 0.001 and cfg.fail_on_drift
    bad = _nightly_config(tmp_path, root, demo_bundle, "[nightly.drift]\nsignificance = 2\nmax_movers = 1\n")
    with pytest.raises(Exception, match=r"unknown field\(s\) in \[nightly.drift\]: max_movers"):
        load_nightly_config(bad)
    bad.write_text(bad.read_text().replace("max_movers = 1\n", ""))
    with pytest.raises(Exception, match=r"field nightly.drift.significance has a bad value: 2"):
        load_nightly_config(bad)


def test_a_threshold_change_names_the_tags_that_moved(nightly_runs, demo_bundle, tmp_path):
    """rethreshold at 0.99 (from the profile's default): the tags the demo model scores
    below it vanish; drift names those whose rate fell beyond noise, and no other. The
    table holds 121 rows, so the significance is loosened to 0.01 to see tags of 10 rows."""
    from pipeline.job.rethreshold import run_rethreshold
    from pipeline.model.rules import RuleSettings

    root, _, _ = nightly_runs
    tags = tmp_path / "tags"
    shutil.copytree(root / "tags", tags)  # a table is portable: its copy reads the same
    run_rethreshold(str(tags), str(demo_bundle), None, RuleSettings(threshold=0.99), None, None)
    drift = version_drift(str(tags), settings=DriftSettings(significance=0.01))
    before = read_current(str(tags), columns=["tags", "error_kind"], version=3).to_pylist()
    after = read_current(str(tags), columns=["tags", "error_kind"], version=4).to_pylist()
    count = [Counter(t for r in rows if not r["error_kind"] for t in r["tags"]) for rows in (before, after)]
    fell = {t: (count[0][t] - count[1][t]) / len(before) for t in count[0] if count[1][t] < count[0][t]}
    movers = {m.name: m for m in drift.movers}
    assert movers and set(movers) <= set(fell), (fell, drift.text())  # nothing unchanged is named
    assert all(m.change < 0 and m.count_after == count[1][m.name] for m in movers.values())
    assert {t for t, share in fell.items() if share > 0.06} <= set(movers), (fell, drift.text())
    assert len(movers) >= 5 and drift.drift
