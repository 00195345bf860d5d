"""The table version in which each image first appeared: what tells an original from the
copies made of it later.

An edited copy (a text overlay, grey turned RGB, a higher-quality re-encode) often has as
many pixels and more bytes than its original, so "the best copy" picks the copy. The
copy, though, usually reaches the table after its original. A row's first version is the
oldest kept version with a part that holds its uri: versions are read oldest first and
each part once (a part kept by later versions adds nothing new), uri column only, and
only the uris asked about are looked up. Versions vacuumed away are not read: their rows
count from the oldest version kept.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import TagpipeError
from pipeline.table.tag_table import READ_THREADS, TagTable

log = logging.getLogger(__name__)


def first_versions(table: TagTable, version: int, uris: pa.Array, wanted: np.ndarray) -> np.ndarray:
    """Per row of `uris`, the first version (<= `version`) whose parts hold it; rows not
    `wanted` (and rows found in none) get `version` itself."""
    first = np.full(len(uris), version, np.int64)
    rows = np.flatnonzero(wanted)
    if not len(rows):
        return first
    target = uris.take(pa.array(rows))
    found = np.zeros(len(rows), bool)
    seen: set[str] = set()
    for v in sorted(v for v in table.versions() if v <= version):
        try:
            files = [f for f in table.snapshot(v).files if f not in seen]
        except (FileNotFoundError, TagpipeError):  # vacuumed meanwhile
            continue
        seen.update(files)
        with ThreadPoolExecutor(READ_THREADS) as pool:
            part_uris = [u for u in pool.map(lambda f: _uris(table, f), files) if u is not None]
        if not part_uris:
            continue
        held = pc.is_in(target, value_set=pa.concat_arrays(part_uris)).to_numpy(zero_copy_only=False)
        fresh = held & ~found
        first[rows[fresh]] = v
        found |= held
        if found.all():
            break
    return first


def _uris(table: TagTable, relative: str) -> pa.Array | None:
    try:
        return table.read_part(relative, ["uri"]).column("uri").combine_chunks().cast(pa.string())
    except FileNotFoundError:  # a part vacuum deleted: its version's rows count from a later one
        return None
