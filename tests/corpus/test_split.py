"""Splits: whole families per split, ratios, determinism, growth with --previous
(bridges held out and reported, nothing moves, no leaks), --exclude."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.corpus.audit import run_audit
from pipeline.corpus.dedup import run_dedup
from pipeline.corpus.split import HELD_OUT, run_split

R = 6
RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}
TAGS = [f"tag_{i}" for i in range(30)]


def _flip(h: int, rng, bits: int) -> int:
    for b in rng.choice(64, bits, replace=False):
        h ^= 1 << int(b)
    return h


def _corpus(seed: int = 0, families: int = 800, pairs: int = 60):
    """rows (uri, phash, family, tags); families of 1-6 copies within 2 bits of a seed;
    `pairs` extra family pairs whose seeds are 8 bits apart (bridgeable later)."""
    rng = np.random.default_rng(seed)
    rows, seeds = [], {}
    for f in range(families + 2 * pairs):
        if f < families or (f - families) % 2 == 0:
            base = int(rng.integers(0, 2**63)) | 1
        else:
            base = _flip(seeds[f - 1], rng, 8)
        seeds[f] = base
        tags = list(rng.choice(TAGS, rng.integers(1, 5), replace=False))
        for c in range(int(rng.integers(1, 7))):
            rows.append(
                {
                    "uri": f"s3://b/f{f:04d}/c{c}.jpg",
                    "phash": base if c == 0 else _flip(base, rng, int(rng.integers(1, 3))),
                    "family": f,
                    "tags": tags,
                }
            )
    return rows, seeds


def _write_tags(rows, directory, shuffle_seed=None):
    directory.mkdir(parents=True, exist_ok=True)
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    rows = [rows[i] for i in order]
    table = pa.table(
        {
            "uri": [r["uri"] for r in rows],
            "sha256": [hashlib.sha256(r["uri"].encode()).hexdigest() for r in rows],
            "phash": pa.array([r["phash"] for r in rows], pa.uint64()),
            "phash_degenerate": [False] * len(rows),
            "width": [512] * len(rows),
            "height": [512] * len(rows),
            "error": pa.nulls(len(rows), pa.string()),
            "tags": [r["tags"] for r in rows],
        }
    )
    pq.write_table(table, directory / "part-0.parquet")
    return directory


def _split_of(path):
    return {r["uri"]: r["split"] for r in pq.read_table(path / "splits.parquet").to_pylist()}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    rows, seeds = _corpus()
    tags = _write_tags(rows, root / "tags")
    run_dedup(str(tags), str(root / "dedup"), max_distance=R)
    report = run_split(str(tags), str(root / "dedup"), str(root / "split"), ratios=RATIOS, seed=3)
    return root, rows, seeds, report


def test_families_stay_whole_ratios_hold_and_runs_repeat(first, tmp_path):
    root, rows, _, report = first
    split = _split_of(root / "split")
    family_splits = {}
    for r in rows:
        family_splits.setdefault(r["family"], set()).add(split[r["uri"]])
    assert all(len(s) == 1 for s in family_splits.values())  # no family crosses splits
    for (
        name,
        share,
    ) in RATIOS.items():  # documented tolerance: 4 binomial sigmas at cluster level, x1.2 for cluster sizes
        assert (
            abs(report.fractions[name] - share) <= 4 * np.sqrt(share * (1 - share) / report.clusters) * 1.2
        ), report.fractions
    shuffled = _write_tags(rows, tmp_path / "tags", shuffle_seed=1)
    run_dedup(str(shuffled), str(tmp_path / "dedup"), max_distance=R)
    run_split(str(shuffled), str(tmp_path / "dedup"), str(tmp_path / "split"), ratios=RATIOS, seed=3)
    assert pq.read_table(tmp_path / "split" / "splits.parquet").equals(
        pq.read_table(root / "split" / "splits.parquet")
    )
    assert set(report.zero_positive_tags) == {"train", "val", "test"} and report.label_deviation["val"] < 0.05


def test_growth_keeps_every_split_and_holds_out_bridges(first, tmp_path):
    root, rows, seeds, _ = first
    before = _split_of(root / "split")
    rng = np.random.default_rng(9)
    grown = list(rows)
    families = 800
    for f in rng.choice(families, 300, replace=False):  # new copies joining existing families
        grown.append(
            {
                "uri": f"s3://b/f{f:04d}/new.jpg",
                "phash": _flip(seeds[int(f)], rng, 1),
                "family": int(f),
                "tags": ["tag_0"],
            }
        )
    crossing = 0
    for k in range(60):  # bridges: 4 bits from each seed of a pair 8 bits apart
        a, b = families + 2 * k, families + 2 * k + 1
        diff = seeds[a] ^ seeds[b]
        bits = [i for i in range(64) if diff >> i & 1][:4]
        bridge = seeds[a]
        for i in bits:
            bridge ^= 1 << i
        grown.append({"uri": f"s3://b/bridge{k:02d}.jpg", "phash": bridge, "family": -1, "tags": ["tag_1"]})
        crossing += before[f"s3://b/f{a:04d}/c0.jpg"] != before[f"s3://b/f{b:04d}/c0.jpg"]
    assert len(grown) - len(rows) >= 0.1 * len(rows) and crossing > 0  # 10% new images, some bridging
    tags = _write_tags(grown, tmp_path / "tags")
    run_dedup(str(tags), str(tmp_path / "dedup"), max_distance=R)
    report = run_split(
        str(tags),
        str(tmp_path / "dedup"),
        str(tmp_path / "split"),
        ratios=RATIOS,
        seed=3,
        previous=str(root / "split" / "splits.parquet"),
    )
    after = _split_of(tmp_path / "split")
    assert all(after[u] == s for u, s in before.items())  # nothing previously assigned moves
    assert len(report.bridges) == crossing  # every bridge across splits reported
    assert sum(1 for u, s in after.items() if s == HELD_OUT) == crossing
    _, audit_report = run_audit(
        str(tmp_path / "split" / "splits.parquet"), str(tmp_path / "split" / "splits.parquet"), max_distance=R
    )
    assert audit_report.leaks == 0 and audit_report.eval_images > 0


def test_growth_draws_only_units_with_a_new_image(first, tmp_path, monkeypatch):
    """A nightly's split hashes the clusters that gained an image, not every cluster: its
    cost follows the change. New families get the split a split from scratch gives them."""
    import pipeline.corpus.split as split_module

    root, rows, seeds, _ = first
    rng = np.random.default_rng(11)
    joined = [int(f) for f in rng.choice(800, 30, replace=False)]
    grown = list(rows) + [
        {"uri": f"s3://b/f{f:04d}/late.jpg", "phash": _flip(seeds[f], rng, 1), "family": f, "tags": ["tag_0"]}
        for f in joined
    ]
    fresh, _ = _corpus(seed=5, families=40, pairs=0)
    grown += [{**r, "uri": r["uri"].replace("s3://b/", "s3://n/")} for r in fresh]
    tags = _write_tags(grown, tmp_path / "tags")
    run_dedup(str(tags), str(tmp_path / "dedup"), max_distance=R)
    drawn = []
    real = split_module.cluster_unit
    monkeypatch.setattr(split_module, "cluster_unit", lambda seed, c: drawn.append(c) or real(seed, c))
    previous = str(root / "split" / "splits.parquet")
    args = (str(tags), str(tmp_path / "dedup"))
    run_split(*args, str(tmp_path / "nightly"), ratios=RATIOS, seed=3, previous=previous)
    clusters = pq.read_table(tmp_path / "dedup" / "clusters.parquet").to_pylist()
    new_units = {
        r["cluster_id"] for r in clusters if "/late.jpg" in r["uri"] or r["uri"].startswith("s3://n/")
    }
    assert sorted(drawn) == sorted(new_units) and len(drawn) < 0.1 * len({r["cluster_id"] for r in clusters})
    drawn.clear()
    run_split(*args, str(tmp_path / "scratch"), ratios=RATIOS, seed=3)
    nightly, scratch = _split_of(tmp_path / "nightly"), _split_of(tmp_path / "scratch")
    assert len(drawn) > 800  # from scratch: every cluster
    fresh_uris = [r["uri"] for r in grown if r["uri"].startswith("s3://n/")]
    assert [nightly[u] for u in fresh_uris] == [scratch[u] for u in fresh_uris]


def test_exclude_keeps_an_existing_train_set_out_of_eval(first, tmp_path):
    root, rows, seeds, _ = first
    before = _split_of(root / "split")
    eval_families = sorted({r["family"] for r in rows if before[r["uri"]] != "train"})[:20]
    rng = np.random.default_rng(4)
    external = pa.table({"phash": pa.array([f"{_flip(seeds[f], rng, 2):016x}" for f in eval_families])})
    pq.write_table(external, tmp_path / "old_train.parquet")
    report = run_split(
        str(root / "tags"),
        str(root / "dedup"),
        str(tmp_path / "split"),
        ratios=RATIOS,
        seed=3,
        exclude=[str(tmp_path / "old_train.parquet")],
    )
    after = _split_of(tmp_path / "split")
    moved = {r["family"] for r in rows if r["family"] in eval_families and after[r["uri"]] == "train"}
    assert moved == set(eval_families) and report.forced_train_by_exclude == len(eval_families)
    _, leaks = run_audit(
        str(tmp_path / "old_train.parquet"), str(tmp_path / "split" / "splits.parquet"), max_distance=R
    )
    assert leaks.leaks == 0


def test_stratified_split_meets_the_validation_minimum_and_keeps_families_whole(first, tmp_path):
    root, rows, _, plain = first
    report = run_split(
        str(root / "tags"),
        str(root / "dedup"),
        str(tmp_path / "strat"),
        ratios=RATIOS,
        seed=3,
        stratify=True,
        min_val_positives=5,
    )
    split = _split_of(tmp_path / "strat")
    family_splits = {}
    for r in rows:
        family_splits.setdefault(r["family"], set()).add(split[r["uri"]])
    assert all(len(s) == 1 for s in family_splits.values())
    totals = {t: sum(v.values()) for t, v in report.positives.items()}
    frequent = [t for t, n in totals.items() if n * RATIOS["val"] >= 5]
    assert frequent and all(report.positives[t].get("val", 0) >= 5 for t in frequent)
    assert (
        report.label_deviation["val"] <= plain.label_deviation["val"]
    )  # closer to the overall label distribution
    again = run_split(
        str(root / "tags"),
        str(root / "dedup"),
        str(tmp_path / "strat2"),
        ratios=RATIOS,
        seed=3,
        stratify=True,
        min_val_positives=5,
    )
    assert pq.read_table(tmp_path / "strat2" / "splits.parquet").equals(
        pq.read_table(tmp_path / "strat" / "splits.parquet")
    )
    assert again.fractions == report.fractions


def test_a_split_left_empty_is_said_and_its_audit_is_not_clean(tmp_path):
    """Three clusters at 90/5/5: val and test get nothing. The split says so, and an audit
    of it has no eval image to check: NOTHING CHECKED, exit 4, never 'clean'."""
    rows, _ = _corpus(seed=1, families=3, pairs=0)
    tags = _write_tags(rows, tmp_path / "tags")
    run_dedup(str(tags), str(tmp_path / "dedup"), max_distance=R)
    ratios = {"train": 0.9, "val": 0.05, "test": 0.05}
    report = run_split(str(tags), str(tmp_path / "dedup"), str(tmp_path / "split"), ratios=ratios, seed=1)
    assert report.sizes == {"train": len(rows)}  # the seed puts all three in train
    assert report.empty_splits == ("val", "test") and "NO IMAGE in val, test" in report.text()
    splits = str(tmp_path / "split" / "splits.parquet")
    _, audit_report = run_audit(splits, splits, max_distance=R, embedding_threshold=None)
    assert audit_report.eval_images == 0 and audit_report.exit_status() == 4
    assert "NOTHING CHECKED" in audit_report.text() and "clean" not in audit_report.text()
