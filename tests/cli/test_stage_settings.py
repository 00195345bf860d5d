"""The settings of dedup, split, audit and export are defined once, as fields of their
settings models (pipeline/corpus/*_settings.py): the commands' options come from them,
a bad value is one line naming the field (on the command line and in a nightly config),
and the nightly's [nightly.dedup], [nightly.split] and [nightly.audit] tables reach the
stages. (The README's tables: tests/cli/test_settings.py and tests/cli/test_cli_output.py.)"""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.errors import ConfigError
from pipeline.core.settings import build, option_flags, settings_fields
from pipeline.corpus.audit_settings import AuditSettings
from pipeline.corpus.dedup_settings import DedupSettings
from pipeline.corpus.export_settings import ExportSettings
from pipeline.corpus.split_settings import SplitSettings
from pipeline.job.settings import load_nightly_config
from tests.helpers import run_cli

MODELS = {"dedup": DedupSettings, "split": SplitSettings, "audit": AuditSettings, "export": ExportSettings}
REQUIRED = {
    "dedup": ["--tags", "t", "-o", "o"],
    "split": ["--tags", "t", "--dedup", "d", "-o", "o"],
    "audit": ["--train", "a", "--eval", "b"],
    "export": ["--tags", "t", "-o", "o"],
}
# (command, options, the field's error) for each model: a range, a parse, an enum, a rule
BAD = [
    ("dedup", ["--max-distance", "33"], r"field max_distance has a bad value: 33 \(must be 0 to 32\)"),
    (
        "dedup",
        ["--embedding-threshold", "1.5"],
        r"field embedding_threshold has a bad value: '1.5' \(must be a cosine in \(0, 1\], auto or off\)",
    ),
    ("dedup", ["--storage-options", "{nope"], r"field storage_options has a bad value: '\{nope'"),
    (
        "split",
        ["--ratios", "train=0.5,val=0.6"],
        r"field ratios has a bad value: 'train=0.5,val=0.6' \(needs a train share, no negative shares, "
        r"and shares summing to 1\)",
    ),
    ("split", ["--ratios", "train"], r"field ratios has a bad value: 'train' \(expected NAME=FRACTION"),
    (
        "split",
        ["--min-val-positives", "-1"],
        r"field min_val_positives has a bad value: -1 \(must be at least 0\)",
    ),
    ("split", ["--group-column", "post"], r"^--group-column needs --metadata"),
    ("audit", ["--max-distance", "-1"], r"field max_distance has a bad value: -1 \(must be 0 to 32\)"),
    ("audit", ["--embedding-threshold", "often"], r"field embedding_threshold has a bad value: 'often'"),
    ("audit", ["--show", "-2"], r"field show has a bad value: -2 \(must be at least 0\)"),
    (
        "export",
        ["--format", "txt"],
        r"field format has a bad value: 'txt' \(allowed: captions, jsonl, dart\)",
    ),
    (
        "export",
        ["--rating", "top"],
        r"field rating has a bad value: 'top' \(allowed: inline, first, last, omit\)",
    ),
    (
        "export",
        ["--replace", "1girl"],
        r"field replace has a bad value: \['1girl'\] \('1girl': expected OLD=NEW",
    ),
    (
        "export",
        ["--caption-extension", "txt"],
        r"field caption_extension has a bad value: 'txt' \(expected an",
    ),
    ("export", ["--separator", " "], r"field separator has a bad value: ' ' \(needs a visible character"),
    ("export", ["--without-rating", "--rating", "last"], r"^--without-rating leaves the rating out"),
]


def _command(name: str):
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", MODELS)
def test_the_options_are_the_fields(name):
    """One option per field, spelt as its Setting says; none besides the command's own."""
    model = MODELS[name]
    params = {p.name: p for p in _command(name).params}
    own = {"help", "verbose", "quiet", "log_format"}
    fields = {field: setting for field, _, setting in settings_fields(model)}
    assert set(params) - own == set(fields)
    for field, setting in fields.items():
        declared = [f for spelling in option_flags(field, setting) for f in spelling.split("/")]
        assert set(declared) == set(params[field].opts + params[field].secondary_opts), field
        assert params[field].required == model.model_fields[field].is_required(), field


@pytest.mark.parametrize("name,args,message", BAD, ids=[f"{b[0]}{b[1][0]}" for b in BAD])
def test_a_bad_option_is_one_line_naming_its_field(name, args, message):
    result = CliRunner().invoke(app, [name, *REQUIRED[name], *args])
    assert isinstance(result.exception, ConfigError), result.output
    assert "\n" not in str(result.exception)
    assert re.search(message, str(result.exception)), str(result.exception)


def test_the_command_line_says_it_and_exits_2(tmp_path):
    done = run_cli("split", *REQUIRED["split"], "--ratios", "val=1")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == (
        "error: field ratios has a bad value: 'val=1' (needs a train share, no negative shares, "
        "and shares summing to 1)"
    )


