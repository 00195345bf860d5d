"""Model outputs -> tags, scores, sparse logits, OOD distance (vectorised per batch).

Runs inside the tagger actor so the 100k-wide outputs never cross the object store:
only the emitted tags and the logits above a probability floor leave it.

Tags are a pure function of what is stored. Logits are rounded to float16 (as stored)
before anything is decided, and only tags whose probability reaches the floor (plus
the rating/quality groups, always kept) are candidates. So `tagpipe rethreshold`,
which sees only the stored sparse logits, reproduces a re-run's tags exactly for any
threshold at or above the floor (tests/test_rethreshold.py).

Selection, per row:
  p = sigmoid(logit)             (softmax models store log-probabilities: p = exp)
  score = calibration_table[tag, clip(int(p*100), 0, 99)], bin 99 read as bin 98
          (the last bin is noisy; public CL ports do the same), or p without a table
  threshold = per-tag best_thr | category threshold | global default; or, for MCut
          categories, the midpoint of the largest gap between sorted candidate scores
  rating, quality: the argmax of their group; then the exclude list, then the cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.bundle import ModelBundle, OodReference, TagMetrics, Vocabulary
from pipeline.errors import ConfigError
from pipeline.profiles import Activation

ARGMAX_CATEGORIES = ("rating", "quality")  # one winner each, no threshold
NOISY_BIN, REPLACEMENT_BIN = 99, 98


@dataclass(frozen=True)
class TagRules:
    default_threshold: float
    category_thresholds: dict[str, float] = field(default_factory=dict)
    per_tag_thresholds: bool = False  # the bundle's best_thr (maximises F1 per tag; over-tags)
    mcut_categories: tuple[str, ...] = ()  # categories thresholded by MCut instead
    max_tags: int | None = None  # cap on threshold-selected tags per image (by score)
    exclude: frozenset[str] = frozenset()  # never emitted
    calibrate: bool = True  # apply the bundle's calibration table when it has one
    logit_floor: float = 0.01  # keep sparse logits of tags with probability >= this
    dense_logits: bool = False
    ood_cut: float | None = None  # ood flag above this distance; None: the reference's p95

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, **overrides) -> "TagRules":
        thresholds = bundle.profile.thresholds
        base = dict(default_threshold=thresholds.default, category_thresholds=dict(thresholds.by_category))
        given = {k: v for k, v in overrides.items() if v is not None}
        base["category_thresholds"] = {**base["category_thresholds"], **given.pop("category_thresholds", {})}
        base.update(given)
        return cls(**base)


def stored_logits(raw: np.ndarray, activation: Activation) -> np.ndarray:
    """What a row stores per tag, as float16: logits (sigmoid models; probability
    outputs are inverted) or log-probabilities (softmax models)."""
    raw = raw.astype(np.float64)
    if activation is Activation.NONE:
        p = np.clip(raw, 1e-7, 1 - 1e-7)
        raw = np.log(p / (1 - p))
    elif activation is Activation.SOFTMAX:
        shifted = raw - raw.max(axis=1, keepdims=True)
        raw = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return raw.astype(np.float16)


def stored_to_probabilities(stored: np.ndarray, activation: Activation) -> np.ndarray:
    x = stored.astype(np.float32)
    if activation is Activation.SOFTMAX:
        return np.exp(x)
    return 1.0 / (1.0 + np.exp(-x))


def probabilities(raw: np.ndarray, activation: Activation) -> np.ndarray:
    """Probabilities of raw model outputs, through the float16 the rows store."""
    return stored_to_probabilities(stored_logits(raw, activation), activation)


def calibrate(p: np.ndarray, table: np.ndarray) -> np.ndarray:
    """CL-style calibration: table[tag, clip(int(p*100), 0, 99)], with the noisy last bin replaced."""
    bins = np.clip((p * 100).astype(np.int64), 0, 99)
    bins[bins == NOISY_BIN] = REPLACEMENT_BIN
    return table[np.arange(p.shape[1])[None, :], bins].astype(np.float32)


def mcut(scores: np.ndarray) -> float:
    """MCut (as the wd-tagger demo): the midpoint of the largest gap in sorted scores.
    A 0 is appended, so the gap below the last candidate counts (scores below the
    floor are not stored, so they cannot take part)."""
    s = np.sort(np.append(scores, 0.0))[::-1]
    if len(s) < 2:
        return 1.0
    gaps = s[:-1] - s[1:]
    t = int(np.argmax(gaps))
    return float((s[t] + s[t + 1]) / 2)


def mahalanobis(embeddings: np.ndarray, reference: OodReference) -> np.ndarray:
    centred = embeddings.astype(np.float64) - reference.mu
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", centred, reference.cov_inv.astype(np.float64), centred), 0.0))


class Postprocessor:
    """Turns a batch of raw model outputs (or stored logits) into per-row tag columns."""

    def __init__(self, vocabulary: Vocabulary, activation: Activation, rules: TagRules, ood: OodReference | None = None, metrics: TagMetrics | None = None):
        self.vocabulary = vocabulary
        self.activation = activation
        self.rules = rules
        self.ood = ood
        self.tags = np.asarray(vocabulary.tags, dtype=object)
        categories = np.asarray(vocabulary.categories)
        self.category_names = vocabulary.category_names()
        self.category_of = np.searchsorted(self.category_names, categories)  # [T] index into category_names
        thresholds = np.full(len(vocabulary), rules.default_threshold, np.float32)
        for name, value in rules.category_thresholds.items():
            thresholds[categories == name] = value
        if rules.per_tag_thresholds:
            if metrics is None or metrics.best_thr is None:
                raise ConfigError("field per_tag_thresholds: the bundle has no per-tag thresholds (best_thr in its tag metrics)")
            thresholds = np.asarray(metrics.best_thr, np.float32).copy()
        self.table = None
        if rules.calibrate and metrics is not None and metrics.calibration_table is not None:
            self.table = np.asarray(metrics.calibration_table, np.float32)
        argmax = np.isin(categories, ARGMAX_CATEGORIES)
        thresholds[argmax] = np.inf  # never by threshold
        self.mcut_groups = [np.flatnonzero(categories == c) for c in rules.mcut_categories if (categories == c).any()]
        for idx in self.mcut_groups:
            thresholds[idx] = np.inf  # chosen by MCut per row
        self.thresholds = thresholds
        self.always_kept = argmax
        self.excluded = np.isin(self.tags, list(rules.exclude)) if rules.exclude else np.zeros(len(self.tags), bool)
        self.argmax_groups = {c: np.flatnonzero(categories == c) for c in ARGMAX_CATEGORIES if (categories == c).any()}
        self.ood_cut = rules.ood_cut if rules.ood_cut is not None else (ood.p95 if ood is not None else None)

    @classmethod
    def for_bundle(cls, bundle: ModelBundle, **rules) -> "Postprocessor":
        """The bundle's vocabulary, activation, tag metrics and OOD reference, with the
        profile's thresholds overridden by rules (TagRules fields; None: not given)."""
        return cls(bundle.vocabulary, bundle.profile.activation, TagRules.from_bundle(bundle, **rules), bundle.ood_reference, bundle.tag_metrics)

    def __call__(self, raw: np.ndarray, embeddings: np.ndarray | None) -> dict[str, list]:
        return self.from_stored(stored_logits(raw, self.activation), embeddings)

    def from_stored(self, stored: np.ndarray, embeddings: np.ndarray | None, known: np.ndarray | None = None) -> dict[str, list]:
        """stored: float16 [N, T] as rows keep them; known: which of them a row stored
        (None: all, as in the tagger). Candidates are the known tags at or above the
        floor, plus the argmax groups."""
        probs = stored_to_probabilities(stored, self.activation)
        candidates = (probs >= self.rules.logit_floor) | self.always_kept
        if known is not None:
            candidates &= known
        scores = self.calibrated(probs)
        chosen = candidates & (scores >= self.thresholds)
        for i in range(len(probs)):
            for idx in self.mcut_groups:
                known = idx[candidates[i, idx]]
                if len(known):
                    cut = max(mcut(scores[i, known]), self.rules.logit_floor)
                    chosen[i, known[scores[i, known] > cut]] = True
        chosen &= ~self.excluded
        if self.rules.max_tags is not None:
            for i in np.flatnonzero(chosen.sum(axis=1) > self.rules.max_tags):
                idx = np.flatnonzero(chosen[i])
                drop = idx[np.argsort(-scores[i, idx], kind="stable")[self.rules.max_tags :]]
                chosen[i, drop] = False
        winners = {}
        for category, idx in self.argmax_groups.items():
            masked = np.where(candidates[:, idx], scores[:, idx], -np.inf)
            best = idx[np.argmax(masked, axis=1)]
            chosen[np.arange(len(probs)), best] = True
            winners[category] = self.tags[best]
        rows: dict[str, list] = {k: [] for k in ("tags", "scores", "logit_indices", "logit_values")}
        for name in self.category_names:
            rows[f"tags_{name}"] = []
        for i in range(len(probs)):
            idx = np.flatnonzero(chosen[i])
            idx = idx[np.argsort(-scores[i, idx], kind="stable")]
            rows["tags"].append(self.tags[idx].tolist())
            rows["scores"].append(scores[i, idx].astype(np.float32))
            cats = self.category_of[idx]
            for c, name in enumerate(self.category_names):
                rows[f"tags_{name}"].append(self.tags[idx[cats == c]].tolist())
            kept = np.arange(stored.shape[1]) if self.rules.dense_logits else np.flatnonzero(candidates[i])
            rows["logit_indices"].append(kept.astype(np.int32))
            rows["logit_values"].append(stored[i, kept].astype(np.float16))
        for category in ARGMAX_CATEGORIES:
            rows[category] = list(winners[category]) if category in winners else [None] * len(probs)
        if embeddings is not None and self.ood is not None:
            distances = mahalanobis(embeddings, self.ood).astype(np.float32)
            rows["ood_distance"] = distances.tolist()
            rows["ood"] = (distances > self.ood_cut).tolist()
        else:
            rows["ood_distance"] = [None] * len(probs)
            rows["ood"] = [None] * len(probs)
        return rows

    def calibrated(self, probs: np.ndarray) -> np.ndarray:
        return calibrate(probs, self.table) if self.table is not None else probs.astype(np.float32)
