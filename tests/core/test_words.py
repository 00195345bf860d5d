"""Counts read as English: "1 error", "1 file written", never "1 errors" (issue 32)."""

import re
from pathlib import Path

import pytest

from pipeline.core.words import counted
from pipeline.job.plan import Change
from pipeline.job.run_summary import RunSummary

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"
NOUNS = (
    "errors|files|rows|images|parts|tags|clusters|duplicates|leaks|tables|copies|edits|versions|thumbnails"
)
# a number then a plural noun inside an f-string's text: "{n} errors" (not "{n} of {m} rows")
BARE_COUNT = re.compile(r"\{[^{}]+\} (" + NOUNS + r")\b")
ALLOWED = {
    'f"{name} files are not supported',  # a format's name, not a count
    "{layout} images",  # a layout's name
    "{result.correct}/{result.checked} rows",  # a ratio: "33/33 rows match"
}


@pytest.mark.parametrize(
    "n,plural,spec,expected",
    [
        (1, "errors", "", "1 error"),
        (0, "errors", "", "0 errors"),
        (2, "files", "", "2 files"),
        (1, "label files", "", "1 label file"),
        (1, "copies", "", "1 copy"),
        (1, "matches", "", "1 match"),
        (1, "boxes", "", "1 box"),
        (1234, "rows", ",", "1,234 rows"),
        (1, "rows", ",", "1 row"),
    ],
)
def test_counted_is_singular_for_one(n, plural, spec, expected):
    assert counted(n, plural, spec) == expected


def test_a_run_with_one_error_says_one_error():
    line = RunSummary(
        run_id="r", output="out", change=Change.INCREMENTAL, images=1, errors=1, rows=1, version=1
    ).text()
    assert "1 image tagged" in line and "1 error:" in line and "(1 row)" in line
    assert not re.search(r"\b1 (images|errors|rows)\b", line), line


def test_no_message_counts_without_counted():
    """Every f-string of the package that puts a number before a plural noun goes
    through counted(), so a new message cannot print "1 errors" again."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bf[\"']", line) and BARE_COUNT.search(line):
                if not any(allowed in line for allowed in ALLOWED):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