def test_repeatable_and_paired_options_reach_the_settings(monkeypatch):
    """--exclude/--undesired and --replace repeat, --spaces/--underscores pair, -o and -f
    are short spellings: the export receives them as the fields say."""
    from pipeline.corpus import export

    seen = []
    monkeypatch.setattr(
        export, "run_export", lambda settings: seen.append(settings) or export.ExportSummary()
    )
    args = [
        "export",
        "--tags",
        "t",
        "-o",
        "o",
        "-f",
        "jsonl",
        "--spaces",
        "--exclude",
        "a",
        "--undesired",
        "b",
    ]
    args += ["--replace", "x=y", "--replace", "p=q", "--always-first", "z", "--without-rating"]
    assert CliRunner().invoke(app, args).exit_code == 0
    (settings,) = seen
    assert settings.exclude == ("a", "b") and settings.replace == (("x", "y"), ("p", "q"))
    assert settings.format == "jsonl" and settings.spaces and not settings.with_rating
    assert settings.caption_options().replace == (("x", "y"), ("p", "q"))
    assert settings.text_options().exclude == frozenset({"a", "b"})
    assert CliRunner().invoke(app, [*args[:5], "--underscores"]).exit_code == 0
    assert not seen[-1].spaces and seen[-1].with_rating and seen[-1].format == "captions"


def test_keywords_build_the_same_settings():
    """run_dedup(tags, output, **fields) and the like check keywords as the command does."""
    from pipeline.corpus.dedup import run_dedup

    with pytest.raises(ConfigError, match=r"field max_distance has a bad value: 40 \(must be 0 to 32\)"):
        run_dedup("t", "o", max_distance=40)
    with pytest.raises(
        ConfigError, match=r"unknown field\(s\): max_distanse \(did you mean max_distance\?\)"
    ):
        run_dedup("t", "o", max_distanse=4)
    split = build(SplitSettings, {"tags": "t", "dedup": "d", "output": "o", "previous": "old/"})
    assert split.previous == "old/splits.parquet" and split.ratios == {
        "train": 0.9,
        "val": 0.05,
        "test": 0.05,
    }
    assert (
        build(DedupSettings, {"tags": "t", "output": "o", "embedding_threshold": "off"}).embedding_threshold
        is None
    )


def _nightly(tmp_path, text: str):
    path = tmp_path / "nightly.toml"
    path.write_text(f'[tag]\ninputs = ["imgs"]\noutput = "{tmp_path / "tags"}"\nmodel = "m"\n{text}')
    return path


@pytest.mark.parametrize(
    "text,message",
    [
        ("[nightly.dedup]\nmax_distance = 40\n", r"field nightly.dedup.max_distance has a bad value: 40"),
        (
            '[nightly.dedup]\nembedding_threshold = "sometimes"\n',
            r"field nightly.dedup.embedding_threshold has a bad value: 'sometimes' \(must be a cosine",
        ),
        ('[nightly.split]\nratios = "val=1"\n', r"field nightly.split.ratios has a bad value: 'val=1'"),
        ("[nightly.split]\nratios = { train = 0.5 }\n", r"field nightly.split.ratios has a bad value"),
        ("[nightly.split]\nseed = true\n", r"field nightly.split.seed has a bad value: true"),
        (
            '[nightly.split]\ngroup_column = "post"\n',
            r"nightly.split.group_column needs nightly.split.metadata",
        ),
        (
            "[nightly.split]\nmin_countt = 3\n",
            r"unknown field\(s\) in \[nightly.split\]: min_countt \(did you mean",
        ),
        ("[nightly.audit]\nmax_distance = -1\n", r"field nightly.audit.max_distance has a bad value: -1"),
        ("[nightly.audit]\nshow = 3\n", r"unknown field\(s\) in \[nightly.audit\]: show"),
        (
            '[nightly]\nratios = "val=1"\n',
            r"field nightly.ratios has a bad value: 'val=1'",
        ),  # an older config
        ("[nightly]\nmax_distance = 33\n", r"field nightly.max_distance has a bad value: 33"),
        (
            "[nightly]\nseed = 1\n[nightly.split]\nseed = 2\n",
            r"nightly.seed and nightly.split.seed are one setting: give it once, in \[nightly.split\]",
        ),
        ("[nightly]\nsplit = 3\n", r"\[nightly.split\] must be a table"),
    ],
)
def test_a_bad_nightly_value_names_its_table_and_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_nightly_config(_nightly(tmp_path, text))
    assert "\n" not in str(caught.value)


