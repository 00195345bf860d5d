"""Decompression bombs of every container format stay within the decode memory budget
in a real Ray worker, which lives on to decode the next file.

Each bomb (tests/bombs.py) is decoded twice in one Ray task:
- with only the memory budget in force (max_pixels out of the way), so the budget
  itself is what stops it: each becomes an error row with a peak RSS growth under it;
- with the default limits, where Pillow's own checks (on at max_pixels, as errors)
  refuse the frames, tiles and sub-images that declare too much before decoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.bombs import build_bombs

BUDGET = 256 * 1024**2
NO_PIXEL_LIMIT = 10**12
# Refused before a pixel is decoded: by Pillow's checks in the plugins (ICO, ICNS, GIF
# frames, TIFF size, WebP) or tagpipe's own size and memory checks.
REFUSED_UNREAD_BY_DEFAULT = {
    "gif_frame_60000.gif",
    "icns_png_20000.icns",
    "ico_png_20000.ico",
    "jpeg_65500_square.jpg",
    "tiff_strips_60000.tif",
    "webp_16383.webp",
    "apng_frame_60000.png",
    "jpeg_height_65500.jpg",
}


def _decode_each(paths: list[str], budget: int, max_pixels: int) -> list[dict]:
    """In a Ray worker: decode one file at a time, measuring each one's peak RSS growth."""
    from pipeline.image.decode import DecodeStage
    from pipeline.image.imaging import DecodeOptions
    from pipeline.model.profiles import load_profile
    from tests.memory_probe import peak_rss_growth

    stage = DecodeStage(
        load_profile("cl_tagger_v2").preprocess, DecodeOptions(max_pixels=max_pixels, max_memory=budget)
    )
    results = []
    for path in paths:
        with peak_rss_growth() as growth:
            out = stage({"uri": np.array([path], object)})
        results.append(dict(path=path, kind=out["error_kind"][0], error=out["error"][0], growth=growth.bytes))
    return results


@pytest.fixture(scope="module")
def bomb_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bombs")
    files = {}
    for name, data in build_bombs().items():
        (root / name).write_bytes(data)
        files[name] = str(root / name)
    return files


def _run_in_worker(ray, paths, budget, max_pixels):
    import os

    here = os.path.dirname(os.path.abspath(__file__))  # the worker imports this module by name
    root = os.path.dirname(os.path.dirname(here))  # and it imports tests.bombs
    path = os.pathsep.join([here, root])
    task = ray.remote(max_retries=0, max_calls=1, runtime_env={"env_vars": {"PYTHONPATH": path}})(
        _decode_each
    )
    return ray.get(task.remote(paths, budget, max_pixels))


def test_every_bomb_is_an_error_row_under_the_memory_budget(ray_session, bomb_files):
    names = sorted(bomb_files)
    results = _run_in_worker(ray_session, [bomb_files[n] for n in names], BUDGET, NO_PIXEL_LIMIT)
    problems = []
    for name, result in zip(names, results):
        mib = result["growth"] / 2**20
        print(
            f"{name:26} {len(Path(bomb_files[name]).read_bytes()):>9} B  {str(result['kind']):12} "
            f"peak RSS +{mib:.0f} MiB"
        )
        if result["growth"] > BUDGET:
            problems.append(f"{name}: peak RSS grew {mib:.0f} MiB, over the {BUDGET >> 20} MiB budget")
        if result["kind"] is None:
            problems.append(f"{name}: decoded as a valid image ({mib:.0f} MiB)")
    assert not problems, "\n".join(problems)
    kinds = {name: r["kind"] for name, r in zip(names, results)}
    # the budget itself (not a decoder error) stops the big ones
    for name in (
        "png_grey_11000.png",
        "psd_rle_12000.psd",
        "tiff_16bit_9000.tif",
        "ico_png_6000.ico",
        "png_zeros_10000.png",
    ):
        assert kinds[name] == "too_large", (name, kinds[name])


def test_default_limits_refuse_declared_bombs_before_decoding(ray_session, bomb_files):
    from pipeline.image.imaging import DEFAULT_MAX_DECODE_MEMORY, DEFAULT_MAX_PIXELS

    names = sorted(bomb_files)
    results = _run_in_worker(
        ray_session, [bomb_files[n] for n in names], DEFAULT_MAX_DECODE_MEMORY, DEFAULT_MAX_PIXELS
    )
    for name, result in zip(names, results):
        assert result["growth"] <= DEFAULT_MAX_DECODE_MEMORY, name
        if name in REFUSED_UNREAD_BY_DEFAULT:
            assert result["kind"] in ("too_large", "decode_error", "truncated"), (name, result)
            assert result["growth"] < 32 * 2**20, (name, result["growth"] >> 20)  # nothing decoded
    messages = {name: r["error"] for name, r in zip(names, results)}
    limit = f"is over the {DEFAULT_MAX_PIXELS}-pixel limit (max_pixels)"
    assert messages["ico_png_20000.ico"] == f"a frame, tile or sub-image of 400000000 pixels {limit}"
    assert messages["icns_png_20000.icns"] == f"a frame, tile or sub-image of 400000000 pixels {limit}"
    assert messages["gif_frame_60000.gif"] == f"a frame, tile or sub-image of 3600000000 pixels {limit}"


