"""The error-kind enum, the README's table and what the code emits agree."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.core.errors import RETRYABLE_ERROR_KINDS, ErrorKind
from pipeline.job.incremental import RETRY_ERROR_KINDS

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_table() -> dict[str, tuple[str, bool]]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Error kinds") :]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        match = re.match(r"\| `(\w+)` \| (.+?) \| (yes|no) \|$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3) == "yes")
    return rows


def test_readme_lists_every_kind_with_its_retry_flag():
    table = _readme_table()
    assert set(table) == {kind.value for kind in ErrorKind}
    for kind in ErrorKind:
        meaning, retried = table[kind.value]
        assert retried == kind.retryable, kind
        assert meaning.replace("`", "") == kind.meaning, kind


def test_retry_set_comes_from_the_enum():
    assert (
        tuple(sorted(RETRY_ERROR_KINDS))
        == RETRYABLE_ERROR_KINDS
        == ("model_timeout", "not_found", "read_error")
    )
