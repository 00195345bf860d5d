"""cleanlab as the oracle of the label check (pipeline/corpus/label_quality.py): both read
the same planted-noise sets, the same probabilities (decoded from the stored float16
logits, as the check reads them) and the same source tags, over the judged tags only.

The check sums its thresholds part by part so it scales past memory; cleanlab holds a
dense [N, K] matrix. They agree exactly where the check does what cleanlab does (per-tag
thresholds, `filter_by="confident_learning"`, the label quality score), and within the
differences docs/decisions.md states ('Source tags against the model') where it does not
(cleanlab's default filter, `prune_by_noise_rate`). Two sets: a synthetic model over 30
tags of unequal prevalence and skill, and the demo model's real outputs
(tests/corpus/test_label_quality.py's planted-noise set)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
from cleanlab import count as cleanlab_count
from cleanlab.multilabel_classification import filter as cleanlab_filter
from cleanlab.multilabel_classification import rank as cleanlab_rank

from pipeline.corpus.label_quality import (
    LabelRules,
    TagStatistics,
    index_source_tags,
    judged_mask,
    label_table,
    part_statistics,
)
from pipeline.corpus.label_settings import LabelCheckSettings
from pipeline.demo.label_noise import PlantedNoise, plant_noise
from pipeline.model.bundle import Vocabulary
from pipeline.model.postprocess import Postprocessor
from pipeline.model.profiles import Activation
from pipeline.model.rules import TagRules

PARTS = 3  # the check runs part by part; cleanlab sees the whole set at once


@dataclass(frozen=True)
class NoisySet:
    post: Postprocessor
    part: pa.Table  # uri, error, logit_indices, logit_values (every tag stored)
    noise: PlantedNoise


@dataclass(frozen=True)
class Compared:
    """The check's answer and cleanlab's inputs for one set."""

    uris: list[str]
    tag_names: list[str]  # the judged tags, cleanlab's classes in order
    labels: list[list[int]]  # per row, its source tags as judged-tag numbers
    pred_probs: np.ndarray  # [N, judged]
    rules: LabelRules
    rows: list[dict]  # the label columns, per row
    floor: float
    planted: frozenset[tuple[str, str]]  # the (uri, tag) pairs the noise removed or added

    def flagged(self) -> set[tuple[str, str]]:
        return {(r["uri"], t) for r in self.rows for t in r["likely_missing"] + r["likely_wrong"]}

    def as_pairs(self, mask: np.ndarray) -> set[tuple[str, str]]:
        return {(self.uris[i], self.tag_names[j]) for i, j in zip(*np.nonzero(mask))}


def synthetic_set(rows: int = 800, tags: int = 30, seed: int = 5) -> NoisySet:
    """A model whose logit is skill * (+1 | -1) plus noise, per tag a prevalence of 3-35%
    (the first tag 95%: its t0 falls below 0.5, so the prediction filter decides some likely
    wrong flags) and a skill of 1.5-3.5; two rating tags (never judged) beside them. Every
    tag stored, as for a vocabulary of <= 4,096 tags."""
    rng = np.random.default_rng(seed)
    names = tuple(f"tag_{k:02d}" for k in range(tags)) + ("general", "sensitive")
    prevalence = rng.uniform(0.03, 0.35, tags)
    prevalence[0] = 0.95
    truth = rng.random((rows, tags)) < prevalence
    logits = rng.uniform(1.5, 3.5, tags) * (2 * truth - 1) + rng.normal(0, 1.3, (rows, tags)) - 0.5
    logits = np.concatenate([logits, rng.normal(0, 1, (rows, 2))], axis=1).astype(np.float16)
    uris = [f"img{i:04d}" for i in range(rows)]
    true_tags = {uri: [names[k] for k in np.flatnonzero(truth[i])] for i, uri in enumerate(uris)}
    post = Postprocessor(
        Vocabulary(names, ("general",) * tags + ("rating", "rating")),
        Activation.SIGMOID,
        TagRules(default_threshold=0.5),
    )
    part = pa.table(
        {
            "uri": uris,
            "error": pa.nulls(rows, pa.string()),
            "logit_indices": pa.array([list(range(len(names)))] * rows, pa.list_(pa.int32())),
            "logit_values": pa.array(list(logits), pa.list_(pa.float16())),
        }
    )
    return NoisySet(post, part, plant_noise(true_tags, list(names[:tags]), seed=1))


def demo_set(bundle_dir) -> NoisySet:
    from pipeline.demo.model import vocabulary
    from tests.corpus.test_label_quality import _demo_rows

    _, post, part, truth = _demo_rows(bundle_dir)
    meaningful = [t for t, c in zip(*vocabulary()) if c not in ("rating", "quality") and "unused" not in t]
    return NoisySet(post, part, plant_noise(truth, meaningful, seed=3))


def compare(noisy: NoisySet) -> Compared:
    """The data rule run as the Ray check runs it (statistics summed over parts, then each
    part labelled), and cleanlab's inputs from the same stored values."""
    post, noise = noisy.post, noisy.noise
    source = pa.table({"uri": list(noise.source), "source_tags": list(noise.source.values())})
    judged = judged_mask(post, ())
    indexed, _ = index_source_tags(source, post, judged)
    bounds = np.linspace(0, noisy.part.num_rows, PARTS + 1).astype(int)
    parts = [noisy.part.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    statistics = sum(
        (part_statistics(p, indexed, post, judged) for p in parts), TagStatistics.empty(len(judged))
    )
    settings = LabelCheckSettings.model_validate({"label_rule": "data"})
    rules = LabelRules.resolve(post, settings, statistics)
    rows = [row for p in parts for row in label_table(p, indexed, post, rules)[0].to_pylist()]

    cols = np.flatnonzero(judged)
    logits = np.stack(noisy.part.column("logit_values").to_numpy(zero_copy_only=False))
    pred_probs = post.probabilities_of(logits[:, cols]).astype(np.float64)
    number = {post.tags[c]: j for j, c in enumerate(cols)}
    uris = noisy.part.column("uri").to_pylist()
    labels = [sorted(number[t] for t in noise.source[uri] if t in number) for uri in uris]
    names = [str(post.tags[c]) for c in cols]
    return Compared(
        uris, names, labels, pred_probs, rules, rows, post.rules.logit_floor, noise.removed | noise.added
    )


@pytest.fixture(scope="module", params=["synthetic", "demo model"])
def compared(request) -> Compared:
    noisy = (
        synthetic_set() if request.param == "synthetic" else demo_set(request.getfixturevalue("demo_bundle"))
    )
    return compare(noisy)


def per_class_issues(c: Compared, **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab warns of classes with too few examples
        return cleanlab_filter.find_multilabel_issues_per_class(c.labels, c.pred_probs, n_jobs=1, **kwargs)


def test_per_tag_thresholds_are_cleanlabs(compared):
    """get_confident_thresholds, one-vs-rest: [t0, t1] per class, from sums added up per part."""
    thresholds = cleanlab_count.get_confident_thresholds(
        compared.labels, compared.pred_probs, multi_label=True
    )
    judged = compared.rules.judged
    assert compared.rules.lower[judged] == pytest.approx(thresholds[:, 0], abs=1e-9)
    assert compared.rules.upper[judged] == pytest.approx(thresholds[:, 1], abs=1e-9)


def test_flags_are_cleanlabs_confident_learning_filter(compared):
    """The same (image, tag) pairs as cleanlab's filter_by="confident_learning", the confident
    joint's off-diagonal less the issues the prediction agrees with: equal, pair for pair."""
    theirs = compared.as_pairs(per_class_issues(compared, filter_by="confident_learning"))
    assert len(theirs) >= 10
    assert compared.flagged() == theirs


def given_to_at_most_one(c: Compared, pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The pairs whose one-vs-rest class (the images given the tag, or those not given it)
    holds at most one image: cleanlab's prune filters leave such a class alone
    (min_examples_per_class=1); the check judges it like any other."""
    given = {
        name: {uri for uri, labels in zip(c.uris, c.labels) if j in labels}
        for j, name in enumerate(c.tag_names)
    }
    alone = set()
    for uri, tag in pairs:
        side = given[tag] if uri in given[tag] else set(c.uris) - given[tag]
        if len(side) <= 1:
            alone.add((uri, tag))
    return alone


def test_cleanlabs_default_filter_flags_more_and_keeps_every_flag_of_ours(compared):
    """The default filter (prune_by_noise_rate) prunes per class as many as the calibrated
    confident joint counts, by margin: on these sets every flag of the check but those of a
    class of one image, and more besides, fewer of them planted (docs/decisions.md says why
    the check does not use it)."""
    ours = compared.flagged()
    theirs = compared.as_pairs(per_class_issues(compared))
    assert ours - theirs == given_to_at_most_one(compared, ours)
    assert len(ours) >= 0.6 * len(theirs)
    planted = compared.planted
    assert len(ours & planted) / len(ours) >= len(theirs & planted) / len(theirs)


def test_flagged_images_lie_within_cleanlabs_default_row_issues(compared):
    """cleanlab's multi-label find_label_issues (its default filter): an image with an
    issue in any class."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = cleanlab_filter.find_label_issues(compared.labels, compared.pred_probs, n_jobs=1)
    theirs = {uri for uri, issue in zip(compared.uris, mask) if issue}
    ours = compared.flagged()
    assert {uri for uri, _ in ours} - theirs <= {uri for uri, _ in given_to_at_most_one(compared, ours)}
    assert len({uri for uri, _ in ours}) >= 0.6 * len(theirs)


def test_label_quality_is_cleanlabs_multilabel_score(compared):
    """get_label_quality_scores with its defaults (self-confidence, EMA alpha 0.8). The check
    counts a tag nobody gave whose p is below the logit floor as 1, not 1 - p: at most
    `floor` higher by construction, and in practice far less, as the highest scores weigh
    least."""
    theirs = cleanlab_rank.get_label_quality_scores(compared.labels, compared.pred_probs)
    ours = np.array([row["label_quality"] for row in compared.rows], np.float64)
    assert np.all(ours - theirs >= -1e-6) and np.all(ours - theirs <= compared.floor)
    assert ours == pytest.approx(theirs, abs=1e-5)
