"""Issue 32, "one error path for every command": every command driven through the edges a
user hits (a read-only folder, a file where a folder goes and the reverse, each wrong kind
of folder as an input, an empty input) ends in ONE `error:` line naming the path and what
it is, exit 2, with nothing written, and before Ray starts.

Commands run in this process through the CLI's own entry point (pipeline.cli.main), with
Ray's start replaced by a failure, so a check that came after Ray would show. The
read-only cases need a folder this user cannot write: a chmod binds a plain user; root
may write anyway, so under root the folder is made a read-only bind mount of itself
(a read-only filesystem binds root too). Where root may not mount (a container without
the capability), those cases are skipped, by name, with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pipeline.cli import main

ROOT = os.geteuid() == 0


def _read_only(folder) -> bool:
    """Make `folder` read-only for this user: its mode, and for root (whom modes do not
    bind) a read-only bind mount of itself. False when root cannot mount."""
    folder.chmod(0o555)
    if not ROOT:
        return True
    mount = ["mount", "--bind", str(folder), str(folder)]
    remount = ["mount", "-o", "remount,bind,ro", str(folder)]
    for command in (mount, remount):
        if subprocess.run(command, capture_output=True).returncode:
            subprocess.run(["umount", str(folder)], capture_output=True)
            return False
    return True


def _read_only_or_skip(world) -> None:
    if not world["ro_binds"]:
        pytest.skip("runs as root without the right to mount: no folder is read-only to root")


@pytest.fixture(scope="module")
def world(tagged, demo_bundle, tmp_path_factory):
    """A real tag table, its dedup and split outputs, the parent of a multi-model pass (two
    tables), a folder of images, an empty folder, a file, a read-only folder."""
    from pipeline.corpus.dedup import run_dedup
    from pipeline.corpus.split import run_split

    table, corpus = tagged
    root = tmp_path_factory.mktemp("edges")
    run_dedup(str(table), str(root / "dedup"))
    run_split(str(table), str(root / "dedup"), str(root / "splits"))
    for name in ("wd", "cl"):
        shutil.copytree(table, root / "multi" / name)
    shutil.copytree(corpus / "images" / "red", root / "photos")
    (root / "empty").mkdir()
    (root / "afile").write_text("not a folder")
    (root / "page.html").mkdir()  # folders named as the files report and review write
    (root / "queue.jsonl").mkdir()
    (root / "ro").mkdir()
    binds = _read_only(root / "ro")
    paths = {
        "table": table,
        "bundle": demo_bundle,
        **{n: root / n for n in ("dedup", "splits", "multi", "photos", "empty", "afile", "ro")},
        **{n: root / n for n in ("page.html", "queue.jsonl")},
    }
    yield {**{k: str(v) for k, v in paths.items()}, "ro_binds": binds}
    if ROOT and binds:
        subprocess.run(["umount", str(root / "ro")], check=True)
    (root / "ro").chmod(0o755)


def _tree(*roots: str) -> dict:
    """Every file and folder under the roots, with its size and mtime: what 'nothing
    written' compares."""
    found = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                stat = os.stat(os.path.join(folder, name))
                found[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


def _refused(monkeypatch, capsys, world, args: list[str], *words: str) -> str:
    """Run `tagpipe ARGS`; assert one stderr line `error: ...` holding each word, exit 2,
    nothing written anywhere in the world, and Ray never asked to start."""
    import pipeline.core.ray_session as ray_session
    import pipeline.job.tag_job as tag_job

    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray was started before the check")

    monkeypatch.setattr(tag_job, "ensure_ray", no_ray)
    monkeypatch.setattr(ray_session, "ensure_ray", no_ray)  # those that import it when they run
    monkeypatch.setattr(sys, "argv", ["tagpipe", *args])
    watched = [os.path.dirname(world["dedup"]), world["table"]]
    before = _tree(*watched)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stopped.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert _tree(*watched) == before, "something was written"
    return lines[0]


def _commands(world: dict, out_folder: str, out_file: str) -> dict[str, list[str]]:
    """Every command that writes, with its output at the given places (a folder for those
    that write folders, a file for those that write one) and valid inputs."""
    w = world
    return {
        "tag": ["tag", "-i", w["photos"], "-o", out_folder, "-m", w["bundle"]],
        "dedup": ["dedup", "--tags", w["table"], "-o", out_folder],
        "split": ["split", "--tags", w["table"], "--dedup", w["dedup"], "-o", out_folder],
        "audit": ["audit", "--train", w["table"], "--eval", w["table"], "-o", out_folder],
        "report": ["report", "--tags", w["table"], "-o", out_file + ".html"],
        "export": ["export", "--tags", w["table"], "-o", out_folder, "--format", "jsonl"],
        "review": ["review", "--tags", w["table"], "--kind", "ood", "--out", out_file + ".jsonl"],
    }


COMMANDS = ("tag", "dedup", "split", "audit", "report", "export", "review")


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_under_a_file_is_one_line(command, world, monkeypatch, capsys):
    under = os.path.join(world["afile"], "out")
    args = _commands(world, under, under)[command]
    _refused(monkeypatch, capsys, world, args, world["afile"], "is a file, not a folder")


@pytest.mark.parametrize("command", ("tag", "dedup", "split", "audit", "export"))
def test_a_file_given_as_the_output_folder_is_one_line(command, world, monkeypatch, capsys):
    args = _commands(world, world["afile"], world["afile"])[command]
    _refused(monkeypatch, capsys, world, args, f"--output {world['afile']} is a file, not a folder")


@pytest.mark.parametrize(("command", "folder"), [("report", "page.html"), ("review", "queue.jsonl")])
def test_a_folder_given_as_the_output_file_is_one_line(command, folder, world, monkeypatch, capsys):
    args = _commands(world, "", "")[command]
    args[-1] = world[folder]
    _refused(monkeypatch, capsys, world, args, f"{world[folder]} is a folder, not a file")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_output_folder_is_one_line(command, world, monkeypatch, capsys):
    _read_only_or_skip(world)
    inside = os.path.join(world["ro"], "out")
    args = _commands(world, world["ro"], inside)[command]
    _refused(monkeypatch, capsys, world, args, world["ro"], "read-only")


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_under_a_read_only_parent_is_one_line(command, world, monkeypatch, capsys):
    _read_only_or_skip(world)
    inside = os.path.join(world["ro"], "new", "out")
    args = _commands(world, inside, inside)[command]
    _refused(monkeypatch, capsys, world, args, "cannot create it", world["ro"], "read-only")


# Each command that reads a tag table, given each wrong kind of folder as --tags.
TAKES_TAGS = ("dedup", "split", "report", "export", "review")
WRONG_TABLES = {
    "dedup": "is a dedup output, not a tag table",
    "splits": "is a split output, not a tag table",
    "photos": "is a folder of images, not a tag table: tag it first",
    "multi": "holds tag tables cl/ and wd/ (one per model): pass one of them",
    "missing": "no such file or folder",
    "empty": "is an empty folder, not a tag table",
}


@pytest.mark.parametrize("command", TAKES_TAGS)
@pytest.mark.parametrize("kind", sorted(WRONG_TABLES))
def test_the_wrong_kind_of_folder_as_tags_is_named(command, kind, world, tmp_path, monkeypatch, capsys):
    given = world.get(kind, str(tmp_path / "nope"))
    args = _commands(world, str(tmp_path / "out"), str(tmp_path / "out"))[command]
    args[args.index("--tags") + 1] = given
    _refused(monkeypatch, capsys, world, args, f"--tags {given}", WRONG_TABLES[kind])
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("option", "kind", "words"),
    [
        ("--train", "dedup", "is a dedup output, not a tag table or split output"),
        ("--eval", "multi", "holds tag tables cl/ and wd/"),
        ("--train", "photos", "is a folder of images"),
    ],
)
def test_audit_sides_of_the_wrong_kind_are_named(option, kind, words, world, tmp_path, monkeypatch, capsys):
    args = _commands(world, str(tmp_path / "out"), "")["audit"]
    args[args.index(option) + 1] = world[kind]
    _refused(monkeypatch, capsys, world, args, f"{option} {world[kind]}", words)


