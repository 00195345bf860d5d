"""The hash search's key sort: a stable argsort of a table's keys as uint64 against the
narrowest type that holds them (pipeline/corpus/hamming_search.key_order).

    python benchmarks/key_sort.py [--keys 5000000] [--rounds 5]

numpy's stable sort is a radix sort for 16-bit integers and a timsort above; this shows
what narrowing buys at 16 and at 32 bits. Prints the best round of each, interleaved so
that a loaded machine slows both alike.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def best_seconds(keys: np.ndarray, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        np.argsort(keys, kind="stable")
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=5_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for bits, narrow in ((16, np.uint16), (32, np.uint32)):
        wide = rng.integers(0, 2**bits, args.keys, dtype=np.uint64)
        narrowed = wide.astype(narrow)
        times = {"narrow": float("inf"), "uint64": float("inf")}
        for _ in range(args.rounds):
            times["narrow"] = min(times["narrow"], best_seconds(narrowed, 1))
            times["uint64"] = min(times["uint64"], best_seconds(wide, 1))
        print(
            f"{bits}-bit keys, {args.keys:,}: as {np.dtype(narrow).name} {times['narrow']:.3f} s, "
            f"as uint64 {times['uint64']:.3f} s, uint64 / narrow {times['uint64'] / times['narrow']:.2f}x"
        )


if __name__ == "__main__":
    main()
