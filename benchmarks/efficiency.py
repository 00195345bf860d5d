"""Where the cores go: a user's minimal loop, tagpipe's stages in a loop, and `tagpipe tag`.

    python benchmarks/efficiency.py [--images 3000] [--rounds 2] [--draft-ratios 2,1]
                                    [--placements fused,split] [--slow-layers 24]
                                    [--workdir /tmp/tagpipe-efficiency]

Same images (3 MP JPEGs on local disk, tests/sample_photos.py), same demo model (CL v2
contract, 384x384) on CPU, all in one process tree:
  (a) the minimal loop a user writes: Pillow draft decode towards the model size, a
      squash resize, the normalisation, the ONNX session, tags over the threshold, one
      Parquet file; one core (affinity) and one intra-op thread;
  (b) tagpipe's own stages in a plain loop: DecodeStage (read, sha256, fast decode at
      draft ratio x the model size, EXIF, phash, guards) then TaggerStage (uint8 in-graph
      normalisation, session, postprocess, Arrow rows); one core, one thread;
  (c) `run_tag_job` with defaults on every core: end to end (Ray start-up, listing,
      planning, commit included) and its tagging phase alone, per decode placement, and
      with --slow-layers once more with a heavier model (the tagger's busy time when the
      model bounds the run); each prints its busy line.
(a) and (b) alternate over --rounds rounds (the best round counts), so drift between them
cancels. (b) and (c) run at each of --draft-ratios. Prints b/a (the price of tagpipe's
extra per-image work), c/(cores x b) (what distribution costs) and c/a, and a cProfile
breakdown of (b) by stage.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/tag_job.py
from tag_job import make_images, start_local_ray  # noqa: E402

from pipeline.demo.model import write_demo_bundle  # noqa: E402
from pipeline.image.decode import DecodeStage  # noqa: E402
from pipeline.image.imaging import DecodeOptions  # noqa: E402
from pipeline.job.settings import make_tag_config  # noqa: E402
from pipeline.model.bundle import load_bundle  # noqa: E402
from pipeline.model.runtime import ProviderChoice, available_cpus  # noqa: E402
from pipeline.model.tagger import TaggerSettings, TaggerStage  # noqa: E402

BATCH = 32


def minimal_loop(uris: list[str], model_dir: Path, out: Path) -> float:
    """(a): what a user writes in twenty lines. Returns seconds."""
    bundle = load_bundle(str(model_dir))
    size = bundle.profile.input_size
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(bundle.model_path), options, providers=["CPUExecutionProvider"])
    name, tags = session.get_inputs()[0].name, np.asarray(bundle.vocabulary.tags, object)
    started = time.perf_counter()
    rows = {"uri": [], "tags": []}
    for i in range(0, len(uris), BATCH):
        batch = []
        for uri in uris[i : i + BATCH]:
            with Image.open(uri) as image:
                image.draft("RGB", size)
                batch.append(np.asarray(image.convert("RGB").resize(size, Image.Resampling.BICUBIC)))
        x = (np.stack(batch).astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)
        logits = session.run([bundle.profile.output_name or "logits"], {name: x})[0]
        for uri, row in zip(uris[i : i + BATCH], logits):
            rows["uri"].append(uri)
            rows["tags"].append(tags[row > 0.0].tolist())  # p > 0.5
    pq.write_table(pa.table(rows), out / "minimal.parquet", compression="zstd")
    return time.perf_counter() - started


def stages_loop(
    uris: list[str], model_dir: Path, out: Path, draft_ratio: float, profile: cProfile.Profile | None = None
) -> float:
    """(b): DecodeStage then TaggerStage over batches, as a test runs them. Returns seconds."""
    tagger = TaggerStage(TaggerSettings(str(model_dir), provider=ProviderChoice.CPU, intra_op_threads=1))
    decode = DecodeStage(tagger.bundle.profile.preprocess, DecodeOptions(draft_ratio=draft_ratio))
    started = time.perf_counter()
    if profile:
        profile.enable()
    tables = [
        tagger(decode({"uri": np.asarray(uris[i : i + BATCH], object)})) for i in range(0, len(uris), BATCH)
    ]
    pq.write_table(pa.concat_tables(tables), out / "stages.parquet", compression="zstd")
    if profile:
        profile.disable()
    return time.perf_counter() - started


# cProfile functions -> the stage they belong to (by file and function name), in order
STAGE_OF = [
    ("read", ("filesystem.py:", "read_bytes", "'read' of '_io")),
    ("sha256", ("openssl_sha256",)),
    ("phash", ("phash.py",)),
    (
        "decode + resize (Pillow)",
        (
            "ImagingDecoder",
            "ImagingCore",
            "ImagingEncoder",
            "PIL._imaging",
            "ImageFile.py",
            "Image.py",
            "JpegImagePlugin",
            "imaging.py",
            "geometry.py",
        ),
    ),  # fmt: skip
    ("model session", ("onnxruntime",)),
    ("postprocess", ("postprocess.py",)),
    ("rows (Arrow, Parquet)", ("pyarrow", "schemas.py", "tagger.py")),
    ("imports (first call)", ("_imp.", "marshal.loads", "importlib", "<frozen")),
]


def stage_breakdown(profile: cProfile.Profile) -> dict[str, float]:
    """Own CPU seconds per stage (tottime of each function, assigned by its file)."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    totals: dict[str, float] = {stage: 0.0 for stage, _ in STAGE_OF} | {"other": 0.0}
    for (filename, _line, function), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{filename}:{function}"
        stage = next((s for s, keys in STAGE_OF if any(k in where for k in keys)), "other")
        totals[stage] += tottime
    return totals


