"""Rethreshold from stored sparse logits equals a full re-run with the same rules."""

from __future__ import annotations

import shutil

import pytest

from pipeline.core.errors import TagpipeError
from pipeline.job.rethreshold import run_rethreshold
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.model.rules import RuleSettings
from pipeline.table.tag_table import TagTable, read_current

RULES = dict(
    threshold=0.3,
    mcut_categories=["character"],
    exclude=["stripes"],
    max_tags=4,
    category_thresholds={"meta": 0.15},
)
TAG_COLUMNS = [
    "tags",
    "tags_general",
    "tags_character",
    "scores",
    "rating",
    "quality",
    "ood",
    "ood_distance",
    "error",
]


def _by_uri(path, columns):
    table = read_current(str(path), columns=["uri", *columns])
    return {row["uri"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def base_output(ray_session, demo_bundle, demo_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tags"
    run_tag_job(
        make_tag_config(
            inputs=[str(demo_corpus / "images")], output=str(out), model=str(demo_bundle), rows_per_part=16
        )
    )
    return out


def test_rethreshold_equals_a_full_rerun(ray_session, demo_bundle, demo_corpus, base_output, tmp_path):
    cfg = make_tag_config(
        inputs=[str(demo_corpus / "images")],
        output=str(tmp_path / "rerun"),
        model=str(demo_bundle),
        rows_per_part=16,
        **RULES,
    )
    run_tag_job(cfg)
    summary = run_rethreshold(str(base_output), str(demo_bundle), str(tmp_path / "re"), cfg.rules)
    base_files = TagTable(str(base_output)).current().files
    assert summary.parts == len(base_files) and summary.rows_changed > 0 and summary.version == 1
    rerun, rethresholded, base = (
        _by_uri(p, TAG_COLUMNS) for p in (tmp_path / "rerun", tmp_path / "re", base_output)
    )
    assert rerun.keys() == rethresholded.keys()
    for uri, row in rerun.items():
        assert rethresholded[uri] == row, uri  # tags, scores, winners, ood: identical
    assert any(rethresholded[u]["tags"] != base[u]["tags"] for u in base)  # the rules did change things
    assert len(TagTable(str(tmp_path / "re")).current().files) == len(base_files)

    again = run_rethreshold(str(base_output), str(demo_bundle), str(tmp_path / "re"), cfg.rules)
    assert again.parts_skipped == again.parts and again.version == 1  # all done already: no new version


def test_rethreshold_in_place_commits_a_new_version(base_output, demo_bundle, tmp_path):
    table = tmp_path / "tags"
    shutil.copytree(base_output, table)
    summary = run_rethreshold(str(table), str(demo_bundle), None, RuleSettings(threshold=0.9))
    assert summary.version == 2 and summary.rows_changed > 0
    before, after = _by_uri(table, ["tags"]), read_current(str(table), version=1)
    assert {r["uri"]: r for r in after.select(["uri", "tags"]).to_pylist()} == _by_uri(base_output, ["tags"])
    assert any(before[u]["tags"] != r["tags"] for u, r in _by_uri(base_output, ["tags"]).items())
    same = run_rethreshold(str(table), str(demo_bundle), None, RuleSettings(threshold=0.9))
    assert same.unchanged and same.version == 2 and TagTable(str(table)).current().version == 2
    assert "nothing committed" in same.text()  # the same rules again: no version 3


def test_rethreshold_refuses_another_models_tags(base_output, demo_bundle, tmp_path):
    from tests.helpers import joytag_bundle

    with pytest.raises(TagpipeError, match="made by model"):
        run_rethreshold(
            str(base_output), str(joytag_bundle(tmp_path / "joy")), str(tmp_path / "out"), RuleSettings()
        )


def test_worker_bundle_cache_follows_replaced_calibration_files(demo_bundle, tmp_path):
    """Rewrite tasks cache the bundle per worker; a new OOD reference under the same
    name (same rules, same model) must not be served from the cache."""
    import numpy as np

    from pipeline.job.rethreshold import _postprocessor
    from pipeline.model.bundle import load_bundle

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle_dir)
    first = load_bundle(bundle_dir).fingerprint
    old, _ = _postprocessor(str(bundle_dir), "{}", (first.model_sha256, first.calibration_sha256))
    reference = dict(np.load(bundle_dir / "model_ood_ref.npz"))
    reference["mu"] = reference["mu"] + 1.0
    np.savez(bundle_dir / "model_ood_ref.npz", **reference)
    second = load_bundle(bundle_dir).fingerprint
    new, _ = _postprocessor(str(bundle_dir), "{}", (second.model_sha256, second.calibration_sha256))
    assert (
        old.fingerprint.calibration_sha256
        == first.calibration_sha256
        != second.calibration_sha256
        == new.fingerprint.calibration_sha256
    )


def test_a_logit_floor_change_on_dense_logits_re_infers_nothing(
    base_output, demo_bundle, demo_corpus, tmp_path
):
    """Dense logits hold every tag's logit whatever the floor: a new floor is a rethreshold
    (no image sent to the model), and the dry run names it, old -> new, with its cost."""
    table = tmp_path / "tags"
    shutil.copytree(base_output, table)
    settings = dict(inputs=[str(demo_corpus / "images")], output=str(table), model=str(demo_bundle))
    parts = len(TagTable(str(table)).current().files)
    plan = run_tag_job(make_tag_config(**settings, rows_per_part=16, logit_floor=0.2), dry_run=True)
    assert plan.change == "rules changed" and plan.to_tag == 0 and plan.reinferred == 0, plan.text()
    assert "logit_floor 0.01 -> 0.2" in plan.text() and f"rewrite {parts} part(s)" in plan.text()
    before = _by_uri(table, ["logit_values", "tags", "scores"])
    done = run_tag_job(make_tag_config(**settings, rows_per_part=16, logit_floor=0.2))
    assert (done.images, done.rows_by_node, done.rethresholded) == (0, {}, done.listed), done.text()
    after = _by_uri(table, ["logit_values", "tags", "scores"])
    assert all(after[u]["logit_values"] == before[u]["logit_values"] for u in before)  # not re-inferred
    assert all(min(r["scores"] or [1.0]) >= 0.2 for r in after.values())  # tags decided at the new floor
    back = run_tag_job(make_tag_config(**settings, rows_per_part=16), dry_run=True)  # the logits still serve
    assert back.change == "rules changed" and back.to_tag == 0 and "logit_floor 0.2 -> 0.01" in back.text()
    other = run_tag_job(make_tag_config(**settings, rows_per_part=16, exact_decode=True), dry_run=True)
    assert other.change == "inference settings changed" and other.to_tag == other.listed
    assert "exact_decode False -> True" in other.text(), other.text()
