"""Settings are defined once (pipeline/job/settings.py, pipeline/model/rules.py), and
everything else derives from them: the command's options, the README's table, the
example configs, and the inference and rules keys.

The key tests are table-driven over every field: a field's KeyRole says which keys a
change of it moves, and each field is changed from its default to check that it moves
exactly those. A field added without a Setting marker, or whose role is wrong, fails
here; a field added later to the key (key_since > 1) leaves existing keys as they were.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from pipeline.cli.docs import generated_docs
from pipeline.core.errors import ConfigError
from pipeline.core.settings import KeyRole, Setting, settings_fields
from pipeline.corpus.audit_settings import AuditSettings
from pipeline.corpus.dedup_settings import DedupSettings
from pipeline.corpus.export_settings import ExportSettings
from pipeline.corpus.split_settings import SplitSettings
from pipeline.job.incremental import inference_key, rules_key
from pipeline.job.settings import NightlyConfig, TagJobConfig, make_tag_config
from pipeline.model.bundle import load_bundle
from pipeline.model.rules import RuleSettings
from pipeline.model.runtime import ProviderChoice

ROOT = Path(__file__).resolve().parents[2]
BASE = {"inputs": ["imgs"], "output": "out", "model": "m"}

# A value other than the default for each field (None: derived from the field's type).
CHANGED = {
    "inputs": ("other",),
    "output": "other",
    "provider": ProviderChoice.CPU,
    "extensions": ("jpg",),
    "max_decode_memory": 0,
    "dense_logits": False,  # the demo's 73 tags are dense by default
    "dense_logits_max_tags": 8,  # below 73 tags: resolved sparse
    "category_thresholds": {"general": 0.5},
    "mcut_categories": ("general",),
    "exclude": ("red_theme",),
    "storage_options": {"anon": True},
    "max_tags": 3,
    "ood_cut": 10.0,
    "ray_address": "auto",
    "decode_placement": "split",  # rows are the same either way (tests/job/test_multi_model.py)
    "labels": {"label_rule": "data"},
}
# Keyed only as a value derived from them, checked by their own tests (test_bundle: a new
# model file re-tags; test_profiles / test_profile_import: the profile's key).
KEYED_ELSEWHERE = {"model", "profile"}


def _changed(name: str, info):
    if name in CHANGED:
        return CHANGED[name]
    default = info.get_default(call_default_factory=True)
    if default is None:  # an optional setting: a plain value of its type
        from pipeline.core.settings import base_type

        return {int: 2, float: 0.5, str: "x", bool: True}[base_type(info)]
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default * 1.5 if default < 0.5 else default / 2 if default < 2 else default + 1
    raise AssertionError(f"no changed value for {name}: add it to CHANGED")


def _command_models() -> list:
    """Every settings model a command's options come from."""
    from pipeline.cli.docs import option_tables

    return [settings.model for _command, settings in option_tables().values() if settings is not None]


@pytest.mark.parametrize(
    "model",
    dict.fromkeys(
        [
            TagJobConfig,
            NightlyConfig,
            RuleSettings,
            DedupSettings,
            SplitSettings,
            AuditSettings,
            ExportSettings,
        ]
        + _command_models()
    ),
    ids=lambda model: model.__name__,
)
def test_every_field_says_what_it_does_to_keys(model):
    """A settings field without a Setting marker has not said whether it changes rows."""
    for name, info in model.model_fields.items():
        if name == "tag":  # NightlyConfig's [tag] table
            continue
        assert any(isinstance(m, Setting) for m in info.metadata), f"{model.__name__}.{name}"
        assert info.description, f"{model.__name__}.{name} has no description"


@pytest.fixture(scope="module")
def bundle(demo_bundle):
    return load_bundle(str(demo_bundle))


def _keys(cfg: TagJobConfig, bundle) -> tuple[str, str]:
    return inference_key(cfg, bundle), rules_key(bundle, cfg.rules)


FIELDS = [(name, info, setting) for name, info, setting in settings_fields(TagJobConfig)]


