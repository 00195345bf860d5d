"""benchmarks/gpu.py: its CPU path runs end to end here (the GPU path is the same code
with the CUDA provider), and its model has the cost it claims."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu import CONFIGS, build_vit  # noqa: E402


def test_so400m_cost_matches_the_published_figure():
    cfg = CONFIGS["so400m"]
    assert cfg.patches == 729
    assert (
        0.64e12 < cfg.flops_per_image() < 0.70e12
    )  # issue 10: "about 0.65 TFLOP per image" (+0.25 GFLOP tag head)


def test_built_model_has_the_configured_shape_and_matmul_cost():
    cfg = CONFIGS["small"]
    model = build_vit(cfg, "float32")
    onnx.checker.check_model(model)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type == "MatMul":
            k, n = weights[node.input[1]].shape
            rows = (
                1
                if node.output[0].startswith(("pool.attn.q", "pool.attn.o", "pool.mlp", "head"))
                else cfg.patches
            )
            macs += rows * k * n
        elif node.op_type == "Conv":
            macs += cfg.patches * weights[node.input[1]].size
        elif node.op_type == "MultiHeadAttention":
            queries = 1 if node.output[0].startswith("pool") else cfg.patches
            macs += 2 * queries * cfg.patches * cfg.width
    assert 2 * macs == cfg.flops_per_image()  # the formula counts exactly the graph's products
    assert (
        weights["head.w"].shape == (cfg.width, cfg.tags)
        and sum(n.op_type == "LayerNormalization" for n in model.graph.node) == 2 * cfg.layers + 2
    )


@pytest.mark.slow  # ~70 s: the whole GPU benchmark script, run on CPU (`pytest -m slow`)
def test_cpu_path_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "out" / "gpu.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--config", "small", "--images", "24"]
    command += ["--seconds", "0.5", "--batch-sizes", "1,8", "--decode-seconds", "0.5"]
    command += ["--workdir", str(tmp_path), "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| \(a\) session, numpy in/out \| (\d+) \| ([0-9.]+) \|", done.stdout, re.M)
    assert [int(b) for b, _ in rows] == [1, 8] and all(float(r) > 0 for _, r in rows)
    figures = json.loads(out.read_text())  # what comes back from a device machine
    assert figures["provider"] == "CPUExecutionProvider" and figures["machine"]["cpus"] >= 1
    rates = {int(b): r for b, r in figures["session_img_per_s"].items()}
    assert figures["best_batch"] == max(rates, key=rates.get)
    decode = figures["decode"]
    assert decode["img_per_s_per_core"] > 0 and decode["ceiling_per_gpu"] == pytest.approx(
        decode["img_per_s_per_core"] * decode["cores"]
    )
    assert 0 < figures["host_ms_per_image"] < figures["session_ms_per_image_in_actor"] * 10
    jobs = figures["jobs"]
    assert set(jobs) == {"split", "fused"} and figures["placement_winner"] in jobs, figures.get("errors")
    assert "decode tasks" in jobs["split"]["placement"] and "(fused)" in jobs["fused"]["placement"]
    assert "1 batch(es) in flight" in jobs["split"]["placement"]  # CPU: one call at a time
    for job in jobs.values():
        assert job["images"] == 24 and job["img_per_s"] > 0 and job["ratio_to_session"] > 0
        assert 0 <= job["tagger_busy"] <= 1 and 0 <= job["decode_busy"] <= 1 and job["verdict"]
        assert job["gpu_busy_nvml"] == {} and job["gpu_busy_nvidia_smi"] is None  # no GPU here
    phases = figures["phase_seconds"]
    assert {"images", "model build", "(a) session", "(d) decode per core", "(b) tag, fused"} <= set(phases)
    assert figures["total_seconds"] >= sum(phases.values()) * 0.99
    assert re.search(r"^total \d+ s \(budget 480 s", done.stdout, re.M)


def test_fp16_model_runs_through_the_uint8_input(tmp_path):
    from gpu import session_throughput, write_bundle

    bundle = write_bundle(tmp_path / "fp16", CONFIGS["small"], "float16")
    rates, provider = session_throughput(bundle, [2], seconds=0.1, io_binding=False)
    assert rates[2] > 0 and provider == "CPUExecutionProvider"
    assert write_bundle(tmp_path / "fp16", CONFIGS["small"], "float16") == bundle  # built once, reused
