"""Typed settings: each setting is defined once, as a field of a pydantic model.

A settings model (TagJobConfig, NightlyConfig, RuleSettings, and one for every other command,
beside the work it drives: DedupSettings, ReportSettings, VacuumSettings, PullSettings, ...)
declares each field's type, default, constraints and one-line description, plus a
`Setting` marker that says how the field shows outside Python: its command-line
spellings, and which table key it joins (see docs/decisions.md for pydantic over
msgspec). From that one definition come:
- validation with one-line errors that name the field (`build`);
- the command's options and arguments (pipeline/cli/common.py builds them from the model);
- the README's options table and the example config files (pipeline/cli/docs.py, with
  `option_spellings`, `default_text`, `example_toml`; tests compare them with the files);
- the inference key (pipeline/job/incremental.py reads each field's `KeyRole`); the
  rules key hashes RuleSettings.record(), whose fields the tests hold to their RULES role.
"""

from __future__ import annotations

import difflib
import enum
import json
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

import pydantic
from pydantic import BeforeValidator, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.core.errors import ConfigError


class KeyRole(enum.Flag):
    """What changing a setting does to rows already in a table (a setting may do both)."""

    NONE = 0  # how the work is carried out; never changes a row
    INFERENCE = enum.auto()  # the model sees other pixels or rows store other values: re-tag every image
    RULES = enum.auto()  # other tags from the same stored logits: rethreshold, no inference


@dataclass(frozen=True)
class Setting:
    """How one settings field shows outside Python. Every field of a settings model has
    one (tests/cli/test_settings.py), so a new field cannot skip saying what it does to keys.

    flags: the command-line spellings, long name first; () means --field-name.
    negative: for a boolean, the spelling that sets it false (--fast-decode).
    key_since: the key version a keyed field joined. Fields of version 1 are always in
        the key; later ones only when not at their default, so adding one leaves the keys
        of existing tables (and their next nightly run) as they were.
    cli: False for a config-file-only field.
    default_text: the default as the README shows it, when the value itself says little.
    metavar: the value's name in the README (EXT, TAG); an argument's name (REPO_ID).
    """

    key: KeyRole
    flags: tuple[str, ...] = ()
    negative: str | None = None
    key_since: int = 1
    cli: bool = True
    default_text: str | None = None
    metavar: str | None = None
    from_cli: Callable | None = None  # the command line's values -> the field's (CATEGORY=VALUE items)
    key_via: str | None = None  # keyed, but as a value derived from it (named here), not as given
    argument: bool = False  # a positional argument on the command line (`model pull REPO_ID DIR`)


def setting_of(field: FieldInfo) -> Setting:
    marker = next((m for m in field.metadata if isinstance(m, Setting)), None)
    if marker is None:
        raise TypeError(f"settings field without a Setting marker: {field}")
    return marker


def settings_fields(model: type[pydantic.BaseModel]) -> Iterator[tuple[str, FieldInfo, Setting]]:
    """(name, field, its Setting) for every field of a settings model, in order."""
    for name, field in model.model_fields.items():
        if any(isinstance(m, Setting) for m in field.metadata):
            yield name, field, setting_of(field)


def option_flags(name: str, setting: Setting) -> tuple[str, ...]:
    """A field's command-line declarations: its spellings (default --field-name), the
    first paired with the spelling that sets a boolean false (--exact-decode/--fast-decode)."""
    flags = setting.flags or ("--" + name.replace("_", "-"),)
    return (f"{flags[0]}/{setting.negative}", *flags[1:]) if setting.negative else flags


