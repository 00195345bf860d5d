"""A seeded, deterministic mutation fuzzer for the decode stage.

Seeds: small valid files of every format the installed Pillow writes (JPEG baseline,
progressive, CMYK, EXIF; PNG in five modes, interlaced; APNG; GIF; WebP lossy, lossless,
animated; TIFF raw, LZW, deflate, JPEG, tiled; BMP; ICO; ICNS; PPM; TGA; JPEG 2000;
AVIF; QOI; DDS; SGI; PCX; MPO; XBM), drawn from a real photo.
Mutations: truncation, byte flips, chunk corruption (PNG/RIFF/TIFF-aware and generic),
inflated header sizes, concatenation, splicing, and stacks of two or three of these.

run_cases() decodes each case in Ray worker tasks through DecodeStage, one at a time
(its time and peak RSS growth measured) and again as one batch (one row per file, the
same results), and checks every row without an error against a fresh Pillow: the file
must open and load in full. Findings are counted, never raised, so a run reports all.
"""

from __future__ import annotations

import collections
import hashlib
import io
import random
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, features
from sample_photos import photo_paths


@dataclass(frozen=True)
class Case:
    name: str  # <seed>~<mutations>~<index>
    data: bytes


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def seed_files() -> dict[str, bytes]:
    """Valid files, 48x40 to 96x64 pixels, of every format this Pillow writes."""
    photo = Image.open(next(p for p in photo_paths() if p.stem == "chelsea")).convert("RGB").resize((96, 64))
    small = photo.resize((48, 40))
    rgba = photo.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (64, 1))))
    frames = [
        small,
        small.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        Image.new("RGB", small.size, (0, 0, 255)),
    ]
    exif = Image.Exif()
    exif[0x0112] = 6
    grey16 = Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257)
    seeds = {
        "jpeg_baseline.jpg": _encode(photo, "JPEG", quality=90),
        "jpeg_progressive.jpg": _encode(photo, "JPEG", quality=90, progressive=True),
        "jpeg_cmyk.jpg": _encode(photo.convert("CMYK"), "JPEG", quality=90),
        "jpeg_exif.jpg": _encode(photo, "JPEG", quality=90, exif=exif.tobytes()),
        "png_rgb.png": _encode(photo, "PNG"),
        "png_rgba.png": _encode(rgba, "PNG"),
        "png_palette.png": _encode(photo.quantize(16), "PNG", transparency=0),
        "png_grey16.png": _encode(grey16, "PNG"),
        "png_interlaced.png": _encode(small, "PNG", interlace=1)
        if _writes_interlaced()
        else _encode(small, "PNG"),
        "apng.png": _encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50),
        "gif_animated.gif": _encode(
            frames[0].quantize(32), "GIF", save_all=True, append_images=[f.quantize(32) for f in frames[1:]]
        ),
        "webp_lossy.webp": _encode(photo, "WEBP", quality=80),
        "webp_lossless.webp": _encode(rgba, "WEBP", lossless=True),
        "webp_animated.webp": _encode(
            frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True
        ),
        "tiff_raw.tif": _encode(small, "TIFF"),
        "tiff_lzw.tif": _encode(photo, "TIFF", compression="tiff_lzw"),
        "tiff_deflate.tif": _encode(grey16, "TIFF", compression="tiff_adobe_deflate"),
        "tiff_jpeg.tif": _encode(photo, "TIFF", compression="jpeg"),
        "tiff_tiled.tif": _encode(small, "TIFF", tiled=True, tile_width=16, tile_length=16),
        "bmp.bmp": _encode(small, "BMP"),
        "ico.ico": _encode(small, "ICO", sizes=[(32, 32), (16, 16)]),
        "icns.icns": _encode(small.resize((32, 32)), "ICNS"),
        "ppm.ppm": _encode(small, "PPM"),
        "tga_rle.tga": _encode(small, "TGA", compression="tga_rle"),
        "jpeg2000.jp2": _encode(photo, "JPEG2000"),
        "j2k.j2k": _encode(small, "JPEG2000", no_jp2=True),
        "pcx.pcx": _encode(small, "PCX"),
        "sgi.sgi": _encode(small, "SGI"),
        "mpo.mpo": _encode(small, "MPO"),
        "xbm.xbm": _encode(small.convert("1"), "XBM"),
    }
    for name, fmt in (("qoi.qoi", "QOI"), ("dds.dds", "DDS")):
        try:
            seeds[name] = _encode(small, fmt)
        except (KeyError, OSError, ValueError):  # an older Pillow without the writer
            pass
    if features.check("avif"):
        seeds["avif.avif"] = _encode(photo, "AVIF", quality=60)
    return seeds


