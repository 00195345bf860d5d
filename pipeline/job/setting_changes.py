"""What a run changes against the table's version, by name, and what the stored logits
can serve without the model.

The two keys (pipeline/job/incremental.py) decide what a run costs, but a key is a digest:
it says that something changed, not what. So the dry run reads the settings the table's
version was made with (its rules record, and the run record of the run that made its
inference key) and names each setting that differs, old -> new.

logit_floor joins both keys: with sparse logits it decides which logits a row stores.
With dense logits every logit is stored whatever the floor, so a floor change is a
rules change only: the stored logits serve it (a rethreshold, no image re-inferred), and
the run keeps the table's inference key, the one its logits were made under.
"""

from __future__ import annotations

import json
import logging
import posixpath

from pipeline.core.settings import KeyRole, settings_fields
from pipeline.job.incremental import Keys, inference_key
from pipeline.job.settings import TagJobConfig
from pipeline.model.bundle import ModelBundle
from pipeline.storage.filesystem import read_bytes
from pipeline.table.tag_table import RUNS_DIR, Snapshot, TagTable

log = logging.getLogger(__name__)
FLOOR = "logit_floor"
HISTORY = 50  # versions searched for the floor and settings the table's inference key was made with
OPTION_NAMES = {"default_threshold": "threshold"}  # the rules record's names that differ from the option's


def served_keys(
    cfg: TagJobConfig, bundle: ModelBundle, table: TagTable, base: Snapshot | None, keys: Keys
) -> Keys:
    """keys, or (the base's inference key, keys' rules key) when the only inference change
    is the floor and the logits are dense on both sides: then the stored logits serve it."""
    if (
        base is None
        or base.inference_key == keys.inference
        or not cfg.dense_logits_for(len(bundle.vocabulary))
    ):
        return keys
    for floor in _recorded_floors(table, base):
        if floor == cfg.logit_floor:
            continue
        if inference_key(cfg.model_copy(update={FLOOR: floor}), bundle) == base.inference_key:
            log.info(
                "logit_floor %s -> %s with dense logits: the stored logits serve it (rethreshold)",
                floor,
                cfg.logit_floor,
            )
            return Keys(base.inference_key, keys.rules)
    return keys


def _recorded_floors(table: TagTable, base: Snapshot) -> list[float]:
    """The floors the table's versions were committed with, newest first: the base's
    inference key was made under one of them (a floor served by rethreshold keeps it)."""
    floors: list[float] = []
    for snapshot in _history(table, base):
        floor = snapshot.rules.floor
        if floor not in floors:
            floors.append(floor)
    return floors


def _history(table: TagTable, base: Snapshot):
    """The base, then the versions before it with the same inference key, newest first."""
    yield base
    for version in sorted((v for v in table.versions() if v < base.version), reverse=True)[:HISTORY]:
        try:
            snapshot = table.snapshot(version)
        except Exception:  # a version vacuumed meanwhile: the ones kept still count
            continue
        if snapshot.inference_key == base.inference_key:
            yield snapshot


def changed_settings(
    cfg: TagJobConfig, bundle: ModelBundle, table: TagTable, base: Snapshot | None
) -> list[str]:
    """'name old -> new' for every keyed setting and bundle file this run has otherwise
    than the table's version ([] for a new table)."""
    if base is None:
        return []
    changes = []
    if base.model_sha256 != bundle.fingerprint.model_sha256:
        changes.append(f"model {base.model_sha256[:12]} -> {bundle.fingerprint.model_sha256[:12]}")
    old_rules, new_rules = base.rules.record(), cfg.rules.record()
    for name in sorted(set(old_rules) | set(new_rules)):
        if old_rules.get(name) != new_rules.get(name):
            changes.append(_change(OPTION_NAMES.get(name, name), old_rules.get(name), new_rules.get(name)))
    record = _made_with(table, base)
    if record is None:
        return changes
    old_print, new_print = record.get("fingerprint", {}), bundle.fingerprint
    if old_print.get("calibration_sha256") not in (None, new_print.calibration_sha256):
        old_sha, new_sha = old_print["calibration_sha256"], new_print.calibration_sha256
        changes.append(_change("calibration files", old_sha[:12], new_sha[:12]))
    old, new = record.get("settings", {}), cfg.model_dump(mode="json")
    for name, _info, setting in settings_fields(TagJobConfig):
        keyed = setting.key & KeyRole.INFERENCE and name not in (FLOOR, "model")  # model: by its sha256
        if keyed and name in old and old[name] != new.get(name):
            changes.append(_change(name, old[name], new.get(name)))
    return changes


def _made_with(table: TagTable, base: Snapshot) -> dict | None:
    """The run record of the newest tag run of the base's inference key (a rethreshold
    writes none), or None when none is kept."""
    for snapshot in _history(table, base):
        uri = table.full_uri(posixpath.join(RUNS_DIR, f"{snapshot.run_id}.json"))
        try:
            return json.loads(read_bytes(uri, table.storage_options))
        except (OSError, ValueError):
            continue
    return None


def _change(name: str, old, new) -> str:
    return f"{name} {_shown(old)} -> {_shown(new)}"


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)
