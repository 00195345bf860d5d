"""The CPU stage: read bytes, decode, preprocess, hash. One bad file never fails a batch.

DecodeStage is a plain callable on a dict-of-arrays batch: run it in a loop in tests,
or hand it to Dataset.map_batches. It emits uint8 pixels at the model's input size
(4x less object-store traffic than float32); normalisation happens next to inference.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.imaging import DecodeOptions, ImageError, decode_image
from pipeline.phash import is_degenerate
from pipeline.profiles import Preprocess
from pipeline.storage import read_bytes


class DecodeStage:
    def __init__(self, preprocess: Preprocess, options: DecodeOptions = DecodeOptions(), storage_options: dict | None = None):
        self.preprocess = preprocess
        self.options = options
        self.storage_options = storage_options or {}

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
                data = read_bytes(uri, self.storage_options)
            except Exception as exc:  # a read that failed for good: a row, not a crash
                error_kind[i] = "not_found" if isinstance(exc, FileNotFoundError) else "read_error"
                error[i] = f"{type(exc).__name__}: {exc}"[:500]
                continue
            size[i] = len(data)
            sha256[i] = hashlib.sha256(data).hexdigest()
            try:
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
