"""ONNX Runtime sessions on the provider that really works here.

onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU; asking for
it there logs an error and a stack of fallbacks. We ask the CUDA driver first (cuInit
and a device count, honouring CUDA_VISIBLE_DEVICES as Ray sets it per actor) and only
then request CUDA, and we report the provider the session actually runs on.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)


class ProviderChoice(enum.Enum):
    AUTO = "auto"  # CUDA where a GPU works, else CPU
    CPU = "cpu"
    CUDA = "cuda"  # fail if CUDA does not work
    TENSORRT = "tensorrt"  # TensorRT, then CUDA, then fail


@lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """Number of CUDA devices visible to this process, 0 without a working driver."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as Ray and cgroups set it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class SessionInfo:
    provider: str  # the first provider the session runs on
    intra_op_threads: int


def _providers(choice: ProviderChoice) -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    has_gpu = cuda_device_count() > 0
    if choice is ProviderChoice.CPU or (choice is ProviderChoice.AUTO and not has_gpu):
        return ["CPUExecutionProvider"]
    if not has_gpu or "CUDAExecutionProvider" not in available:
        if choice is ProviderChoice.AUTO:
            return ["CPUExecutionProvider"]
        raise RuntimeError(
            f"provider {choice.value} asked for, but no working CUDA device is visible "
            f"(devices: {cuda_device_count()}, onnxruntime providers: {sorted(available)})"
        )
    chain = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if choice is ProviderChoice.TENSORRT:
        if "TensorrtExecutionProvider" not in available:
            raise RuntimeError(
                "provider tensorrt asked for, but this onnxruntime build has no TensorRT provider"
            )
        chain.insert(0, "TensorrtExecutionProvider")
    return chain


def create_session(
    model: str | Path | bytes,
    choice: ProviderChoice = ProviderChoice.AUTO,
    intra_op_threads: int = 0,
    external_data_dir: str | Path | None = None,
):
    """An InferenceSession plus what it runs on. 0 threads: the CPUs this process may use.

    model is a path, or serialised bytes whose external weights live in external_data_dir.
    """
    import onnxruntime as ort

    providers = _providers(choice)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no provider-fallback noise on CPU machines
    threads = intra_op_threads or available_cpus()
    if providers == ["CPUExecutionProvider"]:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source: bytes | str
    if isinstance(model, bytes):
        if external_data_dir is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(external_data_dir)
            )
        source = model
    else:
        source = str(model)
    session = ort.InferenceSession(source, sess_options=options, providers=providers)
    ran_on = session.get_providers()[0]
    if choice is not ProviderChoice.CPU and ran_on != providers[0]:
        log.warning("asked for %s, session runs on %s", providers[0], ran_on)
    return session, SessionInfo(
        provider=ran_on, intra_op_threads=threads if ran_on == "CPUExecutionProvider" else 0
    )