@pytest.mark.parametrize("name,info,setting", FIELDS, ids=[f[0] for f in FIELDS])
def test_a_change_moves_exactly_the_keys_its_role_names(name, info, setting, bundle):
    if name in KEYED_ELSEWHERE:
        pytest.skip("keyed through the bundle it loads")
    base = make_tag_config(BASE)
    changed = make_tag_config({**BASE, name: _changed(name, info)})
    assert getattr(changed, name) != getattr(base, name)
    before, after = _keys(base, bundle), _keys(changed, bundle)
    moved = KeyRole.NONE
    if before[0] != after[0]:
        moved |= KeyRole.INFERENCE
    if before[1] != after[1]:
        moved |= KeyRole.RULES
    assert moved == setting.key, f"{name}: declared {setting.key}, a change moved {moved}"


INF, RUL = KeyRole.INFERENCE, KeyRole.RULES
# The record of what each setting does to a table's rows, as of key versions 2
# (inference) and 1 (rules). Changing a role here is changing which runs re-tag or
# rethreshold: it must be a decision, made in the field's Setting and here.
KEYED = {
    "model": (INF, 1),
    "profile": (INF, 1),
    "exact_decode": (INF, 1),
    "draft_ratio": (INF, 1),
    "max_pixels": (INF, 1),
    "max_decode_memory": (INF, 2),
    "max_file_bytes": (INF, 2),
    "logit_floor": (INF | RUL, 1),
    "dense_logits": (INF, 1),
    "dense_logits_max_tags": (INF, 1),
    **{name: (RUL, 1) for name in RuleSettings.model_fields if name != "logit_floor"},
}


def test_the_keyed_fields_are_the_ones_on_record():
    declared = {
        name: (setting.key, setting.key_since)
        for name, _info, setting in FIELDS
        if setting.key != KeyRole.NONE
    }
    assert declared == KEYED


def test_a_setting_added_later_keeps_existing_keys_until_it_is_changed(bundle):
    """Adding a keyed setting (key_since > 1) cannot silently re-tag existing tables,
    and changing it from its default cannot silently fail to."""

    class Later(TagJobConfig):
        sharpen: Annotated[
            float, Field(ge=0, description="unsharp mask amount"), Setting(KeyRole.INFERENCE, key_since=3)
        ] = 0.0

    base = make_tag_config(BASE)
    later = Later(**base.model_dump())
    assert inference_key(later, bundle) == inference_key(base, bundle)
    assert inference_key(later.model_copy(update={"sharpen": 0.5}), bundle) != inference_key(base, bundle)


def test_a_setting_of_the_first_key_version_is_always_keyed(bundle):
    class FromTheStart(TagJobConfig):
        sharpen: Annotated[
            float, Field(ge=0, description="unsharp mask amount"), Setting(KeyRole.INFERENCE)
        ] = 0.0

    base = make_tag_config(BASE)
    assert inference_key(FromTheStart(**base.model_dump()), bundle) != inference_key(base, bundle)


def test_draft_ratio_does_nothing_under_exact_decode(bundle):
    exact = make_tag_config({**BASE, "exact_decode": True})
    assert _keys(exact, bundle) == _keys(exact.model_copy(update={"draft_ratio": 4.0}), bundle)


def test_rule_settings_travel_as_one_object():
    cfg = make_tag_config({**BASE, "threshold": 0.4, "exclude": ["a"], "mcut_categories": "general"})
    rules = cfg.rules
    assert isinstance(rules, RuleSettings) and rules.mcut_categories == ("general",)
    assert RuleSettings.model_validate_json(rules.model_dump_json()) == rules
    assert rules.record() == {
        "default_threshold": 0.4,
        "per_tag_thresholds": False,
        "mcut_categories": ["general"],
        "exclude": ["a"],
        "calibrate": True,
        "logit_floor": 0.01,
    }


