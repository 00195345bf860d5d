"""GPU throughput: the ONNX Runtime session alone (a) vs the full `tagpipe tag` job (b).

The one command for a GPU machine (one H100/H200, 16 cores; budget 8 minutes, ~4 expected):

    pip install -e '.[test]' 'onnxruntime-gpu[cuda,cudnn]' nvidia-ml-py   # NVML optional
    python benchmarks/gpu.py --out $OUT/gpu.json  # GPU: so400m/14 @384 + 108k-tag head, fp16
    python benchmarks/gpu.py --config small       # CPU-sized: runs anywhere (tested)

Builds, without downloading weights, a model with CL Tagger v2's shape and cost: a
SigLIP vision tower (so400m/14 @384: 27 layers, width 1152, MLP 4304, 16 heads, 729
patches; attention-pooling head) with random weights and a 108k-tag linear head, as an
ONNX bundle (ORT's MultiHeadAttention op, fp16 or fp32, weights as external data) that
tagpipe loads like the real one (profile cl_tagger_v2). Then measures

  a. the session alone, on the uint8-input model the job runs (normalisation in the
     graph), per batch size: img/s and achieved TFLOP/s; on CUDA also with IO binding
     (inputs and outputs kept on the GPU);
  c. the tagger actor's host work per image: TaggerStage time outside the session
     (screening the 108k-wide output, tags, Arrow rows), against the session's time
     per image; with one call at a time the GPU idles for all of it;
  d. DecodeStage alone on one core (the job's decode options): x the machine's cores /
     its GPUs = the CPU decode ceiling per GPU, against (a);
  b. `run_tag_job` on one GPU with this machine's CPUs over synthetic 3 MP JPEGs, under
     decode_placement split and fused: img/s, b / a, the run's own BusyTime (tagger and
     decode busy, NVML per GPU) and nvidia-smi's GPU busy, and which placement won;

and prints one table, each phase's seconds and the total. --out: every figure as JSON,
rewritten after each phase. Targets (issues 10, 34): b >= 90% of a; a >= 50% of the
FLOP limit on an H100/H200; tagger busy >= 90% where decode allows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))


@dataclass(frozen=True)
class VitConfig:
    image: int = 384
    patch: int = 14
    width: int = 1152
    mlp: int = 4304
    heads: int = 16
    layers: int = 27
    tags: int = 108_000

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2

    def flops_per_image(self) -> float:
        """2 x multiply-adds of the matrix products (what bounds the GPU)."""
        n, d, f = self.patches, self.width, self.mlp
        patch = n * 3 * self.patch**2 * d
        layer = n * (4 * d * d + 2 * d * f) + 2 * n * n * d
        pool = d * d + 2 * n * d * d + d * d + 2 * n * d + 2 * d * f  # probe q, k/v, out, attention, MLP
        head = d * self.tags
        return 2.0 * (patch + self.layers * layer + pool + head)


CONFIGS = {
    "so400m": VitConfig(),
    "small": VitConfig(image=384, patch=32, width=64, mlp=128, heads=4, layers=2, tags=2000),
    # the small tower with the real 108k-tag head: the actor's host work per image as in
    # the real job, measurable on a CPU
    "head": VitConfig(image=384, patch=32, width=64, mlp=128, heads=4, layers=2, tags=108_000),
}


def build_vit(cfg: VitConfig, dtype: str = "float16", seed: int = 0) -> onnx.ModelProto:
    """SigLIP-style ViT + MAP pooling + linear tag head; input pixel_values [B,3,S,S]."""
    rng = np.random.default_rng(seed)
    np_type = np.float16 if dtype == "float16" else np.float32
    onnx_type = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    d, n = cfg.width, cfg.patches
    inits, nodes = [], []

    def weight(name, *shape, scale=None):
        std = scale if scale is not None else 1.0 / math.sqrt(shape[0])
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal(shape, dtype=np.float32) * std).astype(np_type), name
            )
        )
        return name

    def const(name, values, kind=np.int64):
        inits.append(numpy_helper.from_array(np.asarray(values, kind), name))
        return name

    def ones(name, size):
        inits.append(numpy_helper.from_array(np.ones(size, np_type), name))
        return name

    def zeros(name, size):
        inits.append(numpy_helper.from_array(np.zeros(size, np_type), name))
        return name

    def node(op, inputs, output, domain=None, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], domain=domain, **attrs))
        return output

    def layer_norm(x, name):
        return node(
            "LayerNormalization",
            [x, ones(f"{name}.g", d), zeros(f"{name}.b", d)],
            f"{name}.out",
            axis=-1,
            epsilon=1e-6,
        )

    def linear(x, name, fan_in, fan_out):
        y = node("MatMul", [x, weight(f"{name}.w", fan_in, fan_out)], f"{name}.mm")
        return node("Add", [y, zeros(f"{name}.b", fan_out)], f"{name}.out")

    def gelu(x, name):  # exact GELU, which ORT fuses: 0.5 x (1 + erf(x / sqrt 2))
        inits.append(numpy_helper.from_array(np.array(1 / math.sqrt(2), np_type), f"{name}.c"))
        inits.append(numpy_helper.from_array(np.array(1.0, np_type), f"{name}.one"))
        inits.append(numpy_helper.from_array(np.array(0.5, np_type), f"{name}.half"))
        e = node("Erf", [node("Mul", [x, f"{name}.c"], f"{name}.s")], f"{name}.erf")
        return node(
            "Mul",
            [node("Mul", [x, node("Add", [e, f"{name}.one"], f"{name}.p")], f"{name}.xp"), f"{name}.half"],
            f"{name}.out",
        )

    def mlp(x, name):
        return linear(gelu(linear(x, f"{name}.fc1", d, cfg.mlp), f"{name}.act"), f"{name}.fc2", cfg.mlp, d)

    def attention(q_in, kv_in, name):
        q = linear(q_in, f"{name}.q", d, d)
        k = linear(kv_in, f"{name}.k", d, d)
        v = linear(kv_in, f"{name}.v", d, d)
        a = node("MultiHeadAttention", [q, k, v], f"{name}.mha", domain="com.microsoft", num_heads=cfg.heads)
        return linear(a, f"{name}.o", d, d)

    x = node(
        "Conv",
        [
            "pixel_values",
            weight("patch.w", d, 3, cfg.patch, cfg.patch, scale=1 / math.sqrt(3 * cfg.patch**2)),
        ],
        "patch.conv",
        strides=[cfg.patch] * 2,
    )
    x = node("Add", [x, zeros("patch.b", (d, 1, 1))], "patch.out")
    x = node("Reshape", [x, const("shape.bdn", [0, d, n])], "tokens.bdn")
    x = node("Transpose", [x], "tokens", perm=[0, 2, 1])
    x = node("Add", [x, weight("pos", 1, n, d, scale=0.02)], "tokens.pos")
    for i in range(cfg.layers):
        h = layer_norm(x, f"l{i}.ln1")
        x = node("Add", [x, attention(h, h, f"l{i}.attn")], f"l{i}.res1")
        x = node("Add", [x, mlp(layer_norm(x, f"l{i}.ln2"), f"l{i}.mlp")], f"l{i}.res2")
    x = layer_norm(x, "post_ln")
    # attention pooling (SigLIP's MAP head): one learned probe attends over the tokens
    batch = node("Shape", [x], "shape.x", start=0, end=1)
    probe_shape = node("Concat", [batch, const("shape.1d", [1, d])], "shape.probe", axis=0)
    probe = node("Expand", [weight("probe", 1, 1, d, scale=0.02), probe_shape], "probe.b")
    pooled = attention(probe, x, "pool.attn")
    pooled = node("Add", [pooled, mlp(layer_norm(pooled, "pool.ln"), "pool.mlp")], "pool.res")
    embedding = node("Reshape", [pooled, const("shape.bd", [0, d])], "embedding.t")
    # A real tagger's logits are sparse: most of its 108k tags are far below any
    # threshold for a given image. Zero biases would put half of them above it and make
    # the job's post-processing (and the stored rows) hundreds of times heavier than
    # real, so biases follow a tagger's shape: a few hundred common tags near the
    # threshold, the long tail far below.
    bias = np.full(cfg.tags, -12.0, np.float32)
    common = rng.choice(cfg.tags, size=min(400, cfg.tags), replace=False)
    bias[common] = rng.normal(-3.0, 2.5, len(common))
    inits.append(numpy_helper.from_array(bias.astype(np_type), "head.b"))
    logits = node(
        "Add", [node("MatMul", [embedding, weight("head.w", d, cfg.tags)], "head.mm"), "head.b"], "head.out"
    )
    nodes.append(
        helper.make_node("Cast", [logits], ["logits"], to=TensorProto.FLOAT)
    )  # the job stores float16 logits anyway
    nodes.append(helper.make_node("Cast", [embedding], ["embedding"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        "siglip_tagger_benchmark",
        [helper.make_tensor_value_info("pixel_values", onnx_type, ["batch", 3, cfg.image, cfg.image])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.tags]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", d]),
        ],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        producer_name="tagpipe-benchmark",
    )
    model.ir_version = 8
    return model


def write_bundle(directory: Path, cfg: VitConfig, dtype: str) -> Path:
    """A CL Tagger v2-style bundle: model.onnx (+ .data) and model_vocabulary.json."""
    from pipeline.demo.model import save_with_external_data

    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / "config.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {**asdict(cfg), "dtype": dtype}:
        return directory  # built before: random weights take a while at full size
    save_with_external_data(build_vit(cfg, dtype), directory / "model.onnx")
    tags = [f"tag_{i:06d}" for i in range(cfg.tags)]
    categories = ["General"] * (cfg.tags - 8) + ["Rating"] * 4 + ["Quality"] * 4
    vocab = {
        "tag_to_idx": {t: i for i, t in enumerate(tags)},
        "idx_to_tag": {str(i): t for i, t in enumerate(tags)},
        "tag_to_category": dict(zip(tags, categories)),
        "categories": ["General", "Rating", "Quality"],
    }
    (directory / "model_vocabulary.json").write_text(json.dumps(vocab))
    stamp.write_text(json.dumps({**asdict(cfg), "dtype": dtype}))
    return directory


def session_throughput(
    bundle: Path, batch_sizes: list[int], seconds: float, io_binding: bool
) -> tuple[dict[int, float], str]:
    """(a): img/s of the uint8-input model the job runs, per batch size."""
    import onnxruntime as ort

    from pipeline.model.bundle import load_bundle
    from pipeline.model.onnx_tools import uint8_input_model
    from pipeline.model.runtime import ProviderChoice, create_session

    loaded = load_bundle(bundle, "cl_tagger_v2")
    model, input_name = uint8_input_model(
        loaded.model_path, loaded.profile.preprocess, loaded.profile.input_name or "pixel_values"
    )
    session, info = create_session(model, ProviderChoice.AUTO, external_data_dir=bundle)
    provider = info.provider
    size = loaded.profile.preprocess.width
    on_gpu = provider == "CUDAExecutionProvider"
    rates = {}
    for batch in batch_sizes:
        x = np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        if io_binding and on_gpu:
            binding = session.io_binding()
            binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
            for out in session.get_outputs():
                binding.bind_output(out.name, "cuda")

            def run(binding=binding):
                session.run_with_iobinding(binding)
        else:

            def run(x=x):
                session.run(None, {input_name: x})

        run()  # warm-up (kernel selection, allocations)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or done < 3:
            run()
            done += 1
        rates[batch] = done * batch / (time.perf_counter() - started)
    return rates, provider


class GpuSampler:
    """The GPU's busy fraction from nvidia-smi, sampled every 100 ms (None without one)."""

    def __init__(self):
        self.samples: list[float] = []
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
            )
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.strip().splitlines()[0]) / 100)
            self._stop.wait(0.1)

    def __exit__(self, *exc):
        self._stop.set()

    def busy(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def host_work(bundle: Path, batch: int, repeats: int = 3) -> tuple[float, float]:
    """(c): seconds per image a TaggerStage call spends outside the session, and inside it."""
    from pipeline.model.tagger import TaggerSettings, TaggerStage

    class TimedTagger(TaggerStage):
        session_seconds = 0.0

        def infer(self, pixels):  # the session call (uint8 goes in as is)
            started = time.perf_counter()
            try:
                return super().infer(pixels)
            finally:
                self.session_seconds += time.perf_counter() - started

    stage = TimedTagger(TaggerSettings(str(bundle), profile="cl_tagger_v2"))
    size = stage.bundle.profile.preprocess.width
    rng = np.random.default_rng(0)
    rows = {
        "uri": np.array([f"s3://bucket/images/{i:08d}.jpg" for i in range(batch)], object),
        "sha256": np.array([f"{i:064x}" for i in range(batch)], object),
        "size": np.full(batch, 1_500_000),
        "width": np.full(batch, 2048),
        "height": np.full(batch, 1536),
        "phash": rng.integers(0, 2**63, batch, dtype=np.uint64),
        "phash_degenerate": np.zeros(batch, bool),
        "error": np.array([None] * batch, object),
        "error_kind": np.array([None] * batch, object),
        "pixels": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
    }
    stage(rows)  # warm-up
    stage.session_seconds = 0.0
    started = time.perf_counter()
    for _ in range(repeats):
        stage(rows)
    total = time.perf_counter() - started
    images = repeats * batch
    return (total - stage.session_seconds) / images, stage.session_seconds / images


BUDGET_SECONDS = 480  # the whole command on one 16-core H100/H200 machine (issue 34)
IMAGES_PER_TASK = 50  # JPEGs one process makes at a time


def cuda_libraries_on_path() -> list[str]:
    """onnxruntime-gpu finds CUDA and cuDNN installed as pip wheels (nvidia-*-cu12) only
    when preloaded or on LD_LIBRARY_PATH: preloaded here for this process, and put on the
    path for Ray's workers, which inherit this environment. Returns the folders added."""
    import importlib.util

    import onnxruntime as ort

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    folders = sorted({str(p) for root in roots for p in Path(root).glob("*/lib") if p.is_dir()})
    if folders:
        old = os.environ.get("LD_LIBRARY_PATH", "")
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([*folders, *([old] if old else [])])
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    return folders


def _make_images_task(directory: Path, start: int, count: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sample_photos import mosaic_3mp

    for i, data in enumerate(mosaic_3mp(count, seed=1000 + start)):
        (directory / f"img_{start + i:05d}.jpg").write_bytes(data)


def make_images(directory: Path, count: int, workers: int) -> list[str]:
    """`count` distinct 3 MP JPEGs (tests/sample_photos.py's mosaic, its grain seeded per
    task), made on every core: one core makes 5-10 a second, too few for thousands
    within the time budget. Kept for the next run in the same workdir."""
    directory.mkdir(parents=True, exist_ok=True)
    if len(list(directory.glob("*.jpg"))) != count:
        for stale in directory.glob("*.jpg"):
            stale.unlink()
        starts = range(0, count, IMAGES_PER_TASK)
        context = multiprocessing.get_context("spawn")  # no fork of a process with runtime threads
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            sizes = [min(IMAGES_PER_TASK, count - s) for s in starts]
            list(pool.map(_make_images_task, [directory] * len(sizes), starts, sizes))
    return [str(p) for p in sorted(directory.glob("*.jpg"))]


def job_config(bundle: Path, images: Path, out: Path, **settings):
    from pipeline.job.settings import make_tag_config

    return make_tag_config(
        inputs=[str(images)],
        output=str(out),
        model=str(bundle),
        profile="cl_tagger_v2",
        rows_per_part=1024,
        edit_calibration_images=0,  # after the commit, outside the tagging phase: not measured
        **settings,
    )


def decode_per_core(bundle: Path, uris: list[str], seconds: float) -> float:
    """(d): img/s of DecodeStage alone on one core (read, sha256, the job's decode to the
    model's size, phash), as each decode task or fused actor runs it. The CPU decode
    ceiling per GPU is this x the machine's cores / its GPUs."""
    from pipeline.image.decode import DecodeStage
    from pipeline.job.graph import decode_options
    from pipeline.model.bundle import load_bundle

    cfg = job_config(bundle, Path(uris[0]).parent, Path("/nonexistent"))
    stage = DecodeStage(load_bundle(bundle, "cl_tagger_v2").profile.preprocess, decode_options(cfg))
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})  # this thread only: the rest keep theirs
    try:
        stage({"uri": np.asarray(uris[:2], object)})  # warm-up (imports, BLAS)
        done, started, batch = 0, time.perf_counter(), 16
        while time.perf_counter() - started < seconds or done == 0:
            chunk = [uris[(done + i) % len(uris)] for i in range(batch)]
            stage({"uri": np.asarray(chunk, object)})
            done += batch
        return done / (time.perf_counter() - started)
    finally:
        if affinity:
            os.sched_setaffinity(0, affinity)