def _writes_interlaced() -> bool:
    try:
        _encode(Image.new("RGB", (4, 4)), "PNG", interlace=1)
        return True
    except (TypeError, ValueError):
        return False


# ---- mutations ---------------------------------------------------------------------
def truncate(rng: random.Random, data: bytes, seeds) -> bytes:
    cut = int(len(data) * (1 - rng.random() ** 2)) if rng.random() < 0.7 else rng.randrange(len(data))
    return data[:cut]


def flip_bytes(rng: random.Random, data: bytes, seeds) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        i = rng.randrange(len(out))
        out[i] ^= rng.randrange(1, 256)
    return bytes(out)


def corrupt_chunk(rng: random.Random, data: bytes, seeds) -> bytes:
    """Damage one structural unit: a PNG chunk (length, type, body, CRC; dropped or
    doubled), a RIFF chunk, a TIFF IFD entry, or a generic range."""
    if data.startswith(b"\x89PNG"):
        return _corrupt_png(rng, data)
    if data[:4] == b"RIFF" and len(data) >= 20:
        return _corrupt_riff(rng, data)
    if data[:4] in (b"II*\x00", b"MM\x00*") and len(data) >= 8:
        return _corrupt_tiff(rng, data)
    out = bytearray(data)
    start = rng.randrange(len(out))
    span = min(len(out) - start, rng.choice((4, 32, 256)))
    action = rng.choice(("zero", "ff", "drop", "insert"))
    if action == "zero":
        out[start : start + span] = bytes(span)
    elif action == "ff":
        out[start : start + span] = b"\xff" * span
    elif action == "drop":
        del out[start : start + span]
    else:
        out[start:start] = bytes(rng.randrange(256) for _ in range(span))
    return bytes(out)


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    chunks, offset = [], 8
    while offset + 12 <= len(data):
        length = struct.unpack_from(">I", data, offset)[0]
        end = offset + 12 + length
        chunks.append((offset, min(end, len(data))))
        offset = end
    return chunks


def _corrupt_png(rng: random.Random, data: bytes) -> bytes:
    chunks = _png_chunks(data)
    if not chunks:
        return data[:8]
    start, end = rng.choice(chunks)
    out = bytearray(data)
    action = rng.choice(("length", "type", "body", "crc", "drop", "double"))
    if action == "length":
        struct.pack_into(
            ">I",
            out,
            start,
            rng.choice((0, 1, 0x7FFFFFFF, 0xFFFFFFFF, struct.unpack_from(">I", out, start)[0] + 1)),
        )
    elif action == "type":
        out[start + 4 : start + 8] = rng.choice((b"IDAT", b"IEND", b"fcTL", b"zzzz", b"IHDR"))
    elif action == "body" and end - start > 12:
        out[rng.randrange(start + 8, end - 4)] ^= rng.randrange(1, 256)
    elif action == "crc":
        out[end - 1] ^= 0x55
    elif action == "drop":
        del out[start:end]
    else:
        out[end:end] = data[start:end]
    return bytes(out)