@pytest.mark.parametrize(
    "values,message",
    [
        ({"batch_size": 0}, r"field batch_size has a bad value: 0 \(must be at least 1\)"),
        ({"batches_in_flight": 17}, r"field batches_in_flight has a bad value: 17 \(must be 1 to 16\)"),
        ({"threshold": 1.5}, r"field threshold has a bad value: 1.5 \(must be 0 to 1\)"),
        ({"tagger_cpus": 0}, r"field tagger_cpus has a bad value: 0 \(must be more than 0\)"),
        ({"batch_size": True}, r"field batch_size has a bad value: true \(must be a number, not true\)"),
        ({"exact_decode": "yes"}, r"field exact_decode has a bad value: 'yes' \(must be true or false\)"),
        ({"batch_size": None}, r"field batch_size must not be empty"),
        ({"output": ""}, r"field output has a bad value: '' \(must not be empty\)"),
        ({"provider": "gpu"}, r"allowed: auto, cpu, cuda, tensorrt"),
        ({"max_decode_memory": 5}, r"at least 1048576 \(1 MiB\), or 0 for no limit"),
        (
            {"storage_options": "{nope"},
            r"field storage_options has a bad value: '\{nope' \(must be a JSON object",
        ),
        ({"batchsize": 2}, r"unknown field\(s\) in \[tag\]: batchsize \(did you mean batch_size\?\)"),
        ({"inputs": []}, r"field inputs has a bad value: \[\] \(must not be empty\)"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(values, message):
    with pytest.raises(ConfigError, match=message) as caught:
        make_tag_config({**BASE, **values})
    assert "\n" not in str(caught.value)


def test_generated_docs_are_up_to_date():
    """The README's options table and the example configs are generated from the
    settings; `python -m pipeline.cli.docs --write` refreshes them."""
    for path, text in generated_docs(ROOT).items():
        assert path.read_text(encoding="utf-8") == text, f"{path.relative_to(ROOT)} is stale: run the writer"


def test_the_example_configs_hold_every_key_and_parse():
    from pipeline.job.settings import load_config_file, load_nightly_config

    tag = load_config_file(ROOT / "configs" / "tag.example.toml")
    text = (ROOT / "configs" / "tag.example.toml").read_text()
    for name in TagJobConfig.model_fields:
        assert f"\n{name} = " in text or f"\n# {name} = " in text or f"\n[tag.{name}]" in text, name
    assert make_tag_config(tag).batch_size == 64
    assert load_nightly_config(ROOT / "configs" / "nightly.example.toml").dedup.max_distance == 6


def test_the_command_line_wins_and_lists_become_tables():
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(
        app,
        ["tag", "-i", "x", "-o", "y", "-m", "m", "--category-threshold", "general", "--dry-run"],
    )
    assert result.exit_code != 0
    assert "expected CATEGORY=VALUE" in (result.output + str(result.exception))


def test_every_profile_field_is_keyed_or_says_why_not():
    """A field added to a profile record must be classified: in the key as 0.2 spelt it,
    in Preprocess.extra_key (keyed when not default), or here as not changing rows."""

    from pipeline.job.incremental import PROFILE_EXTRA_KEY_FIELDS, PROFILE_KEY_FIELDS
    from pipeline.model.profiles import Profile

    for record, keyed in PROFILE_KEY_FIELDS.items():
        names = set(record.model_fields)
        extra = set(PROFILE_EXTRA_KEY_FIELDS) if record.__name__ == "Preprocess" else set()
        assert names == set(keyed) | extra, (record.__name__, names ^ (set(keyed) | extra))
    # Profile itself: name, files, preprocess, model names and activation are keyed;
    # description and source (the file it came from) say nothing about pixels or tags,
    # thresholds are the rules key's
    not_keyed = {"description", "source", "thresholds"}
    keyed = {"name", "files", "preprocess", "input_name", "output_name", "embedding_name", "activation"}
    assert set(Profile.model_fields) == keyed | not_keyed


def test_profile_keys_are_spelt_from_the_field_list_not_repr():
    """The key spells the listed fields; a repr that grows a field leaves it alone."""
    from pipeline.job.incremental import profile_key
    from pipeline.model.profiles import load_profile

    profile = load_profile("wd_v3")
    before = profile_key(profile)
    assert repr(profile.preprocess) in before  # the same text as 0.2 wrote, today
    record = type(profile.preprocess)
    original = record.__repr__
    record.__repr__ = lambda self: "changed"  # type: ignore[method-assign]
    try:
        assert profile_key(profile) == before
    finally:
        record.__repr__ = original  # type: ignore[method-assign]


class _Stop(Exception):
    pass


def test_category_names_are_kept_as_a_file_writes_them_and_lowercased_from_the_command_line(monkeypatch):
    """As before the settings were typed: a config's names are keyed as written (so an
    upgrade does not rethreshold its table); the command line's are lowercased."""
    import typer

    import pipeline.job.tag_job
    from pipeline.cli import app

    cfg = make_tag_config({**BASE, "category_thresholds": {"Character": 0.8}, "mcut_categories": ["General"]})
    assert cfg.category_thresholds == {"Character": 0.8} and cfg.mcut_categories == ("General",)
    seen = {}

    def record(cfg, dry_run=False):
        seen["cfg"] = cfg
        raise _Stop

    monkeypatch.setattr(pipeline.job.tag_job, "run_tag_pass", record)
    command = typer.main.get_command(app).commands["tag"]  # type: ignore[attr-defined]
    args = ["-i", "x", "-o", "o", "-m", "m", "--category-threshold", "Character=0.8", "--mcut", "General"]
    with pytest.raises(_Stop):
        command.main(args, standalone_mode=False)
    assert seen["cfg"].category_thresholds == {"character": 0.8}
    assert seen["cfg"].mcut_categories == ("general",)


@pytest.mark.parametrize(
    "settings",
    [{"category_thresholds": {"charcter": 0.85}}, {"mcut_categories": ("genral",)}],
    ids=["category_thresholds", "mcut_categories"],
)
def test_a_category_the_model_lacks_stops_the_run_before_any_work(settings, bundle):
    """A misspelt category matched no tag and changed nothing, silently; now the rules
    are refused when the postprocessor is built (the tag job's first step)."""
    from pipeline.model.postprocess import Postprocessor

    with pytest.raises(ConfigError, match=r"is not a category of this model \(did you mean"):
        Postprocessor.for_bundle(bundle, RuleSettings(**settings))
    Postprocessor.for_bundle(bundle, RuleSettings(category_thresholds={"character": 0.85}))


def _storage_commands() -> list:
    """(path, command, settings) of every command that takes --storage-options."""
    from pipeline.cli.docs import option_tables

    return [
        (path, command, settings)
        for path, (command, settings) in option_tables().items()
        if settings is not None and "storage_options" in {name for name, _, _ in settings.fields()}
    ]


@pytest.mark.parametrize(
    "path,command,settings", _storage_commands(), ids=lambda v: v if isinstance(v, str) else ""
)
@pytest.mark.parametrize(
    "value,message",
    [
        ("{nope", r"^field storage_options has a bad value: '\{nope' \(must be a JSON object \(Expecting"),
        (
            '["anon"]',
            r"^field storage_options has a bad value: '\[\"anon\"\]' \(must be a JSON object, e\.g\.",
        ),
    ],
)
def test_every_command_reads_storage_options_with_one_parser(path, command, settings, value, message):
    """Bad --storage-options stop every command that takes them before any work, with the
    same one line (one parser: core.settings.parse_storage_options)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    # review checks its three by hand (none has a default), in the model's order of errors
    review = ["--tags", "x", "--kind", "uncertain", "--out", "q.jsonl"]
    required = review if path == "review" else []
    for name, info, setting in settings.fields():
        if info.is_required() and name != "storage_options" and path != "review":
            flag = [] if setting.argument else [(setting.flags or ("--" + name.replace("_", "-"),))[0]]
            required += [*flag, "x"]
    result = CliRunner().invoke(app, [*path.split(), *required, "--storage-options", value])
    assert isinstance(result.exception, ConfigError), (result.output, result.exception)
    assert re.search(message, str(result.exception)), str(result.exception)
    assert "\n" not in str(result.exception)


def test_rethreshold_takes_a_tag_configs_rules_under_the_command_line(tmp_path):
    """rethreshold's --config: the [tag] table is checked as tag checks it, its rule,
    storage and Ray settings apply, and an option given on the command line wins."""
    from pipeline.job.settings import make_rethreshold_settings

    config = tmp_path / "tag.toml"
    config.write_text(
        '[tag]\ninputs = ["imgs"]\noutput = "out"\nmodel = "m"\nthreshold = 0.4\nmax_tags = 7\n'
        'ray_address = "auto"\nstorage_options = { anon = true }\n'
    )
    given = {"tags": "t", "model": "b", "max_tags": 3}
    settings = make_rethreshold_settings(config, given)
    assert (settings.tags, settings.model, settings.output) == ("t", "b", None)
    assert (settings.rules.threshold, settings.rules.max_tags) == (0.4, 3)
    assert (settings.ray_address, settings.storage_options) == ("auto", {"anon": True})
    assert make_rethreshold_settings(None, given).rules.threshold is None
    config.write_text('[tag]\ninputs = ["imgs"]\noutput = "out"\nmodel = "m"\nthreshhold = 0.4\n')
    with pytest.raises(
        ConfigError, match=r"unknown field\(s\) in \[tag\]: threshhold \(did you mean threshold"
    ):
        make_rethreshold_settings(config, given)
