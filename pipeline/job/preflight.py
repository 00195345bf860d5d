"""What `tagpipe tag` checks before it loads a bundle, lists an input or starts Ray: that
each local input is there, and not an empty folder, and that the output can be written
and is not another command's output. Each failure is one line naming the path (exit 2),
and nothing is written. After the listing, an input that lists no file at all is refused
the same way (empty_listing_text) unless --allow-empty.
"""

from __future__ import annotations

import os

from pipeline.core.errors import TagpipeError
from pipeline.storage.writable import check_writable
from pipeline.table.input_kinds import AUDIT, DEDUP, SPLIT, TABLES, expect_output, kind_of

ALLOW = "pass --allow-empty to commit it anyway"


def check_tag_paths(cfg) -> None:
    """Refuse, before any work, a missing or empty local input and an output that cannot
    take a table. A dry run is checked the same way (the checks write nothing): it must
    not plan a run that the real one refuses."""
    for uri in cfg.inputs:
        if "://" in uri:
            continue  # an object store's listing answers for itself
        if not os.path.exists(uri):
            raise TagpipeError(f"input not found: {uri}")
        if os.path.isdir(uri) and not cfg.allow_empty and _empty(uri):
            raise TagpipeError(f"input {uri} is an empty folder: nothing to tag, nothing committed; {ALLOW}")
    check_writable(cfg.output, "--output")
    found = kind_of(cfg.output, cfg.storage_options)
    if found.kind in (DEDUP, SPLIT, AUDIT):
        raise TagpipeError(f"--output {cfg.output} is {found.kind}, not a tag table: write to a new folder")
    if found.kind == TABLES and len(cfg.model) == 1:
        raise TagpipeError(
            f"--output {cfg.output} holds one tag table per model ({', '.join(found.tables)}), from a "
            "pass with several --model: give one of them, or the same models again"
        )


def check_nightly_paths(cfg) -> None:
    """A nightly's later outputs (dedup's, and the splits' with their audits) checked
    before its tag step: a read-only splits folder found after hours of tagging is late."""
    options = cfg.tag.storage_options
    for option, uri, own in (
        ("dedup_output", cfg.dedup_output, DEDUP),
        ("splits_output", cfg.splits_output, SPLIT),
    ):
        check_writable(uri, option)
        expect_output(uri, own, option, options)


def _empty(folder: str) -> bool:
    with os.scandir(folder) as entries:
        return not any(entries)


def empty_listing_text(inputs: tuple[str, ...], skipped: dict[str, int]) -> str:
    """Why nothing was committed when the inputs listed no file to tag."""
    left_out = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    own = bool(skipped) and set(skipped) == {"tagpipe_output"}  # the input is an output: a wrong -i
    return (
        f"the inputs ({', '.join(inputs)}) list no file to tag"
        + (f" (left out: {left_out})" if left_out else "")
        + "; nothing was committed: "
        + ("they hold only tagpipe's own outputs: give the folder of images as -i" if own else ALLOW)
    )