@pytest.mark.parametrize(
    ("command", "option", "kind", "words"),
    [
        ("split", "--dedup", "table", "is a tag table, not a dedup output: run tagpipe dedup --tags"),
        ("split", "--dedup", "splits", "is a split output, not a dedup output"),
        ("report", "--dedup", "splits", "is a split output, not a dedup output"),
        ("report", "--split", "dedup", "is a dedup output, not a split output"),
        ("report", "--split", "table", "is a tag table, not a split output"),
    ],
)
def test_the_wrong_kind_as_dedup_or_split_is_named(
    command, option, kind, words, world, tmp_path, monkeypatch, capsys
):
    args = _commands(world, str(tmp_path / "out"), str(tmp_path / "out"))[command]
    if option in args:
        args[args.index(option) + 1] = world[kind]
    else:
        args += [option, world[kind]]
    _refused(monkeypatch, capsys, world, args, f"{option} {world[kind]}", words)


@pytest.mark.parametrize(
    ("command", "output", "words"),
    [
        ("dedup", "table", "is a tag table, not a dedup output: write to a new folder"),
        ("dedup", "photos", "is a folder of images, not a dedup output"),
        ("split", "multi", "is a folder of tag tables, not a split output"),
        ("split", "dedup", "is a dedup output, not a split output"),
        ("audit", "splits", "is a split output, not an audit output"),
        ("tag", "dedup", "is a dedup output, not a tag table"),
        ("tag", "multi", "holds one tag table per model (cl, wd)"),
    ],
)
def test_an_output_holding_something_else_is_refused(command, output, words, world, monkeypatch, capsys):
    args = _commands(world, world[output], "")[command]
    _refused(monkeypatch, capsys, world, args, f"--output {world[output]}", words)


