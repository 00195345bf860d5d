"""Every `#anchor` link in README.md and docs/*.md leads to a heading (GitHub's slugs),
in the same file or the one it names; and the README reads in a terminal (issue 32)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s#]*)#([^)\s]+)\)")
MAX_LINE = 200


def _outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links kept as their text, lower case, punctuation
    other than '-' and '_' dropped, spaces as '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The file's heading anchors; a repeated heading's are -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in _outside_code(path.read_text(encoding="utf-8")):
        match = re.match(r"#{1,6} +(.+?) *#*$", line)
        if match:
            base = slug(match.group(1))
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


def test_slug_follows_github():
    assert slug("Source tags: where humans and the model disagree") == (
        "source-tags-where-humans-and-the-model-disagree"
    )
    assert slug("Options of `dedup`, split & audit (issue 32)") == "options-of-dedup-split--audit-issue-32"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_anchor_link_resolves(path):
    broken = []
    for line in _outside_code(path.read_text(encoding="utf-8")):
        for target, anchor in LINK.findall(line):
            if "://" in target:
                continue
            linked = (path.parent / target).resolve() if target else path
            if not linked.is_file() or anchor not in anchors(linked):
                broken.append(f"{target}#{anchor}")
    assert not broken, f"{path.name}: links to no heading: {broken}"


def test_readme_lines_fit_a_terminal():
    """Tables included: a long explanation goes in prose under its table."""
    long = [
        f"README.md:{n}: {len(line)} characters"
        for n, line in enumerate((ROOT / "README.md").read_text(encoding="utf-8").splitlines(), 1)
        if len(line) > MAX_LINE
    ]
    assert not long, "\n".join(long)
