"""Calibration and every threshold mode, against a per-row reference written here from
the rules as documented (plain loops, no shared code with pipeline/model/postprocess.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.model.bundle import load_bundle
from pipeline.model.postprocess import Postprocessor, TagRules, mahalanobis

MODES = {
    "global": dict(),
    "no_calibration": dict(calibrate=False),
    "global_0.3": dict(default_threshold=0.3),
    "per_category": dict(category_thresholds={"general": 0.4, "character": 0.8, "meta": 0.2}),
    "per_tag": dict(per_tag_thresholds=True),
    "mcut": dict(mcut_categories=("general", "character")),
    "cap_3": dict(default_threshold=0.2, max_tags=3),
    "exclude": dict(default_threshold=0.2, exclude=frozenset({"red_theme", "stripes", "unused_tag_001"})),
    "all_at_once": dict(
        default_threshold=0.25,
        per_tag_thresholds=False,
        mcut_categories=("general",),
        max_tags=5,
        exclude=frozenset({"blue_theme"}),
    ),
}


def reference(raw_row, bundle, rules: TagRules):
    """One row, straight from the rules."""
    tags, cats = bundle.vocabulary.tags, bundle.vocabulary.categories
    table = bundle.tag_metrics.calibration_table if rules.calibrate else None
    score, candidates = {}, []
    for t, value in enumerate(raw_row):
        p = 1.0 / (1.0 + math.exp(-float(np.float16(value))))
        if p >= rules.logit_floor or cats[t] in ("rating", "quality"):
            candidates.append(t)
        if table is not None:
            b = min(max(int(np.float32(p) * 100), 0), 99)
            score[t] = float(table[t][98 if b == 99 else b])
        else:
            score[t] = p
    chosen = set()
    for t in candidates:
        if cats[t] in ("rating", "quality") or cats[t] in rules.mcut_categories:
            continue
        threshold = (
            bundle.tag_metrics.best_thr[t]
            if rules.per_tag_thresholds
            else rules.category_thresholds.get(cats[t], rules.default_threshold)
        )
        if score[t] >= threshold:
            chosen.add(t)
    for category in rules.mcut_categories:
        known = [t for t in candidates if cats[t] == category]
        if not known:
            continue
        ordered = sorted([score[t] for t in known], reverse=True) + [0.0]
        gaps = [ordered[k] - ordered[k + 1] for k in range(len(ordered) - 1)]
        k = gaps.index(max(gaps))
        cut = max((ordered[k] + ordered[k + 1]) / 2, rules.logit_floor)
        chosen |= {t for t in known if score[t] > cut}
    chosen = {t for t in chosen if tags[t] not in rules.exclude}
    if rules.max_tags is not None:
        chosen = set(sorted(chosen, key=lambda t: (-score[t], t))[: rules.max_tags])
    for category in ("rating", "quality"):
        group = [t for t in candidates if cats[t] == category]
        chosen.add(max(group, key=lambda t: (score[t], -t)))
    return {tags[t] for t in chosen}, {tags[t]: score[t] for t in chosen}


@pytest.fixture(scope="module")
def raw_outputs(demo_bundle, demo_corpus):
    from pipeline.image.decode import DecodeStage
    from pipeline.model.runtime import ProviderChoice
    from pipeline.model.tagger import TaggerSettings, TaggerStage

    stage = TaggerStage(TaggerSettings(str(demo_bundle), provider=ProviderChoice.CPU))
    uris = sorted(str(p) for p in (demo_corpus / "images").rglob("*.jpg"))[:40]
    pixels = DecodeStage(stage.bundle.profile.preprocess)({"uri": np.array(uris, object)})["pixels"]
    raw, emb, _ = stage.infer(pixels)
    noise = (
        np.random.default_rng(0).normal(-1.0, 2.5, (40, raw.shape[1])).astype(np.float32)
    )  # every score range
    return np.concatenate([raw, noise]), np.concatenate([emb, emb])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_threshold_modes_match_the_reference(mode, demo_bundle, raw_outputs):
    bundle = load_bundle(demo_bundle)
    rules = TagRules.from_bundle(bundle, **MODES[mode])
    post = Postprocessor(
        bundle.vocabulary, bundle.profile.activation, rules, bundle.ood_reference, bundle.tag_metrics
    )
    raw, emb = raw_outputs
    out = post(raw, emb)
    emitted = 0
    for i in range(len(raw)):
        want, want_scores = reference(raw[i], bundle, rules)
        assert set(out["tags"][i]) == want, (mode, i)
        np.testing.assert_allclose(out["scores"][i], [want_scores[t] for t in out["tags"][i]], rtol=1e-6)
        assert list(out["scores"][i]) == sorted(out["scores"][i], reverse=True)
        emitted += len(want)
    assert emitted > 2 * len(raw)  # more than the rating and quality winners


def test_calibration_changes_scores_and_reads_bin_98_for_99(demo_bundle):
    bundle = load_bundle(demo_bundle)
    table = bundle.tag_metrics.calibration_table
    post = Postprocessor(
        bundle.vocabulary,
        bundle.profile.activation,
        TagRules.from_bundle(bundle, default_threshold=0.0),
        None,
        bundle.tag_metrics,
    )
    t = bundle.vocabulary.tags.index("red_theme")
    raw = np.full((3, len(bundle.vocabulary)), -9.0, np.float32)
    raw[0, t], raw[1, t], raw[2, t] = 8.0, 0.0, -1.0  # p ~ 0.9997 (bin 99), 0.5 (bin 50), 0.27 (bin 26)
    out = post(raw, None)
    scores = {i: dict(zip(out["tags"][i], out["scores"][i])) for i in range(3)}
    assert scores[0]["red_theme"] == pytest.approx(table[t, 98]) and table[t, 98] != pytest.approx(
        table[t, 99]
    )
    assert scores[1]["red_theme"] == pytest.approx(table[t, 50])
    assert scores[2]["red_theme"] == pytest.approx(table[t, 26])


def test_identity_without_a_calibration_table(tmp_path):
    from tests.helpers import joytag_bundle

    bundle = load_bundle(joytag_bundle(tmp_path / "joy"))
    post = Postprocessor(
        bundle.vocabulary, bundle.profile.activation, TagRules.from_bundle(bundle), None, bundle.tag_metrics
    )
    raw = np.array([[2.0, -3.0, 0.5, -8, -8, -8, -8, -8, -8, -8]], np.float32)
    out = post(raw, None)
    p = 1 / (1 + np.exp(-np.float16(raw[0, :3]).astype(np.float64)))
    assert out["tags"][0] == ["joy_0", "joy_2"] and np.allclose(out["scores"][0], [p[0], p[2]], rtol=1e-6)


def test_ood_distance_is_mahalanobis_and_flags_above_p95(demo_bundle, raw_outputs):
    bundle = load_bundle(demo_bundle)
    ref = bundle.ood_reference
    post = Postprocessor(
        bundle.vocabulary, bundle.profile.activation, TagRules.from_bundle(bundle), ref, bundle.tag_metrics
    )
    raw, emb = raw_outputs
    out = post(raw, emb)
    direct = [float(np.sqrt((e - ref.mu) @ ref.cov_inv @ (e - ref.mu))) for e in emb.astype(np.float64)]
    np.testing.assert_allclose(out["ood_distance"], direct, rtol=1e-5)
    np.testing.assert_allclose(mahalanobis(emb, ref), direct, rtol=1e-9)
    assert out["ood"] == [d > ref.p95 for d in out["ood_distance"]]


def _dense_candidates(raw, activation, rules, categories):
    """The definition, over every tag: probability of the float16 stored logit >= floor,
    or a rating/quality tag."""
    from pipeline.model.postprocess import stored_logits, stored_to_probabilities

    with np.errstate(over="ignore"):
        p = stored_to_probabilities(stored_logits(raw, activation), activation)
    return (p >= rules.logit_floor) | np.isin(categories, ("rating", "quality"))


def test_sigmoid_screen_keeps_exactly_the_tags_at_the_floor(demo_bundle):
    """The float32 screen must not lose an output that only reaches the floor once
    rounded to float16: rows of float32 values packed around the boundary."""
    bundle = load_bundle(demo_bundle)
    rules = TagRules.from_bundle(bundle)
    post = Postprocessor(bundle.vocabulary, bundle.profile.activation, rules, None, bundle.tag_metrics)
    width = len(bundle.vocabulary)
    boundary = math.log(rules.logit_floor / (1 - rules.logit_floor))  # ~ -4.595
    steps = np.float32(boundary) + np.linspace(-0.01, 0.01, 6 * width).astype(
        np.float32
    )  # many float32 per float16 step
    raw = steps.reshape(6, width)
    want = _dense_candidates(raw, bundle.profile.activation, rules, np.asarray(bundle.vocabulary.categories))
    out = post(raw, None)
    for i in range(len(raw)):
        assert out["logit_indices"][i].tolist() == np.flatnonzero(want[i]).tolist(), i
        np.testing.assert_array_equal(out["logit_values"][i], raw[i, want[i]].astype(np.float16))
    assert 0 < want.sum() < want.size  # the rows straddle the floor


@pytest.mark.parametrize("activation", ["softmax", "sigmoid_probabilities", "softmax_probabilities"])
def test_other_activations_store_the_floor_candidates(demo_bundle, raw_outputs, activation):
    from pipeline.model.profiles import Activation

    bundle = load_bundle(demo_bundle)
    rules = TagRules.from_bundle(bundle)
    kind = Activation(activation)
    raw = raw_outputs[0]
    if kind is Activation.SIGMOID_PROBABILITIES:
        raw = (1 / (1 + np.exp(-raw.astype(np.float64)))).astype(np.float32)
    if kind is Activation.SOFTMAX_PROBABILITIES:
        shifted = np.exp(raw.astype(np.float64) - raw.max(axis=1, keepdims=True))
        raw = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    post = Postprocessor(bundle.vocabulary, kind, rules, None, bundle.tag_metrics)
    want = _dense_candidates(raw, kind, rules, np.asarray(bundle.vocabulary.categories))
    out = post(raw, None)
    assert [x.tolist() for x in out["logit_indices"]] == [np.flatnonzero(w).tolist() for w in want]
    assert all(len(t) >= 2 for t in out["tags"])  # rating and quality winners at least


def test_dense_logits_store_every_tag_and_choose_the_same_tags(demo_bundle, raw_outputs):
    bundle = load_bundle(demo_bundle)
    raw, emb = raw_outputs
    sparse = Postprocessor(
        bundle.vocabulary,
        bundle.profile.activation,
        TagRules.from_bundle(bundle),
        bundle.ood_reference,
        bundle.tag_metrics,
    )(raw, emb)
    dense = Postprocessor(
        bundle.vocabulary,
        bundle.profile.activation,
        TagRules.from_bundle(bundle, dense_logits=True),
        bundle.ood_reference,
        bundle.tag_metrics,
    )(raw, emb)
    assert dense["tags"] == sparse["tags"] and dense["rating"] == sparse["rating"]
    width = len(bundle.vocabulary)
    assert all(x.tolist() == list(range(width)) for x in dense["logit_indices"])
    np.testing.assert_array_equal(np.stack(dense["logit_values"]), raw.astype(np.float16))


@pytest.mark.parametrize("shape", [(3, 5), (7, 1001), (1, 8), (4, 16)])
def test_sparse_nonzero_equals_numpy(shape):
    from pipeline.model.postprocess import sparse_nonzero

    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.01, 0.5, 1.0):
        mask = rng.random(shape) < density
        rows, cols = sparse_nonzero(mask)
        want_rows, want_cols = np.nonzero(mask)
        assert rows.tolist() == want_rows.tolist() and cols.tolist() == want_cols.tolist()
