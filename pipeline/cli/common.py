"""What every command shares: the typer apps, the options several commands take (a
command's settings options are built from its settings model's fields: settings_options),
and how a command sets up logging, prints its result and fails.

Help is rendered without rich markup (rich_markup_mode=None), so every bracket in a
help text shows as written; defaults typer prints itself are not repeated in the text.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import re
import sys
import typing
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core

from pipeline import __version__
from pipeline.core.errors import TagpipeError
from pipeline.core.logs import LogFormat, Verbosity
from pipeline.core.settings import SettingsModel, base_type, default_text, option_flags, settings_fields

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
# What a value is, by parameter name, where its type alone would show `<str>` or `<path>`;
# other numbers show N (whole) or X, other text the option's name (--kind KIND).
VALUE_NAMES = {
    "aliases": "FILE",
    "caption_extension": "EXT",
    "config": "FILE",
    "dedup": "URI",
    "directory": "DIR",
    "dst": "DST",
    "embedding_threshold": "COSINE",
    "eval": "URI",
    "label_rule": "RULE",
    "model": "DIR",
    "model_file": "FILE",
    "out": "URI",
    "output": "URI",
    "previous": "URI",
    "profile": "PROFILE",
    "ray_address": "ADDRESS",
    "relative_to": "PREFIX",
    "revision": "REV",
    "run_id": "ID",
    "separator": "SEP",
    "source_tags": "FILE",
    "split": "URI",
    "src": "SRC",
    "storage_options": "JSON",
    "subfolder": "PATH",
    "tags": "URI",
    "tensor": "NAME",
    "title": "TEXT",
    "train": "URI",
    "vocabulary": "FILE",
    "vocabulary_format": "FORMAT",
    "workdir": "DIR",
}


class _NamedArgument(typer.core.TyperArgument):
    """An argument shown by what it is (`model pull REPO_ID DIR`), not as `{directory} <path>`."""

    def _usage_display_name(self) -> str:
        return str(self.metavar)

    def display_type_rich(self, ctx) -> str | None:
        return None


def _value_name(param) -> str:
    if param.name in VALUE_NAMES:
        return VALUE_NAMES[param.name]
    kind = param.bare_type()
    return {"int": "N", "float": "X", "Path": "PATH"}.get(kind, str(param.name).upper())


def name_values(command: Any) -> None:
    """Every option and argument of a command (and a group's commands) that would show a
    Python type in its help (<str>, {directory}) gets a name for its value instead (URI,
    DIR, N, ...); flags, choices (<text|json>) and options that name their own keep theirs."""
    for sub in getattr(command, "commands", {}).values():
        name_values(sub)
    for param in command.params:
        if not isinstance(param, typer.core.TyperOption | typer.core.TyperArgument):
            continue
        if param.metavar is not None or getattr(param, "is_flag", False) or param.type_descriptor.is_choice:
            continue
        if isinstance(param, typer.core.TyperArgument):
            param.__class__ = _NamedArgument
        param.metavar = _value_name(param)


class _Group(typer.core.TyperGroup):
    """tagpipe's command groups: every value in help named (name_values)."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        name_values(self)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=CONTEXT,
    help="Label image corpora with ONNX taggers on Ray.",
)
model_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=CONTEXT,
    help="Model bundles: pull, inspect, demo, expose-embedding, profile, fit-ood.",
    short_help="Model bundles: pull, inspect, demo, profile.",
)
app.add_typer(model_app, name="model")

# Options several commands share, defined once: how a command talks (pipeline/core/logs.py).
# Every other option of every command comes from a settings model's fields: see settings_options.
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Also Ray's and the libraries' INFO lines.")]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="Only warnings, errors and the result; no progress.")
]
LogFormatOption = Annotated[
    LogFormat,
    typer.Option("--log-format", help="text, or json: one JSON object per log line and for the result."),
]


# The options a command may declare itself rather than take from its settings model: how it
# runs and talks, not what it works on (tests/cli/test_cli_output.py holds every command to this).
RUN_OPTIONS = frozenset({"config", "dry_run", "verbose", "quiet", "log_format", "help"})


@dataclass(frozen=True)
class CommandSettings:
    """The settings model a command's options come from (only: the fields it takes)."""

    model: type[SettingsModel]
    only: tuple[str, ...] = ()

    def fields(self) -> list[tuple[str, Any, Any]]:
        return [f for f in settings_fields(self.model) if f[2].cli and (not self.only or f[0] in self.only)]


def command_settings(command: Any) -> CommandSettings | None:
    """The settings a click command's options come from (settings_options), or None."""
    return getattr(getattr(command, "callback", None), "command_settings", None)