@pytest.mark.parametrize(("output", "words"), [("dedup", "is a dedup output"), ("afile", "is a file")])
def test_a_dry_run_refuses_what_the_run_would(output, words, world, monkeypatch, capsys):
    """A dry run must not plan (exit 0) a run the real command refuses."""
    args = [*_commands(world, world[output], "")["tag"], "--dry-run"]
    _refused(monkeypatch, capsys, world, args, f"--output {world[output]}", words)


def test_export_to_a_jsonl_name_writes_that_file(world, tmp_path, monkeypatch, capsys):
    target = tmp_path / "x.jsonl"
    args = ["export", "--tags", world["table"], "-o", str(target), "--format", "jsonl"]
    monkeypatch.setattr(sys, "argv", ["tagpipe", *args])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 0, capsys.readouterr().err
    assert target.is_file() and target.read_text().count("\n") > 1
    args = ["export", "--tags", world["table"], "-o", str(tmp_path / "c.jsonl"), "--format", "captions"]
    _refused(monkeypatch, capsys, world, args, "captions are one .txt per image under a folder")
    assert not (tmp_path / "c.jsonl").exists()


def test_an_empty_input_folder_is_refused_before_ray(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tags"
    args = ["tag", "-i", world["empty"], "-o", str(out), "-m", world["bundle"]]
    _refused(monkeypatch, capsys, world, args, world["empty"], "empty folder", "--allow-empty")
    assert not out.exists()


def test_an_input_of_only_tagpipe_outputs_points_at_the_input_not_allow_empty(
    world, tmp_path, monkeypatch, capsys
):
    """`tag -i DEDUP_OUTPUT`: the input is the mistake; --allow-empty would be the wrong fix."""
    args = ["tag", "-i", world["dedup"], "-o", str(tmp_path / "tags"), "-m", world["bundle"], "-q"]
    line = _refused(monkeypatch, capsys, world, args, "tagpipe_output", "give the folder of images as -i")
    assert "--allow-empty" not in line


def test_an_input_that_lists_nothing_commits_nothing_unless_allowed(
    ray_session, world, tmp_path, monkeypatch, capsys
):
    """A folder holding only sidecars lists no file: refused after the listing, nothing
    committed; with --allow-empty version 1 is committed with no rows."""
    from pipeline.table.tag_table import TagTable

    inputs = tmp_path / "captions-only"
    inputs.mkdir()
    (inputs / "a.txt").write_text("1girl")
    out = tmp_path / "tags"
    args = ["tag", "-i", str(inputs), "-o", str(out), "-m", world["bundle"], "-q"]
    monkeypatch.setattr(sys, "argv", ["tagpipe", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stopped.value.code == 2 and len(err) == 1, err
    assert "list no file to tag (left out: 1 sidecar); nothing was committed" in err[0]
    assert TagTable(str(out)).current() is None and not out.exists()
    monkeypatch.setattr(sys, "argv", ["tagpipe", *args, "--allow-empty"])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 0, capsys.readouterr().err
    current = TagTable(str(out)).current()
    assert current is not None and current.version == 1 and current.rows == 0
    for command in (["dedup", "-o", str(tmp_path / "d")], ["export", "-o", str(tmp_path / "e")]):
        monkeypatch.setattr(sys, "argv", ["tagpipe", command[0], "--tags", str(out), *command[1:], "-q"])
        with pytest.raises(SystemExit) as stopped:
            main()
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert stopped.value.code == 2 and len(err) == 1 and "holds no rows (an empty tag table)" in err[0], (
            err
        )


@pytest.mark.parametrize("command", ["report", "export", "dedup"])
@pytest.mark.parametrize("name", ["page.html", "tags.jsonl"])
def test_a_file_that_is_not_parquet_as_tags_is_named(command, name, world, tmp_path, monkeypatch, capsys):
    """An HTML page or a JSONL export given as --tags read as an empty table (exit 0)."""
    given = tmp_path / name
    given.write_text("<html></html>" if name.endswith("html") else '{"uri": "a.jpg"}\n')
    args = _commands(world, str(tmp_path / "out"), str(tmp_path / "out"))[command]
    args[args.index("--tags") + 1] = str(given)
    _refused(monkeypatch, capsys, world, args, f"--tags {given} is not a Parquet file")


@pytest.mark.parametrize(
    ("command", "kind", "words"),
    [
        ("vacuum", "dedup", "is a dedup output, not a tag table"),
        ("rethreshold", "splits", "is a split output, not a tag table"),
        ("compare-tags", "multi", "holds tag tables cl/ and wd/ (one per model): pass one of them"),
        ("rethreshold", "photos", "is a folder of images, not a tag table"),
    ],
)
def test_commands_on_a_tag_table_name_the_wrong_kind(
    command, kind, words, world, tmp_path, monkeypatch, capsys
):
    """The commands that change a tag table in place (rethreshold, compare-tags, vacuum)
    name what they were given instead."""
    (tmp_path / "source.csv").write_text("uri,tags\na.png,cat\n")
    args = {
        "vacuum": ["vacuum", "--tags", world[kind]],
        "rethreshold": ["rethreshold", "--tags", world[kind], "-m", world["bundle"]],
        "compare-tags": [
            "compare-tags",
            "--tags",
            world[kind],
            "-m",
            world["bundle"],
            "--source-tags",
            str(tmp_path / "source.csv"),
        ],
    }[command]
    _refused(monkeypatch, capsys, world, args, world[kind], words)


@pytest.mark.parametrize(
    ("key", "where", "words"),
    [
        ("splits_output", "afile", "is a file, not a folder"),
        ("dedup_output", "table", "is a tag table, not a dedup output"),
    ],
)
def test_a_nightly_checks_its_later_outputs_before_it_tags(
    key, where, words, world, tmp_path, monkeypatch, capsys
):
    """A splits folder that cannot be written is found before the tag step, not after it."""
    config = tmp_path / "nightly.toml"
    out = tmp_path / "tags"
    config.write_text(
        f'[tag]\ninputs = ["{world["photos"]}"]\noutput = "{out}"\nmodel = "{world["bundle"]}"\n'
        f'[nightly]\n{key} = "{world[where]}"\n'
    )
    _refused(monkeypatch, capsys, world, ["nightly", "-c", str(config)], f"{key} {world[where]}", words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nightly.toml"]


def test_a_local_error_that_slips_past_the_checks_is_one_line():
    """main()'s last line of defence: a local OSError naming its path (here wrapped, as a
    library re-raises it) is one line; anything else stays a traceback."""
    from pipeline.storage.writable import local_error_text

    try:
        try:
            raise PermissionError(13, "Permission denied", "/data/out/part.parquet")
        except OSError as exc:
            raise RuntimeError("write failed") from exc
    except RuntimeError as wrapped:
        assert local_error_text(wrapped) == "/data/out/part.parquet: permission denied"
    assert local_error_text(ValueError("no path here")) is None
    assert local_error_text(OSError("no filename")) is None