def test_older_nightly_keys_are_read_into_their_tables(tmp_path):
    text = '[nightly]\nratios = "train=0.8,val=0.2"\nseed = 4\nmax_distance = 3\nembedding_threshold = 0.9\n'
    text += 'exclude = "old"\ngroup_column = ""\nmetadata = ""\nfail_on_leaks = false\n'
    cfg = load_nightly_config(_nightly(tmp_path, text))
    assert cfg.split.ratios == {"train": 0.8, "val": 0.2} and cfg.split.seed == 4
    assert (cfg.dedup.max_distance, cfg.split.max_distance, cfg.audit.max_distance) == (3, 3, 3)
    assert cfg.dedup.embedding_threshold == 0.9 and not cfg.fail_on_leaks
    assert cfg.split.exclude == (str(tmp_path / "old"),) and cfg.split.group_column is None


def test_the_radius_follows_dedup_unless_given(tmp_path):
    cfg = load_nightly_config(_nightly(tmp_path, "[nightly.dedup]\nmax_distance = 4\n"))
    assert (cfg.dedup.max_distance, cfg.split.max_distance, cfg.audit.max_distance) == (4, 4, 4)
    text = "[nightly.dedup]\nmax_distance = 4\n[nightly.audit]\nmax_distance = 8\n"
    cfg = load_nightly_config(_nightly(tmp_path, text))
    assert (cfg.split.max_distance, cfg.audit.max_distance) == (4, 8)


def test_the_nightly_tables_reach_the_stages(tmp_path, monkeypatch):
    """Each stage is called with settings built from its table and the nightly's paths."""
    from pipeline.corpus.audit import AuditReport
    from pipeline.corpus.dedup import DedupSummary
    from pipeline.corpus.embedding_threshold import EmbeddingThreshold
    from pipeline.corpus.split import SplitReport
    from pipeline.job import nightly
    from pipeline.job.plan import Change
    from pipeline.job.run_summary import RunSummary

    calls: dict[str, list] = {"dedup": [], "split": [], "audit": []}
    tag_output = str(tmp_path / "tags")
    summary = RunSummary(run_id="r", output=tag_output, change=Change.NO_CHANGE)
    monkeypatch.setattr(nightly, "run_tag_job", lambda cfg: summary)
    monkeypatch.setattr(
        nightly,
        "run_dedup",
        lambda s: calls["dedup"].append(s) or DedupSummary(embedding=EmbeddingThreshold(0.91, "auto")),
    )
    monkeypatch.setattr(nightly, "run_split", lambda s: calls["split"].append(s) or SplitReport())
    monkeypatch.setattr(nightly, "run_audit", lambda s: calls["audit"].append(s) or (None, AuditReport()))
    monkeypatch.setattr(nightly, "_report", lambda *args: ("", None))
    text = "[nightly.dedup]\nmax_distance = 5\nembedding_threshold = 0.93\nfull = true\n"
    text += "[nightly.split]\nratios = { train = 0.7, val = 0.3 }\nseed = 9\nstratify = true\nmin_count = 2\n"
    text += 'exclude = ["old_train"]\ngroup_column = "post"\nmetadata = "posts.csv"\n'
    text += "[nightly.audit]\nmax_distance = 2\n"
    cfg = load_nightly_config(_nightly(tmp_path, text))
    nightly.run_nightly(cfg)

    (dedup,) = calls["dedup"]
    assert (dedup.tags, dedup.output) == (tag_output, tag_output + "-dedup")
    assert (dedup.max_distance, dedup.embedding_threshold, dedup.full) == (5, 0.93, True)
    (split,) = calls["split"]
    assert (split.tags, split.dedup, split.output) == (
        tag_output,
        tag_output + "-dedup",
        tag_output + "-splits",
    )
    assert split.ratios == {"train": 0.7, "val": 0.3} and (split.seed, split.stratify, split.min_count) == (
        9,
        True,
        2,
    )
    assert split.exclude == (str(tmp_path / "old_train"),) and split.metadata == str(tmp_path / "posts.csv")
    assert split.group_column == "post" and split.max_distance == 5 and split.previous is None
    first, excluded = calls["audit"]
    splits = tag_output + "-splits/splits.parquet"
    assert (first.train, first.eval, first.dedup, first.tags) == (
        splits,
        splits,
        tag_output + "-dedup",
        tag_output,
    )
    assert excluded.train == str(tmp_path / "old_train") and excluded.dedup is None
    assert {first.max_distance, excluded.max_distance} == {2}
    assert {first.embedding_threshold, excluded.embedding_threshold} == {0.91}  # the cosine dedup used


def test_a_bad_ratios_table_is_shown_once_with_its_rule():
    """A config file's ratios table that does not sum to 1: the value once, then the rule."""
    with pytest.raises(ConfigError) as caught:
        build(SplitSettings, {"tags": "t", "dedup": "d", "output": "o", "ratios": {"train": 0.8, "val": 0.3}})
    message = str(caught.value)
    assert message.count("'val'") == 1 and "(needs a train share" in message
    assert "field ratios" in message