def settings_options(
    model: type[SettingsModel], only: tuple[str, ...] = (), required: bool = False, elsewhere: str = ""
):
    """A command decorator: one option (or positional argument) per field of a settings
    model (or the `only` ones), spelt, typed and explained as the field says, each None
    when not given. The command receives the given ones as `given` (field name -> value),
    to lay over a config file's values: the model then validates them all at once.
    required: the fields without a default are required options (a command without a
    config file); else their help says so, and where else they may come from (`elsewhere`)."""
    settings = CommandSettings(model, only)
    fields = settings.fields()

    def decorate(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "given"]
        options = [
            _option(name, info, setting, required and info.is_required(), elsewhere)
            for name, info, setting in fields
        ]

        @functools.wraps(command)
        def run(**kwargs):
            given = {}
            for name, _info, setting in fields:
                value = kwargs.pop(name)
                if value is not None and value != []:
                    given[name] = setting.from_cli(value) if setting.from_cli else value
            return command(**kwargs, given=given)

        arguments = [p for p in options if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        parameters = arguments + own + [p for p in options if p not in arguments]
        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        run.command_settings = settings
        return run

    return decorate


def _option(name: str, info, setting, required: bool = False, elsewhere: str = "") -> inspect.Parameter:
    """A typer option for one settings field: bool flags in pairs, lists repeatable,
    tables as JSON (or the field's own items), enums as their values. A field without a
    default that the command line need not give (a config file may) is marked required
    in its help all the same."""
    base = base_type(info)
    flags = option_flags(name, setting)
    shown = default_text(info, setting)
    text = info.description + (f" (default: {shown})" if shown else "")
    if info.is_required() and not required and not setting.argument:
        text += f"  [required{': ' + elsewhere if elsewhere else ''}]"
    kind: Any
    if base is bool:
        kind = bool
    elif typing.get_origin(base) is tuple or setting.from_cli:
        kind = list[str]
    elif (
        base is dict
        or typing.get_origin(base) is dict
        or (isinstance(base, type) and issubclass(base, enum.Enum))
    ):
        kind = str
    else:
        kind = base
    plain = re.sub(r"\[([^]]+)\]\([^)]+\)", r"\1", text).replace("`", "")  # Markdown as plain text
    if setting.argument:  # positional: required unless it has a default
        argument = typer.Argument(... if info.is_required() else None, help=plain)  # named by name_values
        return inspect.Parameter(
            name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=argument, annotation=kind | None
        )
    default = ... if required else None
    option = typer.Option(default, *flags, help=plain, metavar=setting.metavar, show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tagpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Label image corpora with ONNX taggers on Ray."""


def configure_output(
    verbose: bool = False, quiet: bool = False, log_format: LogFormat = LogFormat.TEXT
) -> None:
    """How a command talks, set before it works: log level and format (which also decide
    how emit_result and fail write), and no Ray progress bars (tagpipe draws its own)."""
    from pipeline.core import logs

    if verbose and quiet:
        raise TagpipeError("--verbose and --quiet contradict each other: give one")
    verbosity = Verbosity.NORMAL
    if verbose:
        verbosity = Verbosity.VERBOSE
    elif quiet:
        verbosity = Verbosity.QUIET
    logs.configure(verbosity, log_format)  # also how emit_result and fail write
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # tagpipe draws its own
    except ImportError:  # pragma: no cover
        pass


def emit_result(result) -> None:
    """A command's result: its text line, or with --log-format json one JSON object."""
    from pipeline.core import logs
    from pipeline.table.tag_table import json_value

    if logs.json_output():
        is_record = is_dataclass(result) and not isinstance(result, type)
        if hasattr(result, "json_record"):  # a record whose JSON adds what it derives (its properties)
            payload = result.json_record()
        else:
            payload = asdict(result) if is_record else {"text": result.text()}
        typer.echo(json.dumps({"result": type(result).__name__, **payload}, default=json_value))
    else:
        typer.echo(result.text())


def run_interruptible(run, *args, **kwargs):
    """Run a job; on Ctrl-C print what was kept and how to resume, and exit 130."""
    from pipeline.job.tag_job import RunInterrupted

    try:
        return run(*args, **kwargs)
    except KeyboardInterrupt:  # before tagging began, or after (dedup, split, audit)
        from pipeline.core import logs

        text = (
            "interrupted: nothing more was committed; the table is at its last completed version. "
            "Run the same command again to go on."
        )
        typer.echo(json.dumps({"level": "error", "message": text}) if logs.json_output() else text, err=True)
        raise typer.Exit(130) from None
    except RunInterrupted as stopped:
        from pipeline.core import logs

        line = (
            json.dumps({"level": "error", "message": f"interrupted: {stopped}"})
            if logs.json_output()
            else f"interrupted: {stopped}"
        )
        typer.echo(line, err=True)
        raise typer.Exit(130) from None


def main() -> None:
    try:
        app(prog_name="tagpipe")
    except TagpipeError as exc:
        fail(str(exc))
    except Exception as exc:  # a store's or a local path's failure becomes one line, others tracebacks
        from pipeline.storage.filesystem import storage_error_text

        text = storage_error_text(exc, [a for a in sys.argv[1:] if "://" in a] + _config_uris(sys.argv[1:]))
        if text is None:
            from pipeline.storage.writable import local_error_text

            text = local_error_text(exc)  # a local path's failure, as one line too
        if text is None:
            raise
        fail(text)


def fail(text: str) -> None:
    """One line on stderr, `error: ...` (a JSON object with --log-format json), exit 2."""
    from pipeline.core import logs

    if logs.json_output():
        typer.echo(json.dumps({"level": "error", "message": text}), err=True)
    else:
        typer.echo(f"error: {text}", err=True)
    sys.exit(2)


def _config_uris(args: list[str]) -> list[str]:
    """URIs named in a --config/-c file, so storage errors can name their buckets."""
    import re

    for flag, value in zip(args, args[1:]):
        if flag in ("--config", "-c"):
            try:
                return re.findall(r"[a-z0-9]+://[^\s\"',\]]+", Path(value).read_text(encoding="utf-8"))
            except OSError:
                return []
    return []
