"""Dedup: the table search equals brute force; real photos' copies cluster with their
original; the command writes stable clusters."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.corpus.dedup import cluster_rows
from pipeline.corpus.hamming_search import brute_force_pairs, near_pairs


def _planted(rng, radius: int, bases: int = 1500, seeds: int = 40) -> np.ndarray:
    """Random hashes plus, for some of them, neighbours at every distance 0..R+2."""
    base = rng.integers(0, 2**64 - 1, bases, dtype=np.uint64, endpoint=True)
    out = [base]
    for h in base[:seeds]:
        for distance in range(radius + 3):
            for _ in range(2):
                mask = np.uint64(0)
                for bit in rng.choice(64, distance, replace=False):
                    mask |= np.uint64(1) << np.uint64(int(bit))
                out.append(np.array([h ^ mask], np.uint64))
    return np.unique(np.concatenate(out))


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 4, 6, 8, 10])
@pytest.mark.parametrize("seed", [0, 1])
def test_table_search_equals_brute_force(radius, seed):
    hashes = _planted(np.random.default_rng(seed), radius)
    a, b = near_pairs(hashes, radius, parallel=False)
    ref_a, ref_b = brute_force_pairs(hashes, radius)
    assert set(zip(a.tolist(), b.tolist())) == set(zip(ref_a.tolist(), ref_b.tolist()))
    assert len(set(zip(a.tolist(), b.tolist()))) == len(a)  # each pair once
    assert len(ref_a) >= 40 * 2 * radius * 0.9  # each planted neighbour at distance 1..R pairs with its base


@pytest.mark.parametrize("t", [1, 2, 3])
def test_every_block_split_is_exact(t):
    hashes = _planted(np.random.default_rng(5), 5, bases=800, seeds=20)
    a, b = near_pairs(hashes, 5, t=t, parallel=False)
    ref_a, ref_b = brute_force_pairs(hashes, 5)
    assert set(zip(a.tolist(), b.tolist())) == set(zip(ref_a.tolist(), ref_b.tolist()))


def test_clusters_join_exact_copies_and_keep_blank_images_apart():
    solid, black = np.uint64(1 << 63), np.uint64(0)
    phash = np.array(
        [0x0F0F0F0F0F0F0F0F, 0x0F0F0F0F0F0F0F0E, 0xF0F0F0F0F0F0F0F0, solid, solid, black, 0x1234], np.uint64
    )
    sha = ["a", "b", "c", "d", "e", "e", None]
    has = np.array([True] * 6 + [False])
    labels, pairs, exact = cluster_rows(sha, phash, has, 4)
    assert labels[0] == labels[1] != labels[2]  # 1 bit apart; far
    assert labels[3] != labels[4] and labels[4] == labels[5]  # blank hashes join by sha256 only
    assert labels[6] not in labels[:6] and exact == 1 and pairs == 1


def _variants(photo: Image.Image) -> dict[str, bytes]:
    def enc(image, fmt="JPEG", **kw):
        out = io.BytesIO()
        image.save(out, fmt, **kw)
        return out.getvalue()

    w, h = photo.size
    return {
        "orig.png": enc(photo, "PNG"),
        "resized.jpg": enc(photo.resize((w // 2, h // 2), Image.Resampling.LANCZOS), quality=85),
        "reencoded.jpg": enc(photo, quality=60),
        "cropped.jpg": enc(
            photo.crop((int(w * 0.01), int(h * 0.01), w - int(w * 0.01), h - int(h * 0.01))), quality=90
        ),  # 1% a side
        "copy.png": enc(photo, "PNG"),  # byte-identical to orig.png
    }


def test_real_photo_copies_cluster_with_their_original(ray_session, demo_bundle, tmp_path):
    from pipeline.corpus.dedup import run_dedup
    from pipeline.job.settings import make_tag_config
    from pipeline.job.tag_job import run_tag_job
    from tests.sample_photos import load_photos

    # not motorcycle_right: it is the other half of motorcycle_left's stereo pair (4 bits apart)
    photos = [
        (n, p)
        for n, p in load_photos()
        if n
        in (
            "astronaut",
            "coffee",
            "chelsea",
            "rocket",
            "china",
            "flower",
            "motorcycle_left",
            "camera",
            "retina",
        )
    ]
    for name, photo in photos:
        for variant, data in _variants(photo).items():
            (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "images" / name / variant).write_bytes(data)
    run_tag_job(
        make_tag_config(
            inputs=[str(tmp_path / "images")], output=str(tmp_path / "tags"), model=str(demo_bundle)
        )
    )
    summary = run_dedup(str(tmp_path / "tags"), str(tmp_path / "dedup"))
    rows = pq.read_table(tmp_path / "dedup" / "clusters.parquet").to_pylist()
    by_photo: dict[str, set] = {}
    for row in rows:
        by_photo.setdefault(row["uri"].split("/")[-2], set()).add(row["cluster_id"])
    assert all(len(ids) == 1 for ids in by_photo.values()), by_photo  # every copy with its original
    assert len({next(iter(ids)) for ids in by_photo.values()}) == len(photos)  # different photos apart
    assert summary.clusters == len(photos) and summary.exact_duplicate_images == len(photos)
    reps = [r for r in rows if r["is_representative"]]
    assert len(reps) == len(photos) and all(r["cluster_size"] == 5 for r in rows)
    for row in rows:
        members = [r["sha256"] for r in rows if r["cluster_id"] == row["cluster_id"]]
        assert row["cluster_id"] == min(members)  # stable: the smallest sha256
    assert not any(
        r["uri"].endswith(("resized.jpg", "cropped.jpg")) for r in reps
    )  # the largest image represents


def test_ray_tasks_over_tables_give_the_same_pairs(ray_session):
    hashes = _planted(np.random.default_rng(7), 6, bases=3000, seeds=60)
    a, b = near_pairs(hashes, 6, parallel=True)
    ref_a, ref_b = brute_force_pairs(hashes, 6)
    assert set(zip(a.tolist(), b.tolist())) == set(zip(ref_a.tolist(), ref_b.tolist())) and len(ref_a) > 300


def test_chained_near_duplicates_are_reported_as_a_giant_cluster(tmp_path):
    """A random walk of 1,200 one-bit steps: every neighbour within R, the ends far apart."""
    import hashlib

    import pyarrow as pa

    from pipeline.corpus.cluster_table import GIANT_CLUSTER
    from pipeline.corpus.dedup import run_dedup

    rng = np.random.default_rng(3)
    h, walk = 0x5A5A5A5A5A5A5A5A, []
    for _ in range(1200):
        h ^= 1 << int(rng.integers(0, 64))
        walk.append(h)
    uris = [f"/w/{i:05d}.jpg" for i in range(len(walk))]
    table = pa.table(
        {
            "uri": uris,
            "sha256": [hashlib.sha256(u.encode()).hexdigest() for u in uris],
            "phash": pa.array(walk, pa.uint64()),
            "phash_degenerate": [False] * len(walk),
            "width": [64] * len(walk),
            "height": [64] * len(walk),
            "error": pa.nulls(len(walk), pa.string()),
        }
    )
    (tmp_path / "tags").mkdir()
    pq.write_table(table, tmp_path / "tags" / "part-0.parquet")
    summary = run_dedup(str(tmp_path / "tags"), str(tmp_path / "out"), max_distance=2)
    (giant,) = summary.giant_clusters
    assert giant.size >= GIANT_CLUSTER and summary.largest_cluster == giant.size
    assert giant.diameter_hops >= 10 and giant.spread_bits > 2  # chaining carried it far beyond R


def test_the_original_represents_its_cluster_over_a_later_edited_copy_with_more_bytes(
    ray_session, demo_bundle, tmp_path
):
    """Version 1 holds the original; version 2 adds a copy with a caption drawn on it, saved
    at a higher quality (same pixels, more bytes, a uri that sorts first). first-seen (the
    default) keeps the original; best-copy, the rule alone, picks the copy."""
    from PIL import ImageDraw

    from pipeline.corpus.dedup import run_dedup
    from pipeline.job.settings import make_tag_config
    from pipeline.job.tag_job import run_tag_job
    from tests.sample_photos import load_photos

    photos = dict(load_photos())
    images = tmp_path / "images"
    images.mkdir()
    photos["astronaut"].convert("RGB").save(images / "photo.jpg", quality=75)
    photos["coffee"].convert("RGB").save(images / "other.jpg", quality=75)
    cfg = make_tag_config(inputs=[str(images)], output=str(tmp_path / "tags"), model=str(demo_bundle))
    assert run_tag_job(cfg).version == 1
    edited = Image.open(images / "photo.jpg").convert("RGB")
    ImageDraw.Draw(edited).text((20, 20), "tagpipe", fill=(255, 255, 255))
    edited.save(images / "a_copy.jpg", quality=95)
    assert (images / "a_copy.jpg").stat().st_size > (images / "photo.jpg").stat().st_size
    assert run_tag_job(cfg).version == 2

    def representatives(rule: str) -> dict[str, bool]:
        run_dedup(str(tmp_path / "tags"), str(tmp_path / rule), representative=rule)
        rows = pq.read_table(tmp_path / rule / "clusters.parquet").to_pylist()
        pair = [r for r in rows if r["uri"].endswith(("photo.jpg", "a_copy.jpg"))]
        assert len(pair) == 2 and pair[0]["cluster_id"] == pair[1]["cluster_id"]  # one cluster
        return {r["uri"].rsplit("/", 1)[1]: r["is_representative"] for r in pair}

    assert representatives("first-seen") == {"photo.jpg": True, "a_copy.jpg": False}
    assert representatives("best-copy") == {"photo.jpg": False, "a_copy.jpg": True}
    from pipeline.corpus.report import _signals_paragraph

    for rule in ("first-seen", "best-copy"):  # the report names the rule the summary records
        summary = json.loads((tmp_path / rule / "_summary.json").read_text())
        said = "the copy first seen in the table" in _signals_paragraph(summary)
        assert summary["representative"] == rule and said == (rule == "first-seen")
    # new thresholds rewrite every part in version 3: the history still knows the original
    assert run_tag_job(cfg.model_copy(update={"threshold": 0.9})).change == "rules changed"
    assert representatives("first-seen") == {"photo.jpg": True, "a_copy.jpg": False}
