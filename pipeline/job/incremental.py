"""What a run must do against the committed table: keys, source identity, reuse.

Two keys decide how much work a changed setting costs:
- the inference key (model weights + vocabulary, preprocessing profile, decode
  settings, what logits are stored): a change re-tags every image;
- the rules key (calibration, OOD reference, thresholds): a change rethresholds the
  stored logits, with no inference.
Within one inference key an image is redone when its source changed: etag (with
size) where the store gives one, else size + mtime, else the sha256 of its bytes
(the comparison itself, by uri range: pipeline/job/changes.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import RETRYABLE_ERROR_KINDS
from pipeline.core.settings import KeyRole, settings_fields
from pipeline.model.bundle import ModelBundle
from pipeline.model.profiles import Activation, BundleFiles, Preprocess, Profile, Thresholds
from pipeline.model.rules import RuleSettings

if TYPE_CHECKING:
    from pipeline.job.settings import TagJobConfig

log = logging.getLogger(__name__)

SOURCE_COLUMNS = ["uri", "source_size", "etag", "mtime"]
RETRY_ERROR_KINDS = RETRYABLE_ERROR_KINDS  # transient at the time: tried again next run
NEW, CHANGED, UNCHANGED, DELETED, UNKNOWN, RETRY = (
    "new",
    "changed",
    "unchanged",
    "deleted",
    "unknown",
    "retry",
)


def _digest(value) -> str:
    return hashlib.sha256(
        json.dumps(
            value, sort_keys=True, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else repr(v)
        ).encode()
    ).hexdigest()


# Settings keyed as a value derived from them: what the model actually got.
DERIVED_FOR_KEY = {
    "draft_ratio": lambda cfg, tags: None if cfg.exact_decode else cfg.draft_ratio,
    "dense_logits": lambda cfg, tags: cfg.dense_logits_for(tags),
}


def settings_record(cfg: TagJobConfig, role: KeyRole, tags: int) -> dict:
    """The settings that join the `role` key, by their Setting markers (one definition in
    pipeline/job/settings.py). A field of key version 1 is always recorded; a later one
    only when it is not at its default, so adding a keyed setting leaves existing tables'
    keys as they were, and changing it from its default changes them."""
    record = {}
    for name, info, setting in settings_fields(type(cfg)):
        if not setting.key & role or setting.key_via:
            continue
        derive = DERIVED_FOR_KEY.get(name)
        value = derive(cfg, tags) if derive else getattr(cfg, name)
        if setting.key_since > 1 and value == info.get_default(call_default_factory=True):
            continue
        record[name] = value
    return record


def inference_key(cfg: TagJobConfig, bundle: ModelBundle) -> str:
    """Everything that decides a row's stored values: the model, its profile and the
    inference settings (settings_record); a change re-tags every image."""
    p = bundle.profile
    return _digest(
        {
            "model_sha256": bundle.fingerprint.model_sha256,
            "profile": profile_key(p),
            **settings_record(cfg, KeyRole.INFERENCE, len(bundle.vocabulary)),
            # profile fields and outputs added later join only when they differ from what
            # earlier versions did, so the keys of existing tables stay as they were
            **({"preprocess": p.preprocess.extra_key()} if p.preprocess.extra_key() else {}),
            **(
                {"embedding_output": bundle.embedding_output}
                if bundle.embedding_output != _old_embedding(bundle)
                else {}
            ),
        }
    )


def _old_embedding(bundle: ModelBundle) -> str | None:
    """The embedding output earlier versions used: the profile's, when the model has it."""
    name = bundle.profile.embedding_name
    return name if name in bundle.output_names else None