class SettingsModel(pydantic.BaseModel):
    """Frozen, no unknown fields, defaults validated too; booleans and numbers as strict
    as a config file should be (pydantic alone would read `batch_size = true` as 1)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @pydantic.field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value, info: pydantic.ValidationInfo):
        base = _base_type(cls.model_fields[info.field_name].annotation) if info.field_name else None
        if value is None:
            return value  # optional fields take None; pydantic refuses it for the others
        if base in (int, float) and isinstance(value, bool):
            raise ValueError(f"must be a number, not {str(value).lower()}")
        if base is bool and not isinstance(value, bool):
            words = {"true": True, "false": False, "1": True, "0": False}
            if not isinstance(value, str) or value.lower() not in words:
                raise ValueError("must be true or false")
            return words[value.lower()]
        return value


def nearest(name: str, choices) -> str | None:
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def suggestion(name: str, choices) -> str:
    """' (did you mean X?)' for the nearest valid name, or ''."""
    close = nearest(name, choices)
    return f" (did you mean {close}?)" if close else ""


M = typing.TypeVar("M", bound="SettingsModel")


def build(model: type[M], values: dict, where: str = "", prefix: str = "", hints=None) -> M:
    """A model from plain values; the first problem is one ConfigError naming the field.
    where: ' in [tag]' for unknown-field errors; prefix: 'nightly.' before field names;
    hints: name -> text appended for an unknown name (e.g. a command-line-only option)."""
    names = set(model.model_fields)
    unknown = sorted(set(values) - names)
    if unknown:
        hints = hints or (lambda _name: "")
        shown = ", ".join(f"{n}{hints(n) or suggestion(n, names)}" for n in unknown)
        raise ConfigError(f"unknown field(s){where}: {shown}")
    try:
        return model.model_validate(values)
    except pydantic.ValidationError as exc:
        raise ConfigError(describe_error(model, exc, prefix)) from None


def describe_error(model: type[pydantic.BaseModel], exc: pydantic.ValidationError, prefix: str = "") -> str:
    error = exc.errors()[0]
    if not error["loc"]:  # a rule between fields: its own words, its flags as a config file names them
        return _config_names(model, _rule(model, "", error), prefix)
    name = ".".join(str(p) for p in error["loc"] if not isinstance(p, int)) or "value"
    if error["type"] == "missing":
        return f"field {prefix}{name} is required"
    value = error.get("input")
    if value is None:
        return f"field {prefix}{name} must not be empty"
    shown = repr(list(value) if isinstance(value, tuple) else value)
    if isinstance(value, bool):  # as a config file writes it
        shown = str(value).lower()
    return f"field {prefix}{name} has a bad value: {shown} ({_rule(model, name, error)})"


def _rule(model: type[pydantic.BaseModel], name: str, error) -> str:
    field = model.model_fields.get(name.split(".")[0])
    base = _base_type(field.annotation) if field else None
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return "allowed: " + ", ".join(str(m.value) for m in base)
    if field is not None and error["type"] in BOUND_ERRORS:
        return "must be " + _bounds(field)
    if error["type"] in ("too_short", "string_too_short"):
        return "must not be empty"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message.replace("Input should be", "must be")


def _config_names(model: type[pydantic.BaseModel], text: str, prefix: str) -> str:
    """A rule's words name fields by their options (--group-column); in a config file
    (prefix 'nightly.split.') each such option is the key: nightly.split.group_column."""
    if not prefix:
        return text
    spelt: dict[str, str] = {}
    for name, field in model.model_fields.items():
        setting = next((m for m in field.metadata if isinstance(m, Setting)), None)
        for declared in option_flags(name, setting) if setting else ():
            for flag in declared.split("/"):
                spelt.setdefault(flag, prefix + name)
    return re.sub(r"(?<![\w-])--?[a-z][a-z0-9-]*", lambda m: spelt.get(m.group(0), m.group(0)), text)


BOUND_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def _bounds(field: FieldInfo) -> str:
    """A field's numeric constraints in words: '1 to 16', 'at least 1', 'more than 0'."""
    limits = {}
    for item in _metadata(field.metadata, field.annotation):
        for name in ("ge", "gt", "le", "lt"):
            if getattr(item, name, None) is not None:
                limits[name] = getattr(item, name)
    low = f"{limits['ge']:g}" if "ge" in limits else None
    high = f"{limits['le']:g}" if "le" in limits else None
    if low is not None and high is not None:
        return f"{low} to {high}"
    words = []
    if low is not None:
        words.append(f"at least {low}")
    if "gt" in limits:
        words.append(f"more than {limits['gt']:g}")
    if high is not None:
        words.append(f"at most {high}")
    if "lt" in limits:
        words.append(f"less than {limits['lt']:g}")
    return " and ".join(words)


