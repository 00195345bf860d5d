"""`tagpipe report` (issue 12): the demo's report rendered in headless Chromium, and its
figures checked against the tables it summarises."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.corpus.report import build_report
from pipeline.corpus.report_figures import MAX_ERRORS
from pipeline.table.tag_table import read_current

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
SECTIONS = ["summary", "drift", "tags", "scores", "ood", "duplicates", "splits", "errors"]
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="headless Chromium not installed (.ci/run installs Debian's chromium)",
)


def _chromium(*args: str, page) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        *args,
        f"file://{page}",
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(page.parent)}
    )


def console_errors(stderr: str) -> list[str]:
    """What the page printed to its console, as Chromium logs it (errors and uncaught exceptions)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def demo(demo_run):
    """The session's one demo run (tests/conftest.py): read here, never changed."""
    assert demo_run.returncode == 0, demo_run.stderr[-3000:]
    return demo_run


@needs_chromium
def test_demo_report_renders_with_every_section_and_no_console_errors(demo, tmp_path):
    assert CHROMIUM, "CI must have headless Chromium"
    page = demo.report
    text = page.read_text()
    assert (
        not re.search(r"""(src|href)=['"]?(https?:)?//""", text)
        and "<script" not in text
        and "<link" not in text
    )  # nothing to fetch
    screenshot = tmp_path / "report.png"
    shot = _chromium("--window-size=1280,4000", f"--screenshot={screenshot}", page=page)
    assert screenshot.exists(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("L"), np.float32)
    background = np.median(pixels)
    assert (
        pixels.std() > 20 and (np.abs(pixels - background) > 40).mean() > 0.05
    )  # not blank: text, bars, thumbnails
    assert console_errors(shot.stderr) == []

    dom = _chromium("--dump-dom", page=page)
    assert console_errors(dom.stderr) == []
    for key in SECTIONS:
        assert f'id="{key}"' in dom.stdout, key
    thumbnails = re.findall(r'<img src="data:image/jpeg;base64,', dom.stdout)
    assert len(thumbnails) >= 12  # the most out-of-distribution images and a duplicate strip


@needs_chromium
def test_the_console_check_catches_a_script_error(tmp_path):
    assert CHROMIUM
    page = tmp_path / "bad.html"
    page.write_text("<html><body><p>x</p><script>throw new Error('boom')</script></body></html>")
    assert any("boom" in line for line in console_errors(_chromium("--dump-dom", page=page).stderr))


def test_report_figures_match_the_tables(demo):
    """Counts in the page are the table's: every tag's frequency, error kinds and rows,
    the most out-of-distribution images in order, the split sizes."""
    import json

    text = demo.report.read_text()
    rows = read_current(str(demo.tags_dir)).to_pylist()
    assert f">{len(rows)}</div><div>images<" in text
    general = Counter(t for r in rows for t in (r["tags_general"] or []))
    section = text[text.index("id='tags'") : text.index("id='scores'")]
    for tag, count in general.most_common(5):
        assert re.search(rf">{re.escape(tag)}</text><rect [^>]*/><text [^>]*>{count}</text>", section), tag
    kinds = Counter(r["error_kind"] for r in rows if r["error_kind"])
    for kind, count in kinds.items():
        assert f"<td>{kind}</td><td>{count}</td>" in text
    errors = text[text.index("id='errors'") :]
    assert sorted(re.findall(r"<tr><td>([^<]+)</td><td>[a-z_]+</td>", errors)) == sorted(
        r["uri"] for r in rows if r["error_kind"]
    )
    ood = sorted(
        ((r["ood_distance"], r["uri"]) for r in rows if r["ood_distance"] is not None), reverse=True
    )[:12]
    shown = re.findall(
        r"<figure title='([^']+)'>.*?<figcaption>([0-9.]+)</figcaption>",
        text[text.index("id='ood'") : text.index("id='duplicates'")],
    )
    assert [u for u, _ in shown] == [u for _, u in ood] and [float(d) for _, d in shown] == [
        round(d, 2) for d, _ in ood
    ]
    sizes = json.loads((demo.workdir / "splits" / "_report.json").read_text())["sizes"]
    splits = text[text.index("id='splits'") : text.index("id='errors'")]
    for name, size in sizes.items():
        assert re.search(rf">{name}</text><rect [^>]*/><text [^>]*>{size}</text>", splits)


def test_error_list_is_cut_and_says_so(tmp_path):
    """More error rows than the page lists: it lists MAX_ERRORS and names the total."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = MAX_ERRORS + 50
    table = pa.table(
        {
            "uri": [f"/data/missing_{i:04d}.jpg" for i in range(n)],
            "error": ["FileNotFoundError: gone"] * n,
            "error_kind": ["not_found"] * n,
            "tags": pa.array([None] * n, pa.list_(pa.string())),
        }
    )
    (tmp_path / "tags").mkdir()
    pq.write_table(table, tmp_path / "tags" / "part-0.parquet")
    summary = build_report(str(tmp_path / "tags"), str(tmp_path / "r.html"))
    text = (tmp_path / "r.html").read_text()
    assert summary.errors == n and f"The first {MAX_ERRORS} of {n:,} error rows." in text
    assert text.count("missing_") == MAX_ERRORS and "<td>not_found</td><td>250</td>" in text


def test_report_command_and_benchmark_script(demo, tmp_path):
    import sys
    from pathlib import Path

    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "cli.html"
    result = CliRunner().invoke(
        app,
        [
            "report",
            "--tags",
            str(demo.tags_dir),
            "--dedup",
            str(demo.workdir / "dedup"),
            "-o",
            str(out),
            "--title",
            "cli run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"report: {out}" in result.output and "<title>cli run</title>" in out.read_text()
    assert (
        "id='duplicates'" in out.read_text() and "id='splits'" not in out.read_text()
    )  # only the sections given

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from report import main

    figures = main(["--rows", "3000", "--workdir", str(tmp_path / "bench")])
    assert figures["rows"] == 3000 and figures["seconds"] > 0 and figures["peak_rss_mib"] > 0


def test_a_folder_holding_tables_is_refused_not_read_as_every_version(demo, tmp_path):
    """The parent of a table (where several models' tables sit), or a table's data/ folder,
    holds every version's parts: a report of them would count rows several times."""
    from pipeline.core.errors import TagpipeError

    shutil.copytree(demo.tags_dir, tmp_path / "out" / "model-a")
    with pytest.raises(TagpipeError, match="holds tag tables model-a/ .*: pass one of them"):
        build_report(str(tmp_path / "out"), str(tmp_path / "r.html"))
    with pytest.raises(TagpipeError, match="not one table"):
        build_report(str(tmp_path / "out" / "model-a" / "data"), str(tmp_path / "r.html"))


@pytest.mark.parametrize("option", ["tags", "dedup", "split"])
def test_a_missing_input_is_one_line_naming_its_option(demo, tmp_path, option):
    """A path that does not exist stops the report before any work, naming the option."""
    from pipeline.core.errors import TagpipeError

    paths = {"tags": str(demo.tags_dir), option: str(tmp_path / "nope")}
    with pytest.raises(TagpipeError, match=f"--{option} .*nope: no such file or folder"):
        build_report(paths.pop("tags"), str(tmp_path / "r.html"), **paths)
