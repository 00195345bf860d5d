"""The `tagpipe` command, run in-process (tests/helpers.py run_cli): the demo (the
session's one `demo_run`) checked against the corpus's truth, and errors the command names.
Commands in processes of their own (signals, a terminal, Ray's start-up lines) are in
tests/cli/test_cli_output.py."""

from pipeline.demo.synthetic import load_expected
from pipeline.table.tag_table import read_current
from tests.helpers import run_cli, wd_bundle

_run = run_cli


def test_demo_command_tags_the_corpus_right(demo_run):
    result, workdir = demo_run, demo_run.workdir
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows match the corpus's known tags" in result.stdout
    expected = load_expected(workdir / "corpus")
    planted = sum(1 for entry in expected.values() if entry.duplicate_of)
    assert planted > 0
    assert (
        f"duplicates: {planted}/{planted} planted copies share their original's cluster, "
        f"{planted}/{planted} its split; 0 clusters mix kinds" in result.stdout
    )
    assert f"the audit found {planted}/{planted} planted leaks" in result.stdout
    table = read_current(str(workdir / "tags")).to_pylist()
    root = str(workdir / "corpus" / "images") + "/"
    assert len(table) == len(expected)
    for row in table:  # checked here independently of the demo's own check
        entry = expected[row["uri"][len(root) :]]
        if entry.broken:
            assert row["error"] and row["tags"] is None
        else:
            assert set(row["tags"]) == set(entry.tags) | {entry.rating, entry.quality}, row["uri"]


def test_mismatched_vocabulary_stops_before_any_image(tmp_path):
    bundle = wd_bundle(tmp_path / "wd", tags=12, vocab_size=11)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"not read: the model stops the run first")
    result = _run(
        "tag",
        "--input",
        str(tmp_path / "images"),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(bundle),
    )
    assert result.returncode == 2
    assert "has 12 tags but selected_tags.csv lists 11" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_model_inspect_command(tmp_path):
    bundle = wd_bundle(tmp_path / "wd")
    result = _run("model", "inspect", str(bundle))
    assert (
        result.returncode == 0 and "profile:     wd_v3" in result.stdout and "model sha256:" in result.stdout
    )


def test_threshold_option_errors_name_the_option_or_field(tmp_path, demo_bundle):
    from tests.helpers import joytag_bundle

    bad = _run(
        "rethreshold",
        "--tags",
        str(tmp_path),
        "--model",
        str(demo_bundle),
        "--output",
        str(tmp_path / "o"),
        "--category-threshold",
        "general",
    )
    assert bad.returncode == 2 and "--category-threshold 'general': expected CATEGORY=VALUE" in bad.stderr
    bad = _run(
        "rethreshold",
        "--tags",
        str(tmp_path),
        "--model",
        str(demo_bundle),
        "--output",
        str(tmp_path / "o"),
        "--max-tags",
        "0",
    )
    assert bad.returncode == 2 and "field max_tags" in bad.stderr
    joy = joytag_bundle(tmp_path / "joy")
    bad = _run("tag", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(joy), "--per-tag-thresholds")
    assert bad.returncode == 2 and "per_tag_thresholds" in bad.stderr
