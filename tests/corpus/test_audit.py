"""Audit: finds every planted leak (exit 1) and none on a clean pair of sets (exit 0)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet as pq

from pipeline.corpus.audit import audit
from tests.helpers import run_cli


def _flip(h: int, bits: list[int]) -> int:
    for b in bits:
        h ^= 1 << int(b)
    return h


def _sets(rng, radius: int):
    train_hashes = [int(x) for x in rng.integers(0, 2**63, 3000, dtype=np.uint64)]
    eval_hashes = [int(x) for x in rng.integers(0, 2**63, 1000, dtype=np.uint64)]
    planted = {}
    for j in range(0, 2 * (radius + 3), 2):  # eval j is (j // 2) bits from a train image
        d = j // 2
        eval_hashes[j] = _flip(train_hashes[j * 7], list(rng.choice(64, d, replace=False)))
        planted[j] = d
    train_sha = [f"t{i}" for i in range(3000)]
    eval_sha = [f"e{j}" for j in range(1000)]
    eval_sha[999] = train_sha[5]  # the same bytes
    train_hashes[6] = eval_hashes[998] = 1 << 63  # a blank image on both sides: not a leak by hash
    return train_hashes, train_sha, eval_hashes, eval_sha, planted


def _table(prefix, hashes, sha):
    return pa.table(
        {
            "uri": [f"{prefix}/{i}.jpg" for i in range(len(hashes))],
            "sha256": sha,
            "phash": pa.array(hashes, pa.uint64()),
        }
    )


def test_audit_finds_exactly_the_eval_images_within_r():
    rng = np.random.default_rng(0)
    for radius in (2, 4, 6, 8):
        th, ts, eh, es, planted = _sets(rng, radius)
        leaks, report = audit(_table("train", th, ts), _table("eval", eh, es), radius)
        t = np.array(th, np.uint64)
        expected = {}
        for j, h in enumerate(eh):
            if h in (0, 1 << 63):
                continue
            d = int(np.bitwise_count(t[t != np.uint64(1 << 63)] ^ np.uint64(h)).min())  # brute force
            if d <= radius:
                expected[f"eval/{j}.jpg"] = d
        expected["eval/999.jpg"] = 0  # same sha256
        got = dict(zip(leaks.column("eval_uri").to_pylist(), leaks.column("distance").to_pylist()))
        assert got == expected, radius
        assert all(planted[j] <= radius for j in planted if f"eval/{j}.jpg" in got)
        assert report.leaks == len(expected) and report.exact_leaks == 1
        assert sum(report.histogram.values()) == report.leaks


def _cli(*args):
    return run_cli("audit", *args)


def test_audit_command_exit_status_gates(tmp_path):
    th, ts, eh, es, _ = _sets(np.random.default_rng(1), 4)
    pq.write_table(_table("train", th, ts), tmp_path / "train.parquet")
    pq.write_table(_table("eval", eh, es), tmp_path / "eval.parquet")
    leaky = _cli(
        "--train",
        str(tmp_path / "train.parquet"),
        "--eval",
        str(tmp_path / "eval.parquet"),
        "--max-distance",
        "4",
        "-o",
        str(tmp_path / "report"),
    )
    assert leaky.returncode == 1 and "LEAKS FOUND" in leaky.stdout and "(same bytes)" in leaky.stdout
    assert pq.read_table(tmp_path / "report" / "leaks.parquet").num_rows >= 6
    clean_eval = _table(
        "eval",
        [int(x) for x in np.random.default_rng(2).integers(0, 2**63, 500, dtype=np.uint64)],
        [f"c{i}" for i in range(500)],
    )
    pa.csv.write_csv(
        clean_eval.set_column(
            2, "phash", pa.array([f"{h:016x}" for h in clean_eval.column("phash").to_pylist()])
        ),
        tmp_path / "clean.csv",
    )
    sides = ("--train", str(tmp_path / "train.parquet"), "--eval", str(tmp_path / "clean.csv"))
    # no threshold given is `auto`: the embedding was asked for, and these files have none
    unchecked = _cli(*sides, "--max-distance", "4")
    assert unchecked.returncode == 4, unchecked.stdout
    assert (
        "NOT FULLY CHECKED" in unchecked.stdout and "not checked by embedding 500 of 500" in unchecked.stdout
    )
    assert "clean" not in unchecked.stdout
    clean = _cli(*sides, "--max-distance", "4", "--embedding-threshold", "off")  # hashes only, as asked
    assert (
        clean.returncode == 0
        and "no leaks found by sha256 and phash" in clean.stdout
        and ": 0 of 500" in clean.stdout
    )
