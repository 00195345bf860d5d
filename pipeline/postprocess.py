"""Model outputs -> tags, scores, sparse logits, OOD distance (vectorised per batch).

Runs inside the tagger actor so the 100k-wide outputs never cross the object store:
only the emitted tags and the logits above a probability floor leave it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.bundle import ModelBundle, OodReference, Vocabulary
from pipeline.profiles import Activation

ARGMAX_CATEGORIES = ("rating", "quality")  # one winner each, no threshold


@dataclass(frozen=True)
class TagRules:
    default_threshold: float
    category_thresholds: dict[str, float] = field(default_factory=dict)
    logit_floor: float = 0.01  # keep sparse logits of tags with probability >= this
    dense_logits: bool = False

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, **overrides) -> "TagRules":
        thresholds = bundle.profile.thresholds
        base = dict(default_threshold=thresholds.default, category_thresholds=dict(thresholds.by_category))
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def probabilities(raw: np.ndarray, activation: Activation) -> np.ndarray:
    raw = raw.astype(np.float32, copy=False)
    if activation is Activation.SIGMOID:
        return 1.0 / (1.0 + np.exp(-raw))
    if activation is Activation.SOFTMAX:
        shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    return np.clip(raw, 0.0, 1.0)


def as_logits(raw: np.ndarray, activation: Activation) -> np.ndarray:
    """What we store: logits; a model that outputs probabilities has them inverted."""
    if activation is Activation.NONE:
        p = np.clip(raw.astype(np.float64), 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p)).astype(np.float32)
    return raw.astype(np.float32, copy=False)


def mahalanobis(embeddings: np.ndarray, reference: OodReference) -> np.ndarray:
    centred = embeddings.astype(np.float64) - reference.mu
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", centred, reference.cov_inv.astype(np.float64), centred), 0.0))


class Postprocessor:
    """Turns a batch of raw model outputs into per-row tag columns."""

    def __init__(self, vocabulary: Vocabulary, activation: Activation, rules: TagRules, ood: OodReference | None = None):
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
        argmax = np.isin(categories, ARGMAX_CATEGORIES)
        thresholds[argmax] = np.inf  # never by threshold
        self.thresholds = thresholds
        self.argmax_groups = {c: np.flatnonzero(categories == c) for c in ARGMAX_CATEGORIES if (categories == c).any()}

    def __call__(self, raw: np.ndarray, embeddings: np.ndarray | None) -> dict[str, list]:
        probs = probabilities(raw, self.activation)
        logits = as_logits(raw, self.activation)
        chosen = probs >= self.thresholds
        winners = {}
        for category, idx in self.argmax_groups.items():
            best = idx[np.argmax(probs[:, idx], axis=1)]
            chosen[np.arange(len(probs)), best] = True
            winners[category] = self.tags[best]
        keep = probs >= self.rules.logit_floor
        rows: dict[str, list] = {k: [] for k in ("tags", "scores", "logit_indices", "logit_values")}
        for name in self.category_names:
            rows[f"tags_{name}"] = []
        for i in range(len(probs)):
            idx = np.flatnonzero(chosen[i])
            idx = idx[np.argsort(-probs[i, idx], kind="stable")]
            rows["tags"].append(self.tags[idx].tolist())
            rows["scores"].append(probs[i, idx].astype(np.float32))
            cats = self.category_of[idx]
            for c, name in enumerate(self.category_names):
                rows[f"tags_{name}"].append(self.tags[idx[cats == c]].tolist())
            kept = np.arange(logits.shape[1]) if self.rules.dense_logits else np.flatnonzero(keep[i])
            rows["logit_indices"].append(kept.astype(np.int32))
            rows["logit_values"].append(logits[i, kept].astype(np.float16))
        for category in ARGMAX_CATEGORIES:
            rows[category] = list(winners[category]) if category in winners else [None] * len(probs)
        if embeddings is not None and self.ood is not None:
            rows["ood_distance"] = mahalanobis(embeddings, self.ood).astype(np.float32).tolist()
        else:
            rows["ood_distance"] = [None] * len(probs)
        return rows
