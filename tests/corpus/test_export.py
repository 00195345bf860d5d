"""Exports round-trip: caption files list exactly the emitted tags; JSONL and Dart too."""

from __future__ import annotations

import json

import pytest

from pipeline.corpus.export import (
    CaptionOptions,
    TextOptions,
    aspect_bucket,
    caption_tags,
    dart_prompt,
    length_bucket,
    merge_caption,
)
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.table.tag_table import read_current
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def tagged(ray_session, demo_bundle, demo_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tags"
    run_tag_job(
        make_tag_config(
            inputs=[str(demo_corpus / "images")], output=str(out), model=str(demo_bundle), threshold=0.3
        )
    )
    return out


def _cli(*args):
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_caption_files_list_exactly_the_emitted_tags(tagged, demo_corpus, tmp_path):
    out = tmp_path / "captions"
    stdout = _cli(
        "export",
        "--tags",
        str(tagged),
        "--output",
        str(out),
        "--format",
        "captions",
        "--relative-to",
        str(demo_corpus / "images"),
    )
    rows = read_current(str(tagged), columns=["uri", "tags", "error"]).to_pylist()
    good = [r for r in rows if r["error"] is None]
    assert f"{len(good)} files written, {len(rows) - len(good)} error rows skipped" in stdout
    for row in good:
        rel = row["uri"][len(str(demo_corpus / "images")) + 1 :].rsplit(".", 1)[0] + ".txt"
        assert (out / rel).read_text().strip().split(", ") == row["tags"]
    assert len(list(out.rglob("*.txt"))) == len(good)
    assert any(len(r["tags"]) > 2 for r in good)


def test_jsonl_and_text_options(tagged, tmp_path):
    out = tmp_path / "jsonl"
    _cli(
        "export",
        "--tags",
        str(tagged),
        "--output",
        str(out),
        "--format",
        "jsonl",
        "--spaces",
        "--exclude",
        "high_contrast",
    )
    records = [json.loads(line) for line in (out / "tags.jsonl").read_text().splitlines()]
    table = {r["uri"]: r for r in read_current(str(tagged)).to_pylist() if r["error"] is None}
    assert len(records) == len(table)
    for record in records:
        row = table[record["uri"]]
        want = [t.replace("_", " ") for t in row["tags"] if t != "high_contrast"]
        assert (
            record["tags"] == want
            and record["rating"] == row["rating"]
            and len(record["scores"]) == len(want)
        )


def test_text_options_and_dart_prompt():
    text = TextOptions(spaces=True, escape_parentheses=True, exclude=frozenset({"solo"}))
    assert text.format(["long_hair", "^_^", "solo", "stripe_chan_(tagpipe)"]) == [
        "long hair",
        "^_^",
        "stripe chan \\(tagpipe\\)",
    ]
    assert [
        aspect_bucket(w, h) for w, h in ((2000, 1000), (1200, 1000), (1000, 1000), (1000, 1200), (1000, 2000))
    ] == [
        "ultra_wide",
        "wide",
        "square",
        "tall",
        "ultra_tall",
    ]
    assert [length_bucket(n) for n in (0, 10, 11, 25, 35, 41)] == [
        "very_short",
        "very_short",
        "short",
        "medium",
        "long",
        "very_long",
    ]
    row = {
        "tags_copyright": ["tagpipe_demo"],
        "tags_character": ["stripe_chan_(tagpipe)"],
        "tags_general": ["red_theme", "stripes"],
        "rating": "explicit",
        "width": 800,
        "height": 1200,
    }
    assert dart_prompt(row, TextOptions()) == (
        "<|bos|><copyright>tagpipe demo</copyright><character>stripe chan (tagpipe)</character>"
        "<|rating:explicit|><|aspect_ratio:tall|><|length:very_short|>"
        "<general>red theme, stripes<|identity:none|><|input_end|>"
    )


def test_dart_export_has_one_prompt_per_good_row(tagged, tmp_path):
    out = tmp_path / "dart"
    _cli("export", "--tags", str(tagged), "--output", str(out), "--format", "dart")
    prompts = [json.loads(line) for line in (out / "dart_prompts.jsonl").read_text().splitlines()]
    rows = {r["uri"]: r for r in read_current(str(tagged)).to_pylist() if r["error"] is None}
    assert {p["uri"] for p in prompts} == set(rows)
    for p in prompts:
        assert p["prompt"] == dart_prompt(rows[p["uri"]], TextOptions())


ROW = {
    "tags": ["general", "1girl", "long_hair", "hatsune_miku_(vocaloid)", "smile", "solo", "masterpiece"],
    "tags_character": ["hatsune_miku_(vocaloid)"],
    "rating": "general",
    "quality": "masterpiece",
}


@pytest.mark.parametrize(
    "text,caption,expected",
    [
        (
            TextOptions(),
            CaptionOptions(),
            "general, 1girl, long_hair, hatsune_miku_(vocaloid), smile, solo, masterpiece",
        ),
        # kohya: --use_rating_tags_as_last_tag --character_tags_first --remove_underscore
        (
            TextOptions(spaces=True),
            CaptionOptions(rating="last", character_first=True),
            "hatsune miku (vocaloid), 1girl, long hair, smile, solo, masterpiece, general",
        ),
        # --use_rating_tags, --always_first_tags solo,1girl (in the order given), --caption_separator
        (
            TextOptions(),
            CaptionOptions(rating="first", always_first=("solo", "1girl", "absent_tag"), separator=" | "),
            "solo | 1girl | general | long_hair | hatsune_miku_(vocaloid) | smile | masterpiece",
        ),
        # --character_tag_expand, --undesired_tags in either spelling, --tag_replacement
        (
            TextOptions(spaces=True, exclude=frozenset({"long hair", "masterpiece"})),
            CaptionOptions(
                rating="omit", character_expand=True, replace=(("1girl", "one girl"), ("smile", "grin"))
            ),
            "one girl, hatsune miku, vocaloid, grin, solo",
        ),
        # expanded parts that repeat a tag are written once
        (
            TextOptions(escape_parentheses=True),
            CaptionOptions(character_expand=True, replace=(("solo", "vocaloid"),)),
            "general, 1girl, long_hair, hatsune_miku, vocaloid, smile, masterpiece",
        ),
    ],
)
def test_caption_options_give_the_expected_caption(text, caption, expected):
    assert caption.separator.join(caption_tags(ROW, text, caption)) == expected


def test_append_merges_without_repeating_and_options_are_checked():
    assert merge_caption("my_trigger, 1girl, solo\n", ["1girl", "smile", "my_trigger", "hat"], ", ") == [
        "my_trigger",
        "1girl",
        "solo",
        "smile",
        "hat",
    ]
    assert merge_caption("blue_theme, solo\n", ["blue theme", "smile"], ", ") == [
        "blue_theme",
        "solo",
        "smile",
    ]
    from pipeline.core.errors import TagpipeError

    for bad in (dict(rating="top"), dict(extension="txt"), dict(separator="  ")):
        with pytest.raises(TagpipeError):
            CaptionOptions(**bad)


def test_caption_export_options_from_the_command_line(tagged, demo_corpus, tmp_path):
    out = tmp_path / "kohya"
    root = str(demo_corpus / "images")
    rows = [r for r in read_current(str(tagged)).to_pylist() if r["error"] is None]
    first = rows[0]
    rel = first["uri"][len(root) + 1 :].rsplit(".", 1)[0]
    (out / rel).parent.mkdir(parents=True)
    (out / f"{rel}.caption").write_text("hand_written; " + first["tags"][0] + "\n")
    args = [
        "--rating",
        "last",
        "--separator",
        "; ",
        "--caption-extension",
        ".caption",
        "--append",
        "--always-first",
        "my_trigger",
    ]
    _cli(
        "export",
        "--tags",
        str(tagged),
        "--output",
        str(out),
        "--format",
        "captions",
        "--relative-to",
        root,
        *args,
    )
    merged = (out / f"{rel}.caption").read_text().strip().split("; ")
    new = caption_tags(first, TextOptions(), CaptionOptions(rating="last"))
    assert merged == ["hand_written", first["tags"][0], *[t for t in new if t != first["tags"][0]]]
    assert merged[-1] == first["rating"] and len(list(out.rglob("*.caption"))) == len(rows)
    assert not list(out.rglob("*.txt"))


def _small_table(path, uris):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "uri": u,
            "error": None,
            "tags": ["general", f"tag_{i}"],
            "tags_character": [],
            "rating": "general",
            "quality": None,
            "scores": [0.9, 0.8],
            "width": 10,
            "height": 10,
        }
        for i, u in enumerate(uris)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_exports_plan_before_they_write(tmp_path):
    from pipeline.core.errors import TagpipeError
    from pipeline.corpus.export import export_tags

    tags = _small_table(tmp_path / "t.parquet", ["/imgs/a.jpg", "/imgs/b.jpg", "/imgs/sub/c.jpg"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.txt").write_bytes(b"my own words, by hand\n")
    with pytest.raises(
        TagpipeError, match=r"1 of the 3 files to write already exists .*b\.txt.*nothing was written"
    ):
        export_tags(tags, str(out), "captions", relative_to="/imgs")
    assert (
        sorted(p.name for p in out.rglob("*")) == ["b.txt"]
        and (out / "b.txt").read_bytes() == b"my own words, by hand\n"
    )
    kept = export_tags(tags, str(out), "captions", relative_to="/imgs", existing="skip")
    assert (kept.written, kept.skipped_existing) == (2, 1) and (
        out / "b.txt"
    ).read_bytes() == b"my own words, by hand\n"
    assert (out / "a.txt").read_text() == "general, tag_0\n" and (
        out / "sub" / "c.txt"
    ).read_text() == "general, tag_2\n"
    replaced = export_tags(tags, str(out), "captions", relative_to="/imgs", existing="overwrite")
    assert replaced.written == 3 and (out / "b.txt").read_text() == "general, tag_1\n"
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # written atomically: no temp files left

    clash = _small_table(tmp_path / "c.parquet", ["/imgs/rocket.jpg", "/imgs/rocket.png", "/imgs/zz.jpg"])
    empty = tmp_path / "empty"
    with pytest.raises(
        TagpipeError, match=r"/imgs/rocket.jpg and /imgs/rocket.png would write the same caption file"
    ):
        export_tags(clash, str(empty), "captions", relative_to="/imgs")
    assert not empty.exists() or not list(empty.rglob("*"))  # a collision writes nothing at all

    export_tags(tags, str(tmp_path / "j"), "jsonl")
    with pytest.raises(TagpipeError, match="already exist"):
        export_tags(tags, str(tmp_path / "j"), "jsonl")


def test_each_format_is_one_writer_chosen_once(tmp_path, monkeypatch):
    """Every ExportFormat has a writer of its own in WRITERS, and export_tags does what
    that writer says: a writer swapped in for jsonl is the one that checks and writes."""
    from pipeline.core.errors import TagpipeError
    from pipeline.corpus import export
    from pipeline.corpus.export_text import ExportFormat

    assert set(export.WRITERS) == set(ExportFormat)
    assert all(writer.format == fmt for fmt, writer in export.WRITERS.items())
    assert len({type(writer) for writer in export.WRITERS.values()}) == len(ExportFormat)
    calls = []

    class Spy(export.JsonlWriter):
        def check_output(self, output):
            calls.append(("check", output))

        def write(self, job, relative_to):
            calls.append(("write", job.columns))

    monkeypatch.setitem(export.WRITERS, ExportFormat.JSONL, Spy())
    tags = _small_table(tmp_path / "t.parquet", ["/imgs/a.jpg"])
    export.export_tags(tags, str(tmp_path / "j"), "jsonl")
    assert [c[0] for c in calls] == ["check", "write"] and "scores" in calls[1][1]
    assert not (tmp_path / "j").exists()
    with pytest.raises(
        TagpipeError, match=r"^unknown export format 'csv'; choose one of captions, jsonl, dart$"
    ):
        export.export_tags(tags, str(tmp_path / "k"), "csv")


def test_export_option_conflicts_are_refused(tmp_path):
    done = run_cli("export", "--tags", "x", "-o", str(tmp_path), "--append", "--overwrite")
    assert done.returncode == 2 and "exclude each other" in done.stderr


def test_relative_to_may_be_a_relative_path(tmp_path, monkeypatch):
    """The README's kohya recipe names the image folder relatively (--relative-to train_data)."""
    from pipeline.corpus.export import export_tags

    (tmp_path / "train_data").mkdir()
    tags = _small_table(
        tmp_path / "t.parquet",
        [str(tmp_path / "train_data" / "a.jpg"), str(tmp_path / "train_data" / "s" / "b.jpg")],
    )
    monkeypatch.chdir(tmp_path)
    done = export_tags(tags, "train_data", "captions", relative_to="train_data")
    assert done.written == 2 and (tmp_path / "train_data" / "s" / "b.txt").read_text() == "general, tag_1\n"


def test_long_names_fit_any_extension_and_bad_captions_stop_before_writing(tmp_path):
    from pipeline.core.errors import TagpipeError
    from pipeline.corpus.export import MAX_NAME_BYTES, caption_path, export_tags

    for extension in (".txt", ".caption", ".a-long-extension"):
        name = caption_path("a/" + "x" * 300 + ".jpg", extension).split("/")[-1]
        assert len(name.encode()) <= MAX_NAME_BYTES and name.endswith(extension)
    tags = _small_table(tmp_path / "t.parquet", ["/imgs/a.jpg", "/imgs/b.jpg"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(TagpipeError, match="not UTF-8"):
        export_tags(tags, str(out), "captions", relative_to="/imgs", caption=CaptionOptions(append=True))
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


@pytest.mark.parametrize(
    ("row", "decided", "tags", "provenance"),
    [
        # no human tags: the model's, as they are
        ({"tags": ["a", "b"]}, {}, ["a", "b"], ["model", "model"]),
        # human tags beside the model's; the doubted one (y) left out
        (
            {"tags": ["a", "b"], "source_tags": ["b", "x", "y"], "likely_wrong": ["y"]},
            {},
            ["a", "b", "x"],
            ["model", "both", "source"],
        ),
        # a reviewer keeps the doubted y, drops the undoubted x and the model's a, and adds z
        (
            {"tags": ["a", "b"], "source_tags": ["b", "x", "y"], "likely_wrong": ["y"]},
            {"y": True, "x": False, "a": False, "z": True},
            ["b", "y", "z"],
            ["both", "source", "model"],
        ),
        # a repeated human tag counts once; rejecting a tag both gave removes it from both
        ({"tags": ["a"], "source_tags": ["a", "a", "b"]}, {"a": False}, ["b"], ["source"]),
    ],
)
def test_supplement_merge_rules(row, decided, tags, provenance):
    from pipeline.corpus.supplement import SupplementCounts, merge_tags

    assert merge_tags(row, decided, SupplementCounts()) == (tags, provenance)


def test_supplement_jsonl_keeps_provenance_beside_each_written_tag():
    from pipeline.corpus.supplement import Decisions, supplement_record, supplement_rows

    rows = [
        {
            "uri": "u",
            "tags": ["long_hair", "cat"],
            "scores": [0.9, 0.8],
            "source_tags": ["dog", "cat"],
            "likely_wrong": [],
            "width": 1,
            "height": 1,
        }
    ]
    merged, counts = supplement_rows(rows, Decisions({"u": {"dog": True}, "gone": {"x": True}}))
    assert (counts.source_tags_kept, counts.decisions_applied, counts.decisions_unmatched) == (2, 1, 1)
    text = TextOptions(spaces=True, exclude=frozenset({"cat"}))
    record = supplement_record(merged[0], lambda t: text.format([t])[0], text.exclude)
    assert (record["tags"], record["provenance"], record["scores"]) == (
        ["long hair", "dog"],
        ["model", "source"],
        [0.9, None],
    )
    assert record["reviewed"] == {"dog": "accept"}
