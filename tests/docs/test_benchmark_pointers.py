"""A benchmark figure lives in docs/benchmarks.md, and code points to its section as
"(docs/benchmarks.md, 'Section title')" (issue 33), so the figure cannot go stale in a
comment. Each such pointer must name a section that exists (its title, or the start of it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
POINTER = re.compile(r"docs/benchmarks\.md,\s*'(.+?)'\)")


def section_titles(markdown: str) -> list[str]:
    return [line.lstrip("#").strip() for line in markdown.splitlines() if line.startswith("#")]


def pointers(source: str) -> list[str]:
    """The section titles a source file points to, comment markers and line breaks
    inside a pointer taken out."""
    joined = re.sub(r"\s*\n\s*(#\s*)?", " ", source)
    return POINTER.findall(joined)


def dangling(files: list[Path], titles: list[str]) -> list[str]:
    return [
        f"{path.name}: {title!r}"
        for path in files
        for title in pointers(path.read_text())
        if not any(heading.startswith(title) for heading in titles)
    ]


def test_every_pointer_names_a_section():
    files = sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")])
    titles = section_titles((ROOT / "docs" / "benchmarks.md").read_text())
    assert sum(len(pointers(p.read_text())) for p in files) >= 5
    assert not dangling(files, titles)


def test_a_pointer_to_a_missing_section_is_found(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        '"""Fast (docs/benchmarks.md, \'The driver\'s\n    ceilings, after (issue 24)\')."""\n'
        "# slow (docs/benchmarks.md,\n# 'No such section')\n"
    )
    titles = ["The driver's ceilings, after (issue 24)"]
    assert pointers(source.read_text()) == ["The driver's ceilings, after (issue 24)", "No such section"]
    assert dangling([source], titles) == ["module.py: 'No such section'"]
