"""Model outputs -> tags, scores, sparse logits, OOD distance (vectorised per batch).

Runs inside the tagger actor so the 100k-wide outputs never cross the object store:
only the emitted tags and the logits above a probability floor leave it.

Tags are a pure function of what is stored. Logits are rounded to float16 (as stored)
before anything is decided, and only tags whose probability reaches the floor (plus
the rating/quality groups, always kept) are candidates. So `tagpipe rethreshold`,
which sees only the stored sparse logits, reproduces a re-run's tags exactly for any
threshold at or above the floor (tests/job/test_rethreshold.py).

Selection, per row:
  p = sigmoid(logit)             (softmax groups store log-probabilities: p = exp)
  score = calibration_table[tag, clip(int(p*100), 0, 99)], bin 99 read as bin 98
          (the last bin is noisy; public CL ports do the same), or p without a table
  threshold = per-tag best_thr | category threshold | global default; or, for MCut
          categories, the midpoint of the largest gap between sorted candidate scores
  rating, quality: the argmax of their group; then the exclude list, then the cap.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.core.settings import suggestion
from pipeline.model.bundle import ModelBundle, OodReference, TagMetrics, Vocabulary
from pipeline.model.profiles import Activation
from pipeline.model.rules import RuleSettings, TagRules

ARGMAX_CATEGORIES = ("rating", "quality")  # one winner each, no threshold
NOISY_BIN, REPLACEMENT_BIN = 99, 98


def _check_categories(settings: RuleSettings, vocabulary: Vocabulary) -> None:
    """Category names a user gave must be the model's: a misspelt one would otherwise
    match no tag and change nothing, silently (a run would still commit a version)."""
    known = vocabulary.category_names()
    for field, names in (
        ("category_thresholds", list(settings.category_thresholds)),
        ("mcut_categories", list(settings.mcut_categories)),
    ):
        unknown = [name for name in names if name not in known]
        if unknown:
            near = suggestion(unknown[0], known)
            raise ConfigError(
                f"field {field}: {unknown[0]!r} is not a category of this model{near}; "
                f"its categories are {', '.join(known)}"
            )


def stored_logits(raw: np.ndarray, activation: Activation) -> np.ndarray:
    """What a row stores per tag, as float16: logits for independent tags (sigmoid
    probability outputs are inverted), log-probabilities for a softmax group (softmax
    probability outputs are logged, so exp(stored) is the model's own probability)."""
    raw = raw.astype(np.float64)
    if activation is Activation.SIGMOID_PROBABILITIES:
        p = np.clip(raw, 1e-7, 1 - 1e-7)
        raw = np.log(p / (1 - p))
    elif activation is Activation.SOFTMAX_PROBABILITIES:
        raw = np.log(np.clip(raw, np.finfo(np.float32).tiny, 1.0))
    elif activation is Activation.SOFTMAX:
        shifted = raw - raw.max(axis=1, keepdims=True)
        raw = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return raw.astype(np.float16)


def stored_to_probabilities(stored: np.ndarray, activation: Activation) -> np.ndarray:
    x = stored.astype(np.float32)
    if activation.is_group:
        return np.exp(x)
    return 1.0 / (1.0 + np.exp(-x))


def probabilities(raw: np.ndarray, activation: Activation) -> np.ndarray:
    """Probabilities of raw model outputs, through the float16 the rows store."""
    return stored_to_probabilities(stored_logits(raw, activation), activation)


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
    return np.sqrt(
        np.maximum(np.einsum("nd,de,ne->n", centred, reference.cov_inv.astype(np.float64), centred), 0.0)
    )


class Postprocessor:
    """Turns a batch of raw model outputs (or stored logits) into per-row tag columns."""

    def __init__(
        self,
        vocabulary: Vocabulary,
        activation: Activation,
        rules: TagRules,
        ood: OodReference | None = None,
        metrics: TagMetrics | None = None,
    ):
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
                raise ConfigError(
                    "field per_tag_thresholds: the bundle has no per-tag thresholds "
                    "(best_thr in its tag metrics)"
                )
            thresholds = np.asarray(metrics.best_thr, np.float32).copy()
        self.table = None
        if rules.calibrate and metrics is not None and metrics.calibration_table is not None:
            self.table = np.asarray(metrics.calibration_table, np.float32)
        argmax = np.isin(categories, ARGMAX_CATEGORIES)
        thresholds[argmax] = np.inf  # never by threshold
        self.mcut_masks = [categories == c for c in rules.mcut_categories if (categories == c).any()]
        for in_group in self.mcut_masks:
            thresholds[in_group] = np.inf  # chosen by MCut per row
        self.thresholds = thresholds
        self.always_kept = argmax
        self.excluded = (
            np.isin(self.tags, list(rules.exclude)) if rules.exclude else np.zeros(len(self.tags), bool)
        )
        self.ood_cut = rules.ood_cut  # None: the reference's p95
        if self.ood_cut is None and ood is not None:
            self.ood_cut = ood.p95
        self.argmax_masks = {c: categories == c for c in ARGMAX_CATEGORIES if (categories == c).any()}
        self._always_kept_idx = np.flatnonzero(argmax)
        self._probability_of_bits, self._raw_screen = _float16_tables(activation, rules.logit_floor)

    @classmethod
    def for_bundle(cls, bundle: ModelBundle, settings: RuleSettings | None = None, **rules) -> Postprocessor:
        """The bundle's vocabulary, activation, tag metrics and OOD reference, with the
        profile's thresholds overridden by the settings, then by TagRules fields given
        here (dense_logits; None: not given)."""
        if settings is not None:
            _check_categories(settings, bundle.vocabulary)
        overrides = {**(settings.overrides() if settings else {}), **rules}
        return cls(
            bundle.vocabulary,
            bundle.profile.activation,
            TagRules.from_bundle(bundle, **overrides),
            bundle.ood_reference,
            bundle.tag_metrics,
        )

    def __call__(self, raw: np.ndarray, embeddings: np.ndarray | None) -> dict[str, list]:
        """Raw outputs [N, T] -> per-row columns.

        Only the few hundred tags per row at or above the floor matter, so for sigmoid
        models the float32 outputs are screened with one comparison against a bound
        that no tag below the floor can pass, and only the survivors are rounded,
        scored and sorted. Dense float work over all 100k tags cost more per image on a
        CPU core than an H100 spends on the image (docs/benchmarks.md, 'The tagger
        actor's host work, and what was done about it')."""
        n, width = raw.shape
        if self.activation is Activation.SIGMOID and not self.rules.dense_logits:
            screen = raw >= self._raw_screen
            screen[:, self._always_kept_idx] = True
            rows, cols = sparse_nonzero(screen)
            return self.from_entries(n, rows, cols, raw[rows, cols].astype(np.float16), embeddings)
        stored = stored_logits(raw, self.activation)
        if self.rules.dense_logits:
            rows, cols = np.divmod(np.arange(n * width), width)
            return self.from_entries(n, rows, cols, stored.reshape(-1), embeddings)
        keep = (stored_to_probabilities(stored, self.activation) >= self.rules.logit_floor) | self.always_kept
        rows, cols = np.nonzero(keep)
        return self.from_entries(n, rows, cols, stored[rows, cols], embeddings)

    def from_entries(
        self, n: int, rows: np.ndarray, cols: np.ndarray, stored: np.ndarray, embeddings: np.ndarray | None
    ) -> dict[str, list]:
        """Per-row columns from the logits rows store: entries (rows[k], cols[k]) ->
        stored[k] (float16), sorted by row then column. Candidates for tags are the
        entries at or above the floor plus the rating/quality groups; every entry is
        kept as a stored logit when dense_logits is set, the candidates otherwise."""
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        stored = np.asarray(stored, np.float16)
        p = self._probability_of_bits[stored.view(np.uint16)]
        candidate = (p >= self.rules.logit_floor) | self.always_kept[cols]
        if self.rules.dense_logits:
            kept_rows, kept_cols, kept_values = rows, cols, stored
        else:
            kept_rows, kept_cols, kept_values = rows[candidate], cols[candidate], stored[candidate]
        rows, cols, p = rows[candidate], cols[candidate], p[candidate]
        scores = self._table_scores(cols, p) if self.table is not None else p.astype(np.float32)
        chosen = scores >= self.thresholds[cols]
        bounds = np.searchsorted(rows, np.arange(n + 1))  # row i's entries: bounds[i]:bounds[i + 1]
        for in_group in self.mcut_masks:
            for i in np.unique(rows[in_group[cols]]):
                span = np.arange(bounds[i], bounds[i + 1])
                span = span[in_group[cols[span]]]
                cut = max(mcut(scores[span]), self.rules.logit_floor)
                chosen[span[scores[span] > cut]] = True
        chosen &= ~self.excluded[cols]
        if self.rules.max_tags is not None:
            over = np.flatnonzero(np.bincount(rows[chosen], minlength=n) > self.rules.max_tags)
            for i in over:
                span = np.arange(bounds[i], bounds[i + 1])
                span = span[chosen[span]]
                chosen[span[np.argsort(-scores[span], kind="stable")[self.rules.max_tags :]]] = False
        rows_out: dict[str, list] = {}
        for category, in_group in self.argmax_masks.items():
            member = np.flatnonzero(in_group[cols])
            order = member[
                np.lexsort((cols[member], -scores[member], rows[member]))
            ]  # per row: best score, then lowest index
            first = order[np.unique(rows[order], return_index=True)[1]]
            chosen[first] = True
            winner = np.full(n, None, object)
            winner[rows[first]] = self.tags[cols[first]]
            rows_out[category] = winner.tolist()
        picked = np.flatnonzero(chosen)
        picked = picked[
            np.lexsort((cols[picked], -scores[picked], rows[picked]))
        ]  # per row, by score (stable)
        tag_bounds = np.searchsorted(rows[picked], np.arange(n + 1))
        kept_bounds = np.searchsorted(kept_rows, np.arange(n + 1))
        picked_tags, picked_scores, picked_cats = (
            self.tags[cols[picked]],
            scores[picked],
            self.category_of[cols[picked]],
        )
        rows_out.update({k: [] for k in ("tags", "scores", "logit_indices", "logit_values")})
        for name in self.category_names:
            rows_out[f"tags_{name}"] = []
        for i in range(n):
            a, b = tag_bounds[i], tag_bounds[i + 1]
            tags, cats = picked_tags[a:b], picked_cats[a:b]
            rows_out["tags"].append(tags.tolist())
            rows_out["scores"].append(picked_scores[a:b])
            for c, name in enumerate(self.category_names):
                rows_out[f"tags_{name}"].append(tags[cats == c].tolist())
            a, b = kept_bounds[i], kept_bounds[i + 1]
            rows_out["logit_indices"].append(kept_cols[a:b].astype(np.int32))
            rows_out["logit_values"].append(kept_values[a:b])
        for category in ARGMAX_CATEGORIES:
            rows_out.setdefault(category, [None] * n)
        if embeddings is not None and self.ood is not None:
            distances = mahalanobis(embeddings, self.ood).astype(np.float32)
            assert self.ood_cut is not None  # the reference's p95 when not given
            rows_out["ood_distance"] = distances.tolist()
            rows_out["ood"] = (distances > self.ood_cut).tolist()
        else:
            rows_out["ood_distance"] = [None] * n
            rows_out["ood"] = [None] * n
        return rows_out

    def probabilities_of(self, stored: np.ndarray) -> np.ndarray:
        """The model's probability of stored float16 logits (bit-identical to
        stored_to_probabilities), for readers of stored rows (the label check)."""
        return self._probability_of_bits[np.asarray(stored, np.float16).view(np.uint16)]

    def score(self, cols: np.ndarray, p: np.ndarray) -> np.ndarray:
        """The score tags are decided on: the calibrated probability of tag cols[k] at
        probability p[k] when the bundle's calibration applies, else p itself."""
        if self.table is None:
            return np.asarray(p, np.float32)
        return self._table_scores(np.asarray(cols, np.int64), np.asarray(p, np.float32))

    def _table_scores(self, cols: np.ndarray, p: np.ndarray) -> np.ndarray:
        """CL-style calibration: table[tag, clip(int(p*100), 0, 99)], the noisy last bin read as 98."""
        bins = np.clip((p * 100).astype(np.int64), 0, 99)
        bins[bins == NOISY_BIN] = REPLACEMENT_BIN
        assert self.table is not None  # called only with a calibration table
        return self.table[cols, bins].astype(np.float32)


def _float16_tables(activation: Activation, floor: float) -> tuple[np.ndarray, float]:
    """(probability of every float16 bit pattern, float32 screen for raw sigmoid outputs).

    The table is stored_to_probabilities itself, evaluated once per bit pattern, so a
    lookup is bit-identical to it. The screen is the largest float16 whose probability
    is below the floor: rounding to float16 and the sigmoid are both monotone, so a raw
    output below it cannot reach the floor, and one at or above it is checked exactly."""
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        probability = stored_to_probabilities(values.reshape(1, -1), activation).reshape(-1)
    finite = np.isfinite(values)
    order = np.argsort(values[finite].astype(np.float32), kind="stable")
    below = values[finite][order][probability[finite][order] < floor]
    if activation is not Activation.SIGMOID or not len(below):
        return probability, -np.inf
    if np.any(np.diff(probability[finite][order]) < 0):  # not monotone on this platform: screen nothing
        return probability, -np.inf
    return probability, float(below.max())


def sparse_nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero of a 2-D boolean mask that is mostly False, several times faster: 8 flags
    are scanned as one uint64 word and only the words holding a True are expanded (a few
    hundred of 108k tags pass the screen; docs/benchmarks.md, 'The tagger actor's host
    work, and what was done about it')."""
    flat = np.ascontiguousarray(mask).reshape(-1)
    whole = flat.size // 8 * 8
    words = np.flatnonzero(flat[:whole].view(np.uint64))
    word_rows, offsets = np.nonzero(flat[:whole].view(np.uint8).reshape(-1, 8)[words])
    index = np.concatenate([words[word_rows] * 8 + offsets, np.flatnonzero(flat[whole:]) + whole])
    return np.divmod(index, mask.shape[1])