def job_run(bundle: Path, images: Path, out: Path, session_rate: float, **settings) -> dict:
    """(b): `run_tag_job` over the JPEGs with these settings; its figures, its busy time."""
    from pipeline.job.tag_job import run_tag_job

    shutil.rmtree(out, ignore_errors=True)
    with GpuSampler() as sampler:
        summary = run_tag_job(job_config(bundle, images, out, **settings))
    tag = summary.timings["tag_seconds"]
    first = summary.timings.get("first_rows_seconds") or 0.0
    # after the first rows: actor start-up and model load left out (None when too few
    # rows came after them to time, as with a handful of images)
    after = tag - first
    steady = (summary.images - settings["batch_size"]) / after if after >= 1.0 else None
    busy = summary.busy
    return {
        "settings": {k: str(v) for k, v in settings.items()},
        "placement": summary.placement,
        "images": summary.images,
        "tag_seconds": tag,
        "first_rows_seconds": first,
        "img_per_s": summary.images / tag,
        "img_per_s_after_first_rows": steady,
        "ratio_to_session": (steady or summary.images / tag) / session_rate,
        "tagger_busy": busy.tagger if busy else None,
        "tagger_busy_per_actor": busy.tagger_actors if busy else {},
        "decode_busy": busy.decode if busy else None,
        "gpu_busy_nvml": busy.gpus if busy else {},
        "gpu_busy_nvidia_smi": sampler.busy(),
        "verdict": busy.verdict if busy else "",
    }


