"""Soak (issue 11): tag >= 50,000 small images on the local Ray and check that memory
stays flat and every row is present. Marked slow: not in the default run.

    python -m pytest -m slow tests/job/test_soak.py -s        # ~10 min on 2 cores

SOAK_IMAGES sets the count; SOAK_REPORT names a JSON file for the figures
(docs/reliability.md holds the last run's).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from PIL import Image

from pipeline.demo.synthetic import encode
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.table.tag_table import read_current

IMAGES = int(os.environ.get("SOAK_IMAGES", "50000"))


def _write_images(root, count: int) -> None:
    def write(start: int) -> None:
        rng = np.random.default_rng(start)
        folder = root / f"{start // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(start + 1000, count)):
            base = rng.integers(0, 256, 3)
            pixels = np.clip(base + rng.normal(0, 20, (48, 64, 3)), 0, 255).astype(np.uint8)
            (folder / f"img_{i:06d}.jpg").write_bytes(encode(Image.fromarray(pixels), "JPEG"))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(0, count, 1000)))


def _private(info) -> int:
    """RSS less shared pages: the object store's shared memory is mapped into every
    worker and the driver, and would otherwise be counted in each of them."""
    return info.rss - getattr(info, "shared", 0)


class MemorySampler:
    """Every 2 s: the driver's and the Ray workers' private RSS, the object store's use."""

    def __init__(self):
        self.samples: list[dict] = []
        self.by_name: dict[str, float] = {}  # worker process title -> its peak private RSS (MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from ray._private.internal_api import memory_summary

        me = psutil.Process()
        while not self._stop.is_set():
            workers, tagger = [], 0
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if cmd.startswith("ray::") and proc.info["memory_info"]:
                    workers.append(_private(proc.info["memory_info"]))
                    self.by_name[cmd[:60]] = max(self.by_name.get(cmd[:60], 0), workers[-1] / 2**20)
                    if "PassTagger" in cmd:
                        tagger = max(tagger, workers[-1])
            try:
                text = memory_summary(stats_only=True)
                used = next(
                    (
                        float(line.split("Plasma memory usage ")[1].split(" MiB")[0])
                        for line in text.splitlines()
                        if "Plasma memory usage" in line
                    ),
                    0.0,
                )
            except Exception:
                used = float("nan")
            self.samples.append(
                {
                    "t": time.monotonic(),
                    "driver_mib": _private(me.memory_info()) / 2**20,
                    "worker_max_mib": max(workers, default=0) / 2**20,
                    "tagger_mib": tagger / 2**20,
                    "workers_total_mib": sum(workers) / 2**20,
                    "object_store_mib": used,
                }
            )
            self._stop.wait(2.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
@pytest.mark.soak
def test_soak_50k_images_flat_memory_every_row(ray_session, demo_bundle, tmp_path):
    images = tmp_path / "images"
    started = time.monotonic()
    _write_images(images, IMAGES)
    generated = time.monotonic() - started
    out = tmp_path / "tags"
    cfg = make_tag_config(
        inputs=[str(images)], output=str(out), model=str(demo_bundle), rows_per_part=4096, batch_size=64
    )
    with MemorySampler() as sampler:
        summary = run_tag_job(cfg)
    table = read_current(str(out), columns=["uri", "error"])
    assert table.num_rows == IMAGES and len(set(table.column("uri").to_pylist())) == IMAGES  # every row, once
    assert table.column("error").null_count == IMAGES and summary.images == IMAGES

    samples = sampler.samples
    quarter = max(1, len(samples) // 4)
    early, late = samples[:quarter], samples[-quarter:]
    figures = {
        "images": IMAGES,
        "generate_seconds": round(generated, 1),
        "job_seconds": summary.seconds,
        "images_per_second": summary.images_per_second,
        "samples": len(samples),
        "driver_peak_mib": round(max(s["driver_mib"] for s in samples), 1),
        "driver_first_quarter_mean_mib": round(float(np.mean([s["driver_mib"] for s in early])), 1),
        "driver_last_quarter_mean_mib": round(float(np.mean([s["driver_mib"] for s in late])), 1),
        "worker_peak_mib": round(max(s["worker_max_mib"] for s in samples), 1),
        "workers_total_peak_mib": round(max(s["workers_total_mib"] for s in samples), 1),
        "object_store_peak_mib": round(float(np.nanmax([s["object_store_mib"] for s in samples])), 1),
        "object_store_last_quarter_mean_mib": round(
            float(np.nanmean([s["object_store_mib"] for s in late])), 1
        ),
    }
    tagged = [s["tagger_mib"] for s in samples if s["tagger_mib"]]
    figures["tagger_timeline_mib"] = [round(v) for v in tagged]
    figures["worker_peak_by_process_mib"] = {
        k: round(v, 1) for k, v in sorted(sampler.by_name.items(), key=lambda kv: -kv[1])[:6]
    }
    print(json.dumps(figures, indent=1))
    if os.environ.get("SOAK_REPORT"):
        with open(os.environ["SOAK_REPORT"], "w") as handle:
            json.dump({"figures": figures, "samples": samples}, handle)
    assert len(samples) >= 8, "the run was too short to judge"
    # flat: the driver grows by less than 150 MiB from the first quarter of the run to the last
    assert figures["driver_last_quarter_mean_mib"] - figures["driver_first_quarter_mean_mib"] < 150, figures
    # the tagger actor grows while ONNX Runtime's arena warms up, then holds: its last
    # quarter is within 100 MiB of its level at the end of the first half
    middle = tagged[len(tagged) // 2]
    assert float(np.mean(tagged[-max(1, len(tagged) // 4) :])) - middle < 100, figures
    assert figures["object_store_last_quarter_mean_mib"] < 2048, figures  # Ray Data's backpressure bounds it