def test_error_rows_keep_the_size_the_file_declares(bomb_files):
    from pipeline.image.decode import DecodeStage
    from pipeline.image.imaging import DecodeOptions
    from pipeline.model.profiles import load_profile

    names = ["png_zeros_10000.png", "jpeg_height_65500.jpg", "tiff_tile_20000.tif", "gif_frame_60000.gif"]
    stage = DecodeStage(load_profile("wd_v3").preprocess, DecodeOptions(max_memory=BUDGET))
    out = stage({"uri": np.array([bomb_files[n] for n in names], object)})
    assert list(out["error_kind"]) == ["too_large", "truncated", "decode_error", "too_large"]
    # refused by Pillow while the file is opened: no image, so no size
    assert list(zip(out["width"], out["height"])) == [(10000, 10000), (64, 65500), (256, 256), (0, 0)]


def test_an_error_raised_after_the_time_limit_is_a_timeout(tmp_path):
    """Off the main thread the limit is checked when the decode ends: a decode that fails
    after its limit (a 36 Mpx PNG whose zlib stream breaks near its end, its CRCs
    intact) is a timeout, whatever it raised."""
    import struct
    import threading

    from pipeline.image.decode import DecodeStage
    from pipeline.image.imaging import DecodeOptions
    from pipeline.model.profiles import load_profile
    from tests.bombs import png_chunk, png_of_zeros

    data = png_of_zeros(6000, 6000)
    start = data.index(b"IDAT") + 4
    length = struct.unpack_from(">I", data, start - 8)[0]
    idat = bytearray(data[start : start + length])
    idat[int(length * 0.9) : int(length * 0.9) + 8] = b"\xff" * 8  # the stream breaks 90% of the way in
    path = tmp_path / "broken.png"
    path.write_bytes(data[: start - 8] + png_chunk(b"IDAT", bytes(idat)) + data[start + length + 4 :])
    results = {}

    def decode(timeout):
        stage = DecodeStage(load_profile("wd_v3").preprocess, DecodeOptions(), timeout=timeout)
        results[timeout] = stage({"uri": np.array([str(path)], object)})["error_kind"][0]

    for timeout in (0.001, 0):
        thread = threading.Thread(target=decode, args=(timeout,))
        thread.start()
        thread.join()
    assert results == {0.001: "decode_timeout", 0: "decode_error"}


RESTORED = """
import resource, numpy as np
from pipeline.image.decode import memory_limit
before = resource.getrlimit(resource.RLIMIT_AS)
with memory_limit(BUDGET):
    assert resource.getrlimit(resource.RLIMIT_AS)[0] != before[0]
    try:
        np.ones(BUDGET // 8 + 1)
        raise SystemExit("allocated past the budget")
    except MemoryError:
        pass
assert resource.getrlimit(resource.RLIMIT_AS) == before
np.ones(BUDGET // 8 + 1)  # a later allocation of the same size works
print("ok")
"""


def test_budget_is_restored_after_each_decode():
    """The address-space limit holds only while an image decodes (in a fresh process:
    in one with other threads, their frees can make room under the limit meanwhile)."""
    import subprocess
    import sys

    script = f"BUDGET = {BUDGET}\n" + RESTORED
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


DEEP_PNG_NEAR_THE_BUDGET = """
import numpy as np
from PIL import Image
from pipeline.image.decode import DecodeStage
from pipeline.image.imaging import DecodeOptions
from pipeline.model.profiles import load_profile
values = (np.arange(3000 * 2000, dtype=np.uint32).reshape(2000, 3000) % 65536).astype(np.uint16)
Image.fromarray(values).save(PATH)
stage = DecodeStage(load_profile("wd_v3").preprocess, DecodeOptions(max_memory=MIB * 2**20))
print(stage({"uri": np.asarray([PATH], object)})["error_kind"][0])
"""


@pytest.mark.parametrize("mib", [100, 120])
def test_an_image_filling_the_budget_is_a_row_not_a_dead_worker(tmp_path, mib):
    """OpenBLAS aborts the process when its first matrix product cannot allocate its
    buffers; a 16-bit PNG that filled the budget left exactly that for the phash. In a
    fresh process (nothing has warmed BLAS up), as a new Ray worker is."""
    import subprocess
    import sys

    script = f"PATH = {str(tmp_path / 'deep.png')!r}\nMIB = {mib}\n" + DEEP_PNG_NEAR_THE_BUDGET
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in ("too_large", "None")
