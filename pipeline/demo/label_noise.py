"""Planted label noise on the synthetic corpus, and how well the label check finds it.

The corpus knows each image's true tags (pipeline/demo/synthetic.py). Source tags are
those with a share of the true (image, tag) pairs removed and wrong pairs added (tags the
image does not have), seeded. The label check should call the removed pairs likely missing
and the added ones likely wrong: precision and recall against what was planted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlantedNoise:
    source: dict[str, list[str]]  # uri -> the noisy source tags
    removed: frozenset[tuple[str, str]]  # (uri, tag) true pairs left out
    added: frozenset[tuple[str, str]]  # (uri, tag) wrong pairs put in


def plant_noise(
    truth: dict[str, list[str]],
    candidates: list[str],
    remove_fraction: float = 0.10,
    add_fraction: float = 0.05,
    seed: int = 0,
) -> PlantedNoise:
    """Remove round(remove_fraction * P) of the P true pairs, and add round(add_fraction * P)
    pairs of a candidate tag the image lacks, all drawn uniformly without repeats."""
    rng = np.random.default_rng(seed)
    uris = sorted(truth)
    pairs = [(uri, tag) for uri in uris for tag in sorted(truth[uri])]
    removed_index = rng.choice(len(pairs), size=round(remove_fraction * len(pairs)), replace=False)
    removed = frozenset(pairs[i] for i in removed_index)
    added: set[tuple[str, str]] = set()
    wanted = round(add_fraction * len(pairs))
    while len(added) < wanted:
        uri, tag = uris[rng.integers(len(uris))], candidates[rng.integers(len(candidates))]
        if tag not in truth[uri]:
            added.add((uri, tag))
    source = {uri: [t for t in sorted(truth[uri]) if (uri, t) not in removed] for uri in uris}
    for uri, tag in sorted(added):
        source[uri].append(tag)
    return PlantedNoise(source, removed, frozenset(added))


@dataclass(frozen=True)
class Found:
    planted: int
    flagged: int
    right: int  # flagged and planted

    @property
    def precision(self) -> float:
        return self.right / self.flagged if self.flagged else 1.0

    @property
    def recall(self) -> float:
        return self.right / self.planted if self.planted else 1.0

    def text(self) -> str:
        return (
            f"precision {self.precision:.3f} ({self.right}/{self.flagged}), "
            f"recall {self.recall:.3f} ({self.right}/{self.planted})"
        )


def measure(rows: list[dict], noise: PlantedNoise) -> dict[str, Found]:
    """likely_missing against the removed pairs, likely_wrong against the added ones, over
    rows of the labelled table (uri, likely_missing, likely_wrong)."""
    missing = {(r["uri"], t) for r in rows for t in r["likely_missing"] or []}
    wrong = {(r["uri"], t) for r in rows for t in r["likely_wrong"] or []}
    return {
        "likely_missing": Found(len(noise.removed), len(missing), len(missing & noise.removed)),
        "likely_wrong": Found(len(noise.added), len(wrong), len(wrong & noise.added)),
    }


def quality_auc(rows: list[dict], noise: PlantedNoise) -> float:
    """How well label_quality ranks noisy rows below clean ones: the probability that a
    random noisy row scores lower than a random clean one (ties count half)."""
    noisy_uris = {uri for uri, _ in noise.removed | noise.added}
    scored = [(r["label_quality"], r["uri"] in noisy_uris) for r in rows if r["label_quality"] is not None]
    noisy = np.array([q for q, is_noisy in scored if is_noisy])
    clean = np.array([q for q, is_noisy in scored if not is_noisy])
    if not len(noisy) or not len(clean):
        return float("nan")
    lower = (noisy[:, None] < clean[None, :]).mean() + 0.5 * (noisy[:, None] == clean[None, :]).mean()
    return float(lower)
