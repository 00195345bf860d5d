"""What a user sees: help that renders every word, -h and --version, progress on a
terminal and off it, Ctrl-C, --dry-run, --quiet and JSON logs, config mistakes named,
and the README's option table in step with the command."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image

from pipeline.cli import app
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
TAGPIPE = [sys.executable, "-m", "pipeline.cli"]
ENV = dict(os.environ, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", COLUMNS="100")


def _run(*args, timeout=300, **kw):
    """In a process of its own: for what only a process shows (Ray's start-up lines)."""
    return subprocess.run([*TAGPIPE, *args], capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


def _cli(*args):
    """In this process (tests/helpers.py run_cli), on the session's Ray where it needs one."""
    return run_cli(*args, env={"COLUMNS": "100"})


def _commands(group=None, prefix=()):
    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def _words(text: str) -> list[str]:
    return re.findall(r"[\w\[\]]+", text)


@pytest.mark.parametrize(
    "path,command", list(_commands()), ids=lambda v: "-".join(v) if isinstance(v, tuple) else ""
)
def test_help_renders_every_word_and_each_default_once(path, command):
    from typer.testing import CliRunner

    shown = CliRunner().invoke(app, [*path, "-h"], prog_name="tagpipe", env={"COLUMNS": "100"})
    assert shown.exit_code == 0, shown.output
    flat = " ".join(shown.output.split())
    for param in command.params:
        if getattr(param, "help", None):
            for word in _words(param.help):  # nothing eaten, brackets included
                assert word in flat, f"{' '.join(path)} {param.opts}: {word!r} missing from the help"
    for value in re.findall(r"\[default: ([^\]]+)\]", flat):
        assert flat.count(f"[{value}]") == 0, f"{' '.join(path)}: default {value} shown twice"


PYTHON_TYPE = re.compile(r"<(str|int|float|path|bool|list\[\w+\]|dict)>|\{[a-z_]+\}")


@pytest.mark.parametrize(
    "path,command", list(_commands()), ids=lambda v: "-".join(v) if isinstance(v, tuple) else ""
)
def test_help_names_each_value_and_marks_required_options(path, command):
    """Help says what a value is (URI, DIR, N), never a Python type (<str>, {directory});
    an option the command needs says [required], also where a config file may give it."""
    from typer.testing import CliRunner

    from pipeline.core.settings import option_flags, settings_fields
    from pipeline.corpus.review import ReviewSettings
    from pipeline.job.settings import TagJobConfig

    shown = CliRunner().invoke(app, [*path, "-h"], prog_name="tagpipe", env={"COLUMNS": "100"}).output
    assert not PYTHON_TYPE.findall(shown), f"{' '.join(path)}: {PYTHON_TYPE.findall(shown)}"
    options = shown[shown.index("Options:") :]
    blocks = re.split(r"\n  (?=-)", options)  # one block per option
    needed = {"tag": TagJobConfig, "review": ReviewSettings}.get(path[-1])
    flags = (
        [option_flags(n, s)[0] for n, i, s in settings_fields(needed) if i.is_required()] if needed else []
    )
    flags += [p.opts[-1] for p in command.params if p.required and p.opts[-1].startswith("--")]
    for flag in flags:
        block = next(b for b in blocks if re.search(rf"(^|, ){re.escape(flag)}\b", b))
        assert "[required" in " ".join(block.split()), f"{' '.join(path)} {flag}: not marked required"


@pytest.mark.parametrize("name", ["tag", "dedup", "split", "audit", "report", "export"])
def test_every_corpus_command_takes_the_logging_options(name):
    """-v, -q and --log-format mean the same on every command that runs a stage."""
    from typer.testing import CliRunner

    shown = CliRunner().invoke(app, [name, "-h"], prog_name="tagpipe", env={"COLUMNS": "100"}).output
    for flag in ("--verbose", "-v", "--quiet", "-q", "--log-format"):
        assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", shown), f"{name}: no {flag}"


def test_version_and_short_help():
    from pipeline import __version__

    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"tagpipe {__version__}"
    top = _cli("-h").stdout
    assert "Usage: tagpipe [OPTIONS] COMMAND" in top
    for listing in (top, _cli("model", "-h").stdout):  # every command's summary whole, at 100 columns
        commands = listing[listing.index("Commands:") :]
        assert "..." not in commands and "…" not in commands, commands


@pytest.mark.parametrize(
    "path,command", list(_commands()), ids=lambda v: "-".join(v) if isinstance(v, tuple) else ""
)
def test_readme_option_table_matches_the_command(path, command):
    """Every command and subcommand (walked here, not from the docs generator's list) is
    built from a settings model: each field an option or argument, any other option one
    of how the command runs; its README table is there, as generated, and names every
    option and argument, and nothing else."""
    from pipeline.cli.common import RUN_OPTIONS, command_settings
    from pipeline.cli.docs import options_table, table_markers

    name = " ".join(path)
    settings = command_settings(command)
    assert settings is not None, f"{name}: its options do not come from a settings model"
    fields = {field for field, _, _ in settings.fields()}
    params = {p.name for p in command.params}
    assert fields <= params, f"{name}: fields without an option: {sorted(fields - params)}"
    assert params - fields <= RUN_OPTIONS, (
        f"{name}: hand-written options: {sorted(params - fields - RUN_OPTIONS)}"
    )
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = table_markers(name)
    assert start in text and end in text, f"{name}: no options table in the README"
    table = text[text.index(start) + len(start) : text.index(end)]
    assert table.strip() == options_table(command, settings), (
        f"{name}: run python -m pipeline.cli.docs --write"
    )
    documented = set()  # the options' flags, and the arguments' names (a row of its own: `REPO_ID`)
    for cell in (line.split("|")[1].strip(" `") for line in table.splitlines() if line.startswith("| `")):
        documented |= {cell} if re.fullmatch(r"[A-Z][A-Z_]*", cell) else set()
        documented |= set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", cell))
    shown = set()
    for param in command.params:
        is_argument = isinstance(param, typer.core.TyperArgument)
        shown |= {param.metavar} if is_argument else {*param.opts, *param.secondary_opts}
    assert documented == shown, (sorted(shown - documented), sorted(documented - shown))


def test_inputs_in_a_config_are_relative_to_it_and_spelt_one_way(tmp_path, monkeypatch):
    """A string or a list, `cfg/../imgs` or `imgs` from the right folder: one uri form,
    so the same folder never looks like a different one (and a mass deletion)."""
    from pipeline.job.settings import load_config_file, make_tag_config

    (tmp_path / "cfg").mkdir()
    (tmp_path / "imgs").mkdir()
    as_list = tmp_path / "cfg" / "list.toml"
    as_list.write_text('[tag]\ninputs = ["../imgs"]\noutput = "../out"\nmodel = "m"\n')
    as_string = tmp_path / "cfg" / "string.toml"
    as_string.write_text('[tag]\ninputs = "../imgs"\noutput = "../out"\nmodel = "m"\n')
    monkeypatch.chdir(tmp_path)
    expected = (str(tmp_path / "imgs"),)
    assert make_tag_config(load_config_file(as_list)).inputs == expected
    assert make_tag_config(load_config_file(as_string)).inputs == expected
    assert make_tag_config(inputs=["imgs"], output="o", model="m").inputs == expected
    assert make_tag_config(inputs=["./cfg/../imgs/"], output="o", model="m").inputs == expected


def test_errors_are_json_lines_with_json_logs(tmp_path, demo_bundle):
    done = _cli(
        "tag",
        "-i",
        str(tmp_path / "nowhere"),
        "-o",
        str(tmp_path / "o"),
        "-m",
        str(demo_bundle),
        "--log-format",
        "json",
    )
    assert done.returncode == 2
    entry = json.loads(done.stderr.strip().splitlines()[-1])
    assert entry == {"level": "error", "message": f"input not found: {tmp_path / 'nowhere'}"}


@pytest.mark.parametrize(
    "text,message",
    [
        (
            '[tag]\ninputs = ["a"]\noutput = "o"\nmodel = "m"\n[nighlty]\nseed = 1\n',
            r"unknown table \[nighlty\] \(did you mean \[nightly\]\?\)",
        ),
        (
            'inputs = ["a"]\n[tag]\noutput = "o"\nmodel = "m"\n',
            r"key inputs is outside any table; it belongs under \[tag\]",
        ),
        (
            '[tag]\ninputs = ["a"]\noutput = "o"\nmodel = "m"\nactors = 2\n',
            r"unknown field\(s\) in \[tag\]: actors \(did you mean tagger_actors\?\)",
        ),
        (
            '[tag]\ninputs = ["a"]\noutput = "o"\nmodel = "m"\nbatchsize = 2\n',
            r"batchsize \(did you mean batch_size\?\)",
        ),
        (
            '[tag]\ninputs = ["a"]\noutput = "o"\nmodel = "m"\nlog_format = "json"\n',
            r"log_format \(--log-format is a command-line option only\)",
        ),
        (
            '[tag]\ninputs = ["a"]\noutput = "o"\nmodel = "m"\ncategory_thresholds = ["general=0.4"]\n',
            r"must be a table of category = probability",
        ),
    ],
)
def test_config_mistakes_are_named_with_a_suggestion(tmp_path, text, message):
    from pipeline.core.errors import ConfigError
    from pipeline.job.settings import load_config_file, make_tag_config

    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        make_tag_config(load_config_file(path))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("progress") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    (root / "broken.jpg").write_bytes(b"<html>404</html>")
    return root


def test_progress_lines_off_a_terminal(ray_session, folder, demo_bundle, tmp_path):
    done = _cli(
        "tag",
        "-i",
        str(folder),
        "-o",
        str(tmp_path / "t"),
        "-m",
        str(demo_bundle),
        "--progress-interval",
        "0.2",
        "--batch-size",
        "4",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "pipeline.core.progress: tagging:" in line]
    assert len(lines) >= 2, done.stderr[-2000:]
    assert re.search(r"tagging: 49/49 images \(100\.0%\), 1 error, [\d.]+ images/s, ETA 0:00:00$", lines[-1])
    assert all(re.search(r"\d+/49 images \([\d.]+%\)", line) for line in lines)


def test_progress_bar_on_a_terminal(folder, demo_bundle, tmp_path):
    """Run under a pseudo-terminal: the bar is redrawn in place with a rate and an ETA."""
    master, slave = pty.openpty()
    args = ["tag", "-i", str(folder), "-o", str(tmp_path / "t"), "-m", str(demo_bundle), "--batch-size", "4"]
    args += ["--edit-calibration-images", "0"]  # the bar is what is tested (calibration: ~20 s more)
    proc = subprocess.Popen(
        [*TAGPIPE, *args], stdin=slave, stdout=slave, stderr=slave, env=dict(ENV, TERM="xterm")
    )
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(master)
    text = output.decode("utf-8", "replace")
    assert proc.returncode == 0, text[-2000:]
    assert "tagging" in text and "images/s" in text and "ETA" in text, text[-2000:]
    counts = set(re.findall(r"(\d+)/49", text))
    assert "49" in counts and len(counts) >= 2, counts  # redrawn as it went, not only at the end
    assert "\r" in text or "\x1b[" in text  # drawn in place


def test_dry_run_prints_the_plan_and_writes_nothing(ray_session, folder, demo_bundle, tmp_path):
    out = tmp_path / "t"
    assert _cli("tag", "-i", str(folder), "-o", str(out), "-m", str(demo_bundle), "--dry-run").returncode == 0
    assert not out.exists()  # a dry run on a new table writes nothing at all
    assert _cli("tag", "-i", str(folder), "-o", str(out), "-m", str(demo_bundle), "-q").returncode == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    extra = tmp_path / "extra.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(extra)
    plan = _cli(
        "tag", "-i", str(folder), "-i", str(extra), "-o", str(out), "-m", str(demo_bundle), "--dry-run"
    )
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert re.search(
        r"dry run \(incremental\): 50 listed, 1 new, 0 changed, 0 deleted, 49 unchanged, 0 to retry",
        plan.stdout,
    )
    assert "would tag 1 image (" in plan.stdout and "commit version 2" in plan.stdout
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    same = _cli(
        "tag", "-i", str(folder), "-o", str(out), "-m", str(demo_bundle), "--dry-run", "--log-format", "json"
    )
    result = json.loads(same.stdout)
    assert result["change"] == "no change" and result["planned_version"] == 0 and result["to_tag"] == 0


def test_quiet_and_json_output(folder, demo_bundle, tmp_path):
    no_calibration = ("--edit-calibration-images", "0")  # not what this test is about (~20 s a run)
    quiet = _run(
        "tag", "-i", str(folder), "-o", str(tmp_path / "q"), "-m", str(demo_bundle), "-q", *no_calibration
    )
    assert quiet.returncode == 0
    assert "INFO" not in quiet.stderr and "pipeline." not in quiet.stderr, quiet.stderr[-2000:]
    assert quiet.stdout.startswith("run ") and quiet.stdout.count("\n") == 1
    logged = _run(
        "tag",
        *("-i", str(folder), "-o", str(tmp_path / "j"), "-m", str(demo_bundle)),
        *("--log-format", "json", *no_calibration),
    )
    assert logged.returncode == 0
    result = json.loads(logged.stdout)
    assert (
        result["result"] == "RunSummary"
        and result["rows"] == 49
        and result["errors_by_kind"] == {"not_an_image": 1}
    )
    entries = [json.loads(line) for line in logged.stderr.splitlines() if line.startswith("{")]
    assert any(e["logger"] == "pipeline.job.tag_job" and e["level"] == "info" for e in entries)
    assert "Token authentication" not in logged.stderr and "deprecated" not in logged.stderr


def test_ctrl_c_keeps_finished_parts_and_says_how_to_resume(ray_session, demo_bundle, tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(400):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.jpg", quality=90
        )
    out = tmp_path / "t"
    args = [
        "tag",
        "-i",
        str(folder),
        "-o",
        str(out),
        "-m",
        str(demo_bundle),
        "--rows-per-part",
        "32",
        "--batch-size",
        "8",
        "-q",
    ]
    proc = subprocess.Popen(
        [*TAGPIPE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    deadline = time.monotonic() + 240
    while not list(out.glob("data/*/part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, (
            proc.stderr.read()[-2000:] if proc.poll() is not None else "no part"
        )
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert (
        "interrupted: nothing was committed" in stderr
        and "running the same command again reuses them" in stderr
    )
    assert "Traceback" not in stderr
    assert not (out / "_current.json").exists()
    again = _cli(  # the rerun in this process: the signal is what needs a process of its own
        "tag", "-i", str(folder), "-o", str(out), "-m", str(demo_bundle), "--rows-per-part", "32", "-q"
    )
    assert again.returncode == 0, again.stderr[-2000:]
    reused = int(re.search(r"(\d+) reused from an interrupted run", again.stdout).group(1))
    assert reused >= 32 and "version 1 (400 rows)" in again.stdout


WORKER_LINE = """
import sys, time
import ray
from pipeline.cli.common import configure_output
from pipeline.core.ray_session import ensure_ray

configure_output()
ensure_ray(None)
print_line = ray.remote(lambda: print("a worker's line", file=sys.stderr, flush=True))
ray.get(print_line.remote())
time.sleep(3)  # the log monitor forwards the line
ray.shutdown()
"""


def test_worker_lines_carry_no_colour_codes_off_a_terminal():
    """What Ray's workers print (a traceback on Ctrl-C, a library's warning) reaches the
    command's stderr; in a log file it must be plain text, not Ray's colour escapes."""
    env = {k: v for k, v in ENV.items() if k != "RAY_COLOR_PREFIX"}
    done = subprocess.run(
        [sys.executable, "-c", WORKER_LINE], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "a worker's line" in done.stderr and "\x1b" not in done.stderr, done.stderr[-2000:]


def test_nightly_dry_run_prints_the_tag_plan_only(ray_session, folder, demo_bundle, tmp_path):
    config = tmp_path / "nightly.toml"
    out = tmp_path / "tags"
    config.write_text(
        f'[tag]\ninputs = ["{folder}"]\noutput = "{out}"\nmodel = "{demo_bundle}"\n[nightly]\nseed = 1\n'
    )
    plan = _cli("nightly", "-c", str(config), "--dry-run")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert plan.stdout.startswith("dry run (first run): 49 listed") and "would tag 49 images" in plan.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nightly.toml"]  # no table, dedup or splits
