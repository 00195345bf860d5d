"""Set operations on integer id arrays that the corpus stages run on every row.

numpy 2.3+ answers a plain `np.unique(ids)` by hashing; on this project's arrays (int64
ids and codes, 1M long) that measured several times slower than sorting (docs/benchmarks.md,
'The nightly: 1% changed on 1M rows'), and a nightly calls it on whole-corpus arrays a
dozen times.
`np.unique(..., return_index=True)` and friends still sort and are not affected."""

from __future__ import annotations

import numpy as np


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """The distinct values of an integer array, ascending: np.unique's answer, by sorting."""
    ordered = np.sort(np.asarray(values).reshape(-1))
    if len(ordered) < 2:
        return ordered
    first = np.empty(len(ordered), bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]