class _Spelt:
    """A repr given as text: how a value was written into keys of existing tables."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


_KEYED_AS = {Activation.SIGMOID_PROBABILITIES: _Spelt("<Activation.NONE: 'none'>")}  # its earlier name

# The profile fields in the keys, by class, in the order tagpipe 0.2 spelt them. Fields
# added since join through Preprocess.extra_key (PROFILE_EXTRA_KEY_FIELDS) only when not
# at their default; tests/cli/test_settings.py fails on a profile field in neither list.
PROFILE_KEY_FIELDS: dict[type, tuple[str, ...]] = {
    BundleFiles: ("model", "vocabulary", "vocabulary_format", "tag_metrics", "ood_reference", "metadata"),
    Preprocess: (
        "width",
        "height",
        "resize_mode",
        "interpolation",
        "pad_color",
        "alpha_background",
        "value_range",
        "mean",
        "std",
        "channel_order",
        "layout",
        "alpha_order",
    ),
    Thresholds: ("default", "by_category"),  # the rules key's
}
PROFILE_EXTRA_KEY_FIELDS = ("resize_width", "resize_height", "rounding", "mean_std_order")


def _spell(value) -> _Spelt:
    """A profile record as the key spells it: Class(field=repr, ...) over its keyed fields."""
    fields = PROFILE_KEY_FIELDS[type(value)]
    return _Spelt(f"{type(value).__name__}({', '.join(f'{n}={getattr(value, n)!r}' for n in fields)})")


def profile_key(p: Profile) -> str:
    """The profile's part of the inference key, spelt field by field as tables written by
    earlier versions have it (tests/model/test_profile_import.py), so an upgrade re-tags nothing."""
    activation = _KEYED_AS.get(p.activation, p.activation)
    keyed = (p.name, _spell(p.files), _spell(p.preprocess), p.input_name, p.output_name, p.embedding_name)
    return repr((*keyed, activation))


def rules_key(bundle: ModelBundle, rules: RuleSettings) -> str:
    """What decides tags from stored logits: calibration, the profile's thresholds and
    the rule settings (RuleSettings.record); a change rethresholds, no inference."""
    return _digest(
        {
            "calibration_sha256": bundle.fingerprint.calibration_sha256,
            "profile_thresholds": repr(_spell(bundle.profile.thresholds)),
            "rules": rules.record(),
        }
    )


def parts_dir_key(inference: str, rules: str) -> str:
    return f"{inference[:16]}-{rules[:8]}"


@dataclass(frozen=True)
class Keys:
    """A run's two keys: a change of `inference` tags every image again, of `rules` only
    rethresholds the stored logits."""

    inference: str
    rules: str

    @property
    def parts_dir(self) -> str:
        """The folder under data/ the parts made under these keys go to."""
        return parts_dir_key(self.inference, self.rules)


def part_name(key: str, rows: pa.Table) -> str:
    """From the settings key and each row's uri and source identity: a rerun of the same
    work rewrites the same name, and new content never takes an old part's name."""
    digest = hashlib.sha256(key.encode())
    for uri, size, etag, mtime in zip(*(rows.column(c).to_pylist() for c in SOURCE_COLUMNS)):
        digest.update(f"\0{uri}\0{size}\0{etag}\0{mtime!r}".encode())
    return f"part-{digest.hexdigest()[:24]}.parquet"


def same_values(a: pa.ChunkedArray, b: pa.ChunkedArray) -> np.ndarray:
    """Elementwise equality where two nulls are equal."""
    equal = pc.fill_null(pc.equal(a, b), False)
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    return pc.or_(equal, both_null).to_numpy(zero_copy_only=False)


@dataclass
class Reuse:
    """Parts an interrupted run wrote that this run takes as they are, and their rows."""

    files: list[str] = field(default_factory=list)
    uris: set[str] = field(default_factory=set)
    rows: int = 0
    errors: int = 0


def reusable_parts(candidates: list[str], read_part, to_infer: pa.Table) -> Reuse:
    """Parts an interrupted run wrote with the same settings whose every row is still
    wanted with the same source identity: taken as they are, not tagged again."""
    reuse = Reuse()
    if not candidates or not to_infer.num_rows:
        return reuse
    wanted = to_infer.select(SOURCE_COLUMNS).rename_columns(["uri", *(f"w_{c}" for c in SOURCE_COLUMNS[1:])])
    wanted = wanted.append_column("_w", pa.array(np.ones(wanted.num_rows, bool)))
    for file in candidates:
        part = read_part(file, [*SOURCE_COLUMNS, "error_kind"])
        j = part.join(wanted, keys="uri", join_type="left outer")
        ok = j.column("_w").is_valid().to_numpy(zero_copy_only=False)
        for c in SOURCE_COLUMNS[1:]:
            ok &= same_values(j.column(c), j.column(f"w_{c}"))
        uris = set(part.column("uri").to_pylist())
        if part.num_rows and ok.all() and not (uris & reuse.uris):
            reuse.files.append(file)
            reuse.uris |= uris
            reuse.rows += part.num_rows
            reuse.errors += part.num_rows - part.column("error_kind").null_count
    return reuse