def _corrupt_riff(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    target = rng.choice((4, 16, 12))  # RIFF size, first chunk size, first chunk tag
    if target == 12:
        out[12:16] = rng.choice((b"VP8 ", b"VP8L", b"VP8X", b"ANIM", b"XXXX"))
    else:
        struct.pack_into("<I", out, target, rng.choice((0, 1, 0xFFFFFFFF, len(data) * 4)))
    return bytes(out)


def _corrupt_tiff(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    little = data[:2] == b"II"
    fmt = "<" if little else ">"
    ifd = struct.unpack_from(fmt + "I", data, 4)[0]
    if ifd + 2 > len(data):
        return flip_bytes(rng, data, None)
    count = struct.unpack_from(fmt + "H", data, ifd)[0]
    if not count or ifd + 2 + count * 12 > len(data):
        return flip_bytes(rng, data, None)
    entry = ifd + 2 + 12 * rng.randrange(count)
    field_ = rng.choice(("type", "count", "value"))
    if field_ == "type":
        struct.pack_into(fmt + "H", out, entry + 2, rng.choice((0, 7, 13, 99)))
    elif field_ == "count":
        struct.pack_into(fmt + "I", out, entry + 4, rng.choice((0, 2, 0xFFFF, 0x7FFFFFFF)))
    else:
        struct.pack_into(fmt + "I", out, entry + 8, rng.choice((0, 1, len(data), 0xFFFFFFF0)))
    return bytes(out)


def inflate_sizes(rng: random.Random, data: bytes, seeds) -> bytes:
    """Replace a 16- or 32-bit integer in the header that equals the image's width or
    height (either byte order) with a huge, zero or off-by-one value."""
    out = bytearray(data)
    head = min(len(out), 512)
    sizes = {48, 40, 96, 64, 32, 16}
    spots = []
    for offset in range(head - 1):
        for fmt in (">H", "<H", ">I", "<I"):
            width = struct.calcsize(fmt)
            if offset + width <= head and struct.unpack_from(fmt, out, offset)[0] in sizes:
                spots.append((offset, fmt))
    if not spots:
        return flip_bytes(rng, data, seeds)
    offset, fmt = rng.choice(spots)
    top = 0xFFFF if fmt.endswith("H") else 0xFFFFFFFF
    value = rng.choice(
        (0, 1, top, top // 2, 30000, 65500, struct.unpack_from(fmt, out, offset)[0] * 64 % (top + 1))
    )
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def concatenate(rng: random.Random, data: bytes, seeds) -> bytes:
    other = rng.choice(seeds)
    return rng.choice((data + other, other + data, data + data, data + bytes(rng.randrange(1, 64))))


def splice(rng: random.Random, data: bytes, seeds) -> bytes:
    other = rng.choice(seeds)
    return data[: rng.randrange(1, len(data) + 1)] + other[rng.randrange(len(other)) :]


MUTATIONS = {f.__name__: f for f in (truncate, flip_bytes, corrupt_chunk, inflate_sizes, concatenate, splice)}


def make_cases(count: int, seed: int = 0, seeds: dict[str, bytes] | None = None) -> list[Case]:
    """`count` mutated files, the same ones for the same count and seed. One in 20 is an
    unmutated seed file, so valid files of every format go through the harness too."""
    seeds = seeds or seed_files()
    names = sorted(seeds)
    pool = [seeds[n] for n in names]
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        name = names[index % len(names)]
        data = seeds[name]
        if index % 20 == 0:
            cases.append(Case(f"{name}~none~{index}", data))
            continue
        applied = rng.choices(list(MUTATIONS), k=rng.choice((1, 1, 1, 2, 3)))
        for mutation in applied:
            if data:
                data = MUTATIONS[mutation](rng, data, pool)
        cases.append(Case(f"{name}~{'+'.join(applied)}~{index}", data))
    return cases


# ---- running ----------------------------------------------------------------------
@dataclass
class FuzzSettings:
    max_memory: int = 512 * 1024**2
    max_pixels: int = 16_000_000
    timeout: float = 10.0
    chunk: int = 50


@dataclass
class FuzzReport:
    cases: int = 0
    crashes: list = field(default_factory=list)  # chunks whose worker died: their case names
    hangs: list = field(default_factory=list)  # (case, seconds) over the decode timeout
    row_mismatches: list = field(default_factory=list)  # missing, duplicate or reordered rows
    partial_pixel_rows: list = field(default_factory=list)  # no error, but a fresh Pillow cannot load it
    inconsistent: list = field(default_factory=list)  # one-by-one and batch decodes disagree
    over_budget: list = field(default_factory=list)  # (case, bytes) peak RSS growth over max_memory
    kinds: collections.Counter = field(default_factory=collections.Counter)
    by_seed_ok: collections.Counter = field(default_factory=collections.Counter)
    peak_growth: int = 0
    slowest: float = 0.0
    seconds: float = 0.0
    results: dict = field(default_factory=dict)  # case name -> error kind (None: ok)

    def problems(self) -> int:
        return sum(
            map(
                len,
                (
                    self.crashes,
                    self.hangs,
                    self.row_mismatches,
                    self.partial_pixel_rows,
                    self.inconsistent,
                    self.over_budget,
                ),
            )
        )

    def text(self) -> str:
        return (
            f"{self.cases} cases in {self.seconds:.0f} s: {len(self.crashes)} crashed chunks, "
            f"{len(self.hangs)} hangs, "
            f"{len(self.row_mismatches)} row mismatches, {len(self.partial_pixel_rows)} partial-pixel rows, "
            f"{len(self.inconsistent)} inconsistent, {len(self.over_budget)} over budget; "
            "peak decode RSS growth "
            f"{self.peak_growth / 2**20:.0f} MiB; slowest decode {self.slowest:.2f} s; rows: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items(), key=lambda kv: -kv[1]))
        )


def fresh_pillow_loads(data: bytes) -> str | None:
    """None when a fresh Pillow (default settings) opens and loads the whole first frame."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - the oracle reports whatever Pillow raised
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def decode_chunk(paths: list[str], settings: FuzzSettings) -> list[dict]:
    """In a Ray worker: each file alone (timed, peak RSS measured), then all as one batch."""
    from memory_probe import peak_rss_growth

    from pipeline.image.decode import DecodeStage, memory_limit
    from pipeline.image.imaging import DecodeOptions
    from pipeline.model.profiles import load_profile

    options = DecodeOptions(max_pixels=settings.max_pixels, max_memory=settings.max_memory)
    stage = DecodeStage(load_profile("wd_v3").preprocess, options, timeout=settings.timeout)
    results = []
    for path in paths:
        started = time.monotonic()
        with peak_rss_growth() as growth:
            out = stage({"uri": np.array([path], object)})
        seconds = time.monotonic() - started
        kind = out["error_kind"][0]
        oracle = None
        if kind is None:
            with memory_limit(settings.max_memory):
                oracle = fresh_pillow_loads(Path(path).read_bytes())
        results.append(
            dict(
                path=path,
                rows=len(out["uri"]),
                kind=None if kind is None else str(kind),
                seconds=seconds,
                growth=growth.bytes,
                oracle=oracle,
            )
        )
    batch = stage({"uri": np.array(paths, object)})
    batch_kinds = [None if k is None else str(k) for k in batch["error_kind"]]
    return [
        dict(r, batch_uri=u, batch_kind=k) for r, u, k in zip(results, list(batch["uri"]), batch_kinds)
    ] + (
        [dict(path=None, extra_rows=len(batch["uri"]) - len(paths))]
        if len(batch["uri"]) != len(paths)
        else []
    )


def write_cases(cases: list[Case], directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in cases:
        digest = hashlib.sha1(case.name.encode()).hexdigest()[:10]
        path = directory / f"{digest}-{case.name.split('~')[0]}"
        path.write_bytes(case.data)
        paths[case.name] = str(path)
    return paths


def run_cases(ray, cases: list[Case], directory: Path, settings: FuzzSettings = FuzzSettings()) -> FuzzReport:
    import os

    paths = write_cases(cases, directory)
    names = {path: name for name, path in paths.items()}
    ordered = [paths[c.name] for c in cases]
    chunks = [ordered[i : i + settings.chunk] for i in range(0, len(ordered), settings.chunk)]
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    task = ray.remote(max_retries=0, runtime_env={"env_vars": {"PYTHONPATH": tests_dir}})(decode_chunk)
    report = FuzzReport(cases=len(cases))
    started = time.monotonic()
    pending = {task.remote(chunk, settings): chunk for chunk in chunks}
    for ref, chunk in pending.items():
        try:
            rows = ray.get(ref, timeout=settings.timeout * len(chunk) * 3 + 120)
        except Exception as exc:  # noqa: BLE001 - a dead worker or a stuck task is a finding
            report.crashes.append((type(exc).__name__, [names[p] for p in chunk]))
            continue
        _account(report, rows, chunk, names, settings)
    report.seconds = time.monotonic() - started
    return report


def _account(
    report: FuzzReport, rows: list[dict], chunk: list[str], names: dict, settings: FuzzSettings
) -> None:
    if rows and rows[-1].get("path") is None:
        report.row_mismatches.append(("batch", rows.pop()["extra_rows"]))
    if [r["path"] for r in rows] != chunk or [r["batch_uri"] for r in rows] != chunk:
        report.row_mismatches.append(("order", chunk[0]))
    for row in rows:
        name = names[row["path"]]
        report.results[name] = row["kind"]
        report.kinds[row["kind"] or "ok"] += 1
        report.peak_growth = max(report.peak_growth, row["growth"])
        report.slowest = max(report.slowest, row["seconds"])
        if row["rows"] != 1:
            report.row_mismatches.append((name, row["rows"]))
        if row["seconds"] > settings.timeout + 2:
            report.hangs.append((name, round(row["seconds"], 1)))
        if row["growth"] > settings.max_memory:
            report.over_budget.append((name, row["growth"]))
        if row["kind"] is None:
            report.by_seed_ok[name.split("~")[0]] += 1
            if row["oracle"]:
                report.partial_pixel_rows.append((name, row["oracle"]))
        if row["kind"] != row["batch_kind"] and "decode_timeout" not in (row["kind"], row["batch_kind"]):
            report.inconsistent.append((name, row["kind"], row["batch_kind"]))
