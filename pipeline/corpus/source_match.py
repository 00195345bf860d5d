"""Whether a source tags file speaks of this table's images: checked before any work.

A source file whose uris are written otherwise than the table's (relative paths against
absolute ones, another mount point or bucket prefix) matches almost nothing, and a check
that went on would commit a version whose label columns are empty. So a file whose uris
match fewer than `source_match` of its rows is refused, in one line that names the
likely cause with an example uri from each side, and nothing is committed.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import TagpipeError
from pipeline.core.words import counted

EXAMPLES = 2000  # table uris kept to explain a mismatch, and source uris tried against them


def check_source_match(
    path: str, source_uris: pa.Array, table_uris: Iterable[pa.Array], min_share: float
) -> int:
    """The source rows whose uri the table has; raises when fewer than min_share of the
    source's rows match (0: never). table_uris: the table's (or the listing's) uris, in pieces."""
    source_uris = source_uris.cast(pa.string())
    hit = np.zeros(len(source_uris), bool)
    examples: list[str] = []
    for uris in table_uris:
        hit |= pc.is_in(source_uris, value_set=uris.cast(pa.string())).to_numpy(zero_copy_only=False)
        if len(examples) < EXAMPLES:
            examples += uris.slice(0, EXAMPLES - len(examples)).to_pylist()
    matched, rows = int(hit.sum()), len(source_uris)
    if not rows or matched >= min_share * rows:
        return matched
    unmatched = source_uris.filter(pa.array(~hit)).slice(0, EXAMPLES).to_pylist()
    cause = likely_cause(unmatched, examples) if examples else "the table has no rows"
    raise TagpipeError(
        f"{path}: only {matched} of its {counted(rows, 'rows')} ({matched / rows:.0%}) "
        "name an image of the table, "
        f"under the {min_share:.0%} needed (--source-match); {cause}; nothing was committed"
    )


def likely_cause(source: list[str], table: list[str]) -> str:
    """Why source uris miss the table's, with an example of each side: a prefix (one
    source uri whose file name the table has, and what differs before it), relative
    paths against absolute ones, or simply different uris."""
    by_name: dict[str, str] = {}
    for uri in table:
        by_name.setdefault(posixpath.basename(uri), uri)
    for uri in source:
        match = by_name.get(posixpath.basename(uri))
        if match is not None:
            tail = _common_tail(uri, match)
            theirs, ours = uri[: len(uri) - len(tail)], match[: len(match) - len(tail)]
            kind = "relative paths" if _absolute(match) and not _absolute(uri) else "another prefix"
            return (
                f"likely {kind}: source {uri!r} is the table's {match!r} "
                f"with {theirs or 'no prefix'!r} in place of {ours!r}"
            )
    s, t = source[0], table[0]
    if _absolute(t) and not _absolute(s):
        return f"likely relative paths: the source has {s!r}, the table absolute uris such as {t!r}"
    return f"the uris differ: the source has {s!r}, the table uris such as {t!r}"


def _absolute(uri: str) -> bool:
    return uri.startswith("/") or "://" in uri


def _common_tail(a: str, b: str) -> str:
    """The longest common end of a and b that starts at a path segment."""
    a_parts, b_parts = a.split("/"), b.split("/")
    n = 0
    while n < min(len(a_parts), len(b_parts)) and a_parts[-1 - n] == b_parts[-1 - n]:
        n += 1
    return "/".join(a_parts[len(a_parts) - n :])