class Phases:
    """Each phase's seconds, printed as it ends; every figure so far written to --out
    after each phase, so a run cut short still returns what it measured."""

    def __init__(self, results: dict, out: Path | None):
        self.results, self.out, self.started = results, out, time.perf_counter()
        results["phase_seconds"] = {}

    @contextlib.contextmanager
    def phase(self, name: str, fatal: bool = True):
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:
            if fatal:
                raise
            self.results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"phase {name} failed: {exc}", file=sys.stderr)
        finally:
            seconds = round(time.perf_counter() - started, 2)
            self.results["phase_seconds"][name] = seconds
            self.results["total_seconds"] = round(time.perf_counter() - self.started, 2)
            print(f"[phase {name}: {seconds:.1f} s, total {self.results['total_seconds']:.1f} s]", flush=True)
            self.write()

    def write(self) -> None:
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.results, indent=2, default=str))


def machine_text() -> dict:
    import onnxruntime as ort

    from pipeline.model.runtime import available_cpus

    gpu_names = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        gpu_names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpus": available_cpus(),
        "gpus": gpu_names,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="so400m")
    parser.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        default=None,
        help="default: float16 on GPU, float32 on CPU",
    )
    parser.add_argument(
        "--batch-sizes", default=None, help="comma-separated; default 32,64,128,256 (GPU) or 1,4,16 (CPU)"
    )
    parser.add_argument(
        "--images", type=int, default=None, help="JPEGs for (b); default 3000 (GPU) or 64 (CPU)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="per batch size in (a); default 5 (GPU) or 2 (CPU)"
    )
    parser.add_argument(
        "--decode-seconds", type=float, default=None, help="for (d); default 10 (GPU) or 2 (CPU)"
    )
    parser.add_argument(
        "--fused-actors",
        type=int,
        default=None,
        help="tagger actors sharing the GPU in the fused run (each decodes on one core); "
        "default min(8, cores / 2); on CPU the job's own choice",
    )
    parser.add_argument(
        "--fused-batch",
        type=int,
        default=None,
        help="batch size of the fused run; default the smallest of (a)'s",
    )
    parser.add_argument("--workdir", default="/tmp/tagpipe-bench")
    parser.add_argument(
        "--out", default=None, help="a JSON file with every figure (written after each phase)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cuda_folders = cuda_libraries_on_path()
    import onnxruntime as ort

    from pipeline.model.runtime import available_cpus

    gpu = "CUDAExecutionProvider" in ort.get_available_providers() and shutil.which("nvidia-smi") is not None
    cfg = CONFIGS[args.config]
    dtype = args.dtype or ("float16" if gpu else "float32")
    batch_sizes = [int(b) for b in (args.batch_sizes or ("32,64,128,256" if gpu else "1,4,16")).split(",")]
    seconds = args.seconds or (5.0 if gpu else 2.0)
    count = args.images or (3000 if gpu else 64)
    cores = available_cpus()
    work = Path(args.workdir)
    results: dict = {"machine": machine_text() | {"cuda_library_folders": cuda_folders}}
    results["model"] = {"config": args.config, **asdict(cfg), "dtype": dtype, "flops": cfg.flops_per_image()}
    phases = Phases(results, Path(args.out) if args.out else None)

    with phases.phase("images"):
        uris = make_images(work / f"images-{count}", count, cores)
    with phases.phase("model build"):
        bundle = write_bundle(work / f"vit-{args.config}-{dtype}", cfg, dtype)
    with phases.phase("(a) session"):
        rates, provider = session_throughput(bundle, batch_sizes, seconds, io_binding=False)
        results["provider"], results["session_img_per_s"] = provider, rates
    if gpu and provider != "CUDAExecutionProvider":
        raise SystemExit(
            f"a GPU is present but the session runs on {provider}: CUDA/cuDNN libraries not found "
            "(pip install 'onnxruntime-gpu[cuda,cudnn]'); stopping rather than timing the model on CPU"
        )
    if provider == "CUDAExecutionProvider":
        with phases.phase("(a) session, IO binding"):
            results["session_io_binding_img_per_s"] = session_throughput(bundle, batch_sizes, seconds, True)[
                0
            ]
    best = max(rates, key=rates.get)
    results["best_batch"] = best
    with phases.phase("(c) host work"):
        host, inside = host_work(bundle, best)
        results["host_ms_per_image"], results["session_ms_per_image_in_actor"] = host * 1e3, inside * 1e3
    with phases.phase("(d) decode per core"):
        per_core = decode_per_core(bundle, uris, args.decode_seconds or (10.0 if gpu else 2.0))
        gpus = max(len(results["machine"]["gpus"]), 1) if gpu else 1
        results["decode"] = {
            "img_per_s_per_core": per_core,
            "cores": cores,
            "gpus": gpus,
            "ceiling_per_gpu": per_core * cores / gpus,
            "ceiling_over_session": per_core * cores / gpus / rates[best],
        }
    job_runs(args, results, phases, bundle, work, count, gpu)
    print_table(results)
    phases.write()
    return results


def job_runs(args, results: dict, phases: Phases, bundle: Path, work: Path, count: int, gpu: bool) -> None:
    """(b) under decode_placement split and fused, one Ray for both; a failed run is
    recorded and the other still runs."""
    from tag_job import start_local_ray

    rates, best, cores = results["session_img_per_s"], results["best_batch"], results["decode"]["cores"]
    fused_actors = args.fused_actors or (min(8, max(1, cores // 2)) if gpu else 1)
    fused_batch = args.fused_batch or (min(rates) if gpu else best)
    runs = {
        "split": dict(decode_placement="split", batch_size=best, tagger_actors=1),
        "fused": dict(
            decode_placement="fused",
            batch_size=fused_batch,
            tagger_actors=fused_actors,
            **({"gpus_per_actor": 1 / fused_actors} if gpu else {}),
        ),
    }
    with phases.phase("ray start"):
        ray = start_local_ray()
    results["jobs"] = {}
    try:
        for name, settings in runs.items():
            session_rate = rates.get(settings["batch_size"], rates[best])
            with phases.phase(f"(b) tag, {name}", fatal=False):
                out = work / "out" / f"gpu-bench-{name}"
                results["jobs"][name] = job_run(
                    bundle, work / f"images-{count}", out, session_rate, **settings
                )
    finally:
        ray.shutdown()
    done = results["jobs"]
    if done:
        results["placement_winner"] = max(done, key=lambda name: job_rate(done[name]))


def job_rate(job: dict) -> float:
    """A run's img/s: after its first rows where timed, else over its whole tagging phase."""
    return job["img_per_s_after_first_rows"] or job["img_per_s"]


def print_table(results: dict) -> None:
    model, machine, decode = results["model"], results["machine"], results["decode"]
    flops, best = model["flops"], results["best_batch"]
    print(
        f"model: {model['config']} ({model['layers']} layers, width {model['width']}, "
        f"{(model['image'] // model['patch']) ** 2} patches, {model['tags']} tags), {model['dtype']}, "
        f"{flops / 1e9:.2f} GFLOP/image; provider {results['provider']}; {machine['cpus']} CPUs; "
        f"GPUs: {', '.join(machine['gpus']) or 'none'}"
    )
    print("| run | batch | img/s | TFLOP/s |")
    print("| --- | ---: | ---: | ---: |")
    for batch, rate in results["session_img_per_s"].items():
        print(f"| (a) session, numpy in/out | {batch} | {rate:.1f} | {rate * flops / 1e12:.3f} |")
    for batch, rate in results.get("session_io_binding_img_per_s", {}).items():
        print(f"| (a) session, IO binding | {batch} | {rate:.1f} | {rate * flops / 1e12:.3f} |")
    host, rate = results["host_ms_per_image"], results["session_img_per_s"][best]
    print(
        f"| (c) tagger host work outside the session, {model['tags']} tags | {best} | {1e3 / host:.1f} | "
        f"host {host:.3f} ms/img = {host / (1e3 / rate):.1%} of the session's {1e3 / rate:.3f} ms/img |"
    )
    ceiling = f"ceiling {decode['ceiling_per_gpu']:.0f} img/s per GPU"
    print(
        f"| (d) decode alone, one core | 16 | {decode['img_per_s_per_core']:.1f} | "
        f"x {decode['cores']} cores / {decode['gpus']} GPU(s) = {ceiling}, "
        f"{decode['ceiling_over_session']:.2f}x the session's {rate:.0f} |"
    )
    for name, job in results["jobs"].items():
        print(
            f"| (b) tagpipe tag, {name}, {job['images']} JPEGs (3 MP) | {job['settings']['batch_size']} | "
            f"{job_rate(job):.1f} | {job_rate(job) * flops / 1e12:.3f} |"
        )
    print_jobs(results)


def print_jobs(results: dict) -> None:
    for name, job in results["jobs"].items():
        smi = job["gpu_busy_nvidia_smi"]
        nvml = ", ".join(f"GPU {g} {b:.0%}" for g, b in job["gpu_busy_nvml"].items()) or "n/a"
        print(
            f"{name}: b / a {job['ratio_to_session']:.2%} (target >= 90%); {job['img_per_s']:.1f} img/s over "
            f"the whole tagging phase ({job['tag_seconds']:.1f} s, first rows after "
            f"{job['first_rows_seconds']:.1f} s); tagger busy {job['tagger_busy']:.0%} ({job['verdict']}), "
            f"decode busy {job['decode_busy']:.0%}; GPU busy: NVML {nvml}, nvidia-smi "
            f"{'n/a' if smi is None else f'{smi:.0%}'}"
        )
        print(f"  placement: {job['placement']}")
    for name, error in results.get("errors", {}).items():
        print(f"{name} FAILED: {error.splitlines()[0]}")
    if "placement_winner" in results:
        print(
            f"faster placement here (img/s after the first rows where timed): {results['placement_winner']}"
        )
    decode = results["decode"]
    if decode["ceiling_over_session"] < 1:
        print("decode bounds the GPU: GPU JPEG decode (docs/decisions.md, 'GPU JPEG decode') would pay")
    total = results["total_seconds"]
    print(
        f"total {total:.0f} s (budget {BUDGET_SECONDS} s on a 16-core H100/H200): {results['phase_seconds']}"
    )


if __name__ == "__main__":
    main()
