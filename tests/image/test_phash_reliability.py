"""Low-detail hashes are flagged by measured fragility, not by two constants."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.demo.synthetic import KINDS, render
from pipeline.image.decode import DecodeStage
from pipeline.image.phash import (
    SOLID_HASH,
    near_blank,
    phash,
    phash_with_fragile_bits,
    unreliable,
)
from pipeline.model.profiles import load_profile
from tests.sample_photos import photo_paths


def test_real_photos_are_reliable_and_synthetic_low_detail_images_are_not():
    for path in photo_paths():
        value, fragile = phash_with_fragile_bits(Image.open(path).convert("RGB"))
        assert not unreliable(value, fragile), (path.name, fragile)
    for kind in KINDS.values():
        image = render(kind, 640, 480, seed=3)
        value, fragile = phash_with_fragile_bits(image)
        assert unreliable(value, fragile) == (kind.recipe != "noise"), (kind.name, f"{value:016x}", fragile)
        assert phash(image) == value  # the hash itself is imagehash's, unchanged


def test_stripes_that_do_not_hash_exactly_blank_are_still_flagged():
    """blue_hstripes at 1000x700 hashes to 8000800080008080, which the old constants passed."""
    image = render(KINDS["blue_hstripes"], 1000, 700)
    value, fragile = phash_with_fragile_bits(image)
    assert value != SOLID_HASH and unreliable(value, fragile)
    assert near_blank(np.array([value], np.uint64))[0]  # the rule for rows hashed before


def test_decode_stage_marks_the_row(tmp_path):
    paths = []
    for name, image in (("stripes", render(KINDS["bw_stripes"], 500, 400)), ("photo", None)):
        path = tmp_path / f"{name}.png"
        if image is None:
            path.write_bytes(next(p for p in photo_paths() if p.name == "astronaut.png").read_bytes())
        else:
            out = io.BytesIO()
            image.save(out, "PNG")
            path.write_bytes(out.getvalue())
        paths.append(str(path))
    batch = DecodeStage(load_profile("wd_v3").preprocess)({"uri": np.array(paths, object)})
    assert batch["phash_degenerate"].tolist() == [True, False]
