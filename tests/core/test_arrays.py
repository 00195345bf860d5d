"""unique_sorted (pipeline/core/arrays.py) gives np.unique's answer on the id arrays the
corpus stages pass it: signed and unsigned, empty, one value, all equal, repeats."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.arrays import unique_sorted


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int32, np.uint16])
@pytest.mark.parametrize("size", [0, 1, 2, 7, 10_000])
def test_unique_sorted_equals_numpy(dtype, size):
    rng = np.random.default_rng(size)
    for high in (1, 3, 2**15):
        values = rng.integers(0, high, size).astype(dtype)
        got = unique_sorted(values)
        assert got.dtype == values.dtype and np.array_equal(got, np.unique(values))
    columns = rng.integers(0, 50, (size, 2))  # np.unique flattens; so does this
    assert np.array_equal(unique_sorted(columns), np.unique(columns))