def _metadata(metadata: list, annotation) -> list:
    """A field's constraints, also those inside an optional's Annotated arm (X | None)."""
    found = list(metadata)
    for arm in typing.get_args(annotation):
        if typing.get_origin(arm) is typing.Annotated:
            for item in typing.get_args(arm)[1:]:
                found += [item, *getattr(item, "metadata", [])]
    return found


def _base_type(annotation):
    """X for X, X | None, Annotated[X, ...]."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _base_type(args[0])
    return annotation


def base_type(field: FieldInfo):
    return _base_type(field.annotation)


def one_or_many(value):
    """A list setting given as one string (TOML `inputs = "a"`, one CLI value) is a list of one."""
    return [value] if isinstance(value, str) else value


def parse_storage_options(value) -> dict:
    """The one reader of fsspec storage options, for every command and config file: JSON
    text (the command line's --storage-options), a table, or None (none). Not an object
    is one error, the same for every command."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"must be a JSON object ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError('must be a JSON object, e.g. {"anon": true}')
    return value


STORAGE_OPTIONS_TEXT = "fsspec storage options as JSON"
# fsspec options: JSON text on the command line, a table in a config file.
StorageOptions = Annotated[
    dict,
    BeforeValidator(parse_storage_options),
    Field(default_factory=dict, description=STORAGE_OPTIONS_TEXT),
    Setting(KeyRole.NONE),
]


def default_text(field: FieldInfo, setting: Setting) -> str:
    """A field's default as the README's options table shows it."""
    if setting.default_text is not None:
        return setting.default_text
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined or value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (tuple, list)) and not value:
        return ""
    return f"`{json.dumps(value)}`" if isinstance(value, dict) else str(value)


def option_spellings(name: str, setting: Setting) -> str:
    """`--a/--b/-c EXT` as the README writes a field's options."""
    if setting.argument:
        return setting.metavar or name.upper()
    text = "/".join(option_flags(name, setting))
    return f"{text} {setting.metavar}" if setting.metavar else text


def example_toml(
    model: type[SettingsModel],
    section: str,
    examples: dict[str, str],
    header: str,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
) -> str:
    """An example config file: every field of the model in its [section], with its one-line
    description; `examples` gives TOML text for values worth showing, else the default is
    written (or, for a field with no default, the line is commented out)."""
    lines = [header.rstrip(), f"[{section}]"]
    for name, field, _setting in settings_fields(model):
        if name in skip or (only and name not in only):
            continue
        if name in examples:  # "# value": shown commented out, as an example of what to write
            example = examples[name]
            text = f"# {name} = {example[2:]}" if example.startswith("# ") else f"{name} = {example}"
        else:
            value = field.get_default(call_default_factory=True)
            text = f"# {name} = ..." if value is None else f"{name} = {_toml_value(value)}"
        lines.append(f"{text:<40} # {_one_line(field.description or '')}")
    return "\n".join(line for line in lines if line) + "\n"


def _toml_value(value) -> str:
    import tomli_w

    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, dict):  # an inline table
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _one_line(text: str) -> str:
    """A description's first clause as a TOML comment, without Markdown."""
    text = text.replace("`", "")
    text = re.split(r"; |\. (?=[A-Z])| \(see ", text)[0]
    if text.count("(") > text.count(")"):  # cut inside a parenthesis: leave it out
        text = text[: text.rfind("(")].rstrip()
    return text