def one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """Every process's name and CPU seconds so far (user + system), from /proc."""
    ticks, out = os.sysconf("SC_CLK_TCK"), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry.name)] = (cmd, (int(fields[11]) + int(fields[12])) / ticks)
    return out


def where_cpu_went(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two snapshots, by kind of process."""
    spent: dict[str, float] = {}
    for pid, (cmd, seconds) in after.items():
        used = seconds - before.get(pid, (cmd, 0.0))[1]
        if pid == os.getpid():
            kind = "driver (this process)"
        elif cmd.startswith("ray::"):
            kind = "Ray workers (decode tasks, tagger actor, part writers)"
        elif any(
            name in cmd for name in ("raylet", "gcs_server", "plasma", "dashboard", "log_monitor", "ray/")
        ):
            kind = "Ray system (raylet, GCS, monitors)"
        else:
            kind = "other"
        spent[kind] = spent.get(kind, 0.0) + used
    return spent


def tag_job_run(
    uris: list[str], model_dir: Path, out: Path, cores: int, draft_ratio: float, placement: str = "auto"
) -> dict:
    """(c) from a cold Ray (what `tagpipe tag` pays): seconds end to end and by phase."""
    from pipeline.job.tag_job import run_tag_job

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    ray = start_local_ray(cores)
    ray_start = time.perf_counter() - started
    folder = str(uris[0].rsplit("/", 1)[0])
    cfg = make_tag_config(
        inputs=[folder],
        output=str(out / "job"),
        model=str(model_dir),
        draft_ratio=draft_ratio,
        decode_placement=placement,
    )
    before = cpu_by_process()
    summary = run_tag_job(cfg)
    total = time.perf_counter() - started
    cpu = where_cpu_went(before, cpu_by_process())
    ray.shutdown()
    return {"total": total, "ray_start": ray_start, "tagging": summary.timings["tag_seconds"],
            "timings": summary.timings, "cpu": cpu,
            "busy": summary.busy.text() if summary.busy else "-", "placement": summary.placement}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--draft-ratios", default="2", help="comma-separated; the first is profiled")
    parser.add_argument("--workdir", default="/tmp/tagpipe-efficiency")
    parser.add_argument(
        "--placements", default="auto", help="decode_placement values for (c), comma-separated (fused,split)"
    )
    parser.add_argument(
        "--slow-layers",
        type=int,
        default=0,
        help="also run (c) with the demo model made slower by N convolutions (same outputs): busy time "
        "when the model, not decode, bounds the run",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir)
    uris = make_images(work / f"images-{args.images}", args.images)
    model_dir = write_demo_bundle(work / "model")
    n, cores = len(uris), available_cpus()
    ratios = [float(r) for r in args.draft_ratios.split(",")]
    placements = args.placements.split(",")
    runs = {
        (placement, ratio): tag_job_run(uris, model_dir, work / "out", cores, ratio, placement)
        for placement in placements
        for ratio in ratios
    }
    if args.slow_layers:
        slow = write_demo_bundle(work / f"model-slow-{args.slow_layers}", slow_layers=args.slow_layers)
        job = tag_job_run(uris, slow, work / "out", cores, ratios[0], placements[0])
        runs[(f"{placements[0]}, model +{args.slow_layers} conv layers", ratios[0])] = job

    # (a) and (b), alternating, on one core
    original = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    one_core()
    a_times: list[float] = []
    b_times: dict[float, list[float]] = {ratio: [] for ratio in ratios}
    profile = cProfile.Profile()
    for r in range(args.rounds):
        a_times.append(minimal_loop(uris, model_dir, work / "out"))
        for ratio in ratios:
            watched = profile if r == 0 and ratio == ratios[0] else None
            b_times[ratio].append(stages_loop(uris, model_dir, work / "out", ratio, watched))
    if original:
        os.sched_setaffinity(0, original)
    a = n / min(a_times)

    print(f"machine: {cores} usable CPUs ({os.cpu_count()} visible); {n} JPEGs 2048x1536 q90 on local disk;")
    print("demo model (CL v2 contract, 384x384) on CPU, one intra-op thread per session")
    print("| run | img/s | ratio |")
    print("| --- | ---: | --- |")
    print(f"| (a) minimal loop, 1 core | {a:.1f} | |")
    for ratio in ratios:
        b = n / min(b_times[ratio])
        print(f"| (b) tagpipe stages loop, 1 core, draft ratio {ratio:g} | {b:.1f} | b/a = {b / a:.2f} |")
    for (placement, ratio), job in runs.items():
        b, c_tag, c_total = n / min(b_times[ratio]), n / job["tagging"], n / job["total"]
        at = f"{placement}, draft ratio {ratio:g}"
        spread = c_tag / (cores * b)
        phase = f"(c) tagpipe tag, {cores} cores, {at}, tagging phase"
        print(f"| {phase} | {c_tag:.1f} | c/(cores x b) = {spread:.2f} |")
        print(
            f"| (c) tagpipe tag, {cores} cores, {at}, end to end | {c_total:.1f} | c/a = {c_total / a:.2f} |"
        )
    for (placement, ratio), job in runs.items():
        at = f"(c) {placement}, draft ratio {ratio:g}"
        head = f"{at}, end to end {job['total']:.1f} s: Ray start {job['ray_start']:.1f} s"
        print(
            f"{head}, then "
            + ", ".join(f"{k.removesuffix('_seconds')} {v:.1f} s" for k, v in job["timings"].items())
        )
        print(f"{at}: {job['placement']}; {job['busy']}")
        cpu = ", ".join(
            f"{kind} {seconds:.1f} s" for kind, seconds in sorted(job["cpu"].items(), key=lambda kv: -kv[1])
        )
        print(f"{at}, CPU seconds by process during the run ({job['total']:.1f} s x {cores} cores): {cpu}")
    rounds_b = "; ".join(f"{r:g}: " + ", ".join(f"{t:.1f}" for t in times) for r, times in b_times.items())
    print(f"(a) rounds {', '.join(f'{t:.1f}' for t in a_times)} s; (b) rounds {rounds_b} s")
    totals = stage_breakdown(profile)
    spent = sum(totals.values())
    watched = f"round 1, draft ratio {ratios[0]:g}, {spent:.1f} s profiled"
    print(f"(b) CPU by stage (cProfile, {watched}; profiling slows it):")
    print("| stage | ms/image | share |")
    print("| --- | ---: | ---: |")
    for stage, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {stage} | {1e3 * seconds / n:.2f} | {seconds / spent:.0%} |")


if __name__ == "__main__":
    main()
