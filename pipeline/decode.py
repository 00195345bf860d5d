"""The CPU stage: read bytes, decode, preprocess, hash. One bad file never fails a batch.

DecodeStage is a plain callable on a dict-of-arrays batch: run it in a loop in tests,
or hand it to Dataset.map_batches. It emits uint8 pixels at the model's input size
(4x less object-store traffic than float32); normalisation happens next to inference.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time

import numpy as np

from pipeline.imaging import DecodeOptions, ImageError, decode_image
from pipeline.phash import is_degenerate
from pipeline.profiles import Preprocess
from pipeline.storage import read_bytes

DEFAULT_DECODE_TIMEOUT = 60.0  # seconds per image
DEFAULT_MAX_FILE_BYTES = 512 * 1024**2  # larger files are error rows, never read whole


class DecodeTimeout(ImageError):
    def __init__(self, seconds: float):
        super().__init__("decode_timeout", f"decoding took longer than the {seconds:g} s limit")


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise DecodeTimeout in the code below once it has run `seconds`.

    A SIGALRM handler raises it between Python steps (Pillow feeds its decoders from a
    Python loop, so a slow decode is interrupted within one chunk). It fires again every
    0.1 s, so a handler that swallows one exception does not let the image run on. Ray
    runs task code on the worker's main thread, where signals can be used; elsewhere
    (a thread), the limit is checked when the decode returns instead."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        started = time.monotonic()
        yield
        if seconds and time.monotonic() - started > seconds:
            raise DecodeTimeout(seconds)
        return

    def expired(signum, frame):
        raise DecodeTimeout(seconds)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


class DecodeStage:
    def __init__(
        self,
        preprocess: Preprocess,
        options: DecodeOptions = DecodeOptions(),
        storage_options: dict | None = None,
        timeout: float = DEFAULT_DECODE_TIMEOUT,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ):
        self.preprocess = preprocess
        self.options = options
        self.storage_options = storage_options or {}
        self.timeout = timeout  # seconds per image's decode; 0: none
        self.max_file_bytes = max_file_bytes  # at most this much of a file is read

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        uris = [str(u) for u in batch["uri"]]
        n = len(uris)
        pre = self.preprocess
        pixels = np.zeros((n, pre.height, pre.width, 3), np.uint8)
        width = np.zeros(n, np.int32)
        height = np.zeros(n, np.int32)
        size = np.zeros(n, np.int64)
        phash = np.zeros(n, np.uint64)
        degenerate = np.zeros(n, bool)
        sha256 = np.empty(n, object)
        error = np.full(n, None, object)
        error_kind = np.full(n, None, object)
        for i, uri in enumerate(uris):
            try:
                data = read_bytes(uri, self.storage_options, max_bytes=self.max_file_bytes + 1)
            except Exception as exc:  # a read that failed for good: a row, not a crash
                error_kind[i] = "not_found" if isinstance(exc, FileNotFoundError) else "read_error"
                error[i] = f"{type(exc).__name__}: {exc}"[:500]
                continue
            if len(data) > self.max_file_bytes:  # only the first max_file_bytes + 1 were read
                error_kind[i], error[i] = "too_large", f"file is larger than the {self.max_file_bytes}-byte limit (max_file_bytes)"
                continue
            size[i] = len(data)
            sha256[i] = hashlib.sha256(data).hexdigest()
            try:
                with time_limit(self.timeout):
                    decoded = decode_image(data, pre, self.options)
            except ImageError as exc:
                error_kind[i], error[i] = exc.kind, str(exc)[:500]
                continue
            except Exception as exc:  # a decoder bug must not take the batch down
                error_kind[i], error[i] = "decode_error", f"{type(exc).__name__}: {exc}"[:500]
                continue
            pixels[i] = decoded.pixels
            width[i], height[i] = decoded.width, decoded.height
            phash[i] = decoded.phash
            degenerate[i] = is_degenerate(decoded.phash)
        out = {key: np.asarray(batch[key]) for key in batch if key not in ("uri",)}
        out.update(
            uri=np.asarray(uris, object),
            pixels=pixels,
            width=width,
            height=height,
            size=size,
            sha256=sha256,
            phash=phash,
            phash_degenerate=degenerate,
            error=error,
            error_kind=error_kind,
        )
        return out
