"""The GPU stage: one ONNX Runtime session per actor, uint8 in, tag columns out.

TaggerStage is a Ray Data callable class (heavy state in __init__, a batch in
__call__) and also a plain object for loops in tests. Resources (GPUs, CPUs, actor
count) are set where the stage is placed, in pipeline/job/graph.py, not here.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.core.errors import ErrorKind
from pipeline.core.schemas import tag_row_schema
from pipeline.core.words import counted
from pipeline.model.bundle import ModelBundle, load_bundle
from pipeline.model.onnx_tools import uint8_input_model
from pipeline.model.postprocess import Postprocessor
from pipeline.model.profiles import (
    ChannelOrder,
    Layout,
    Preprocess,
    Profile,
    ValueRange,
)
from pipeline.model.rules import RuleSettings
from pipeline.model.runtime import ProviderChoice, create_session

log = logging.getLogger(__name__)

PASSTHROUGH = ("uri", "sha256", "size", "width", "height", "phash", "phash_degenerate", "error", "error_kind")


@dataclass(frozen=True)
class TaggerSettings:
    model_dir: str
    profile: Profile | str | None = None  # None: detected from the bundle
    provider: ProviderChoice = ProviderChoice.AUTO
    intra_op_threads: int = 0
    run_id: str = ""
    dense_logits: bool = False
    normalise_in_graph: bool = True  # feed uint8 to prepended Cast/scale nodes (see onnx_tools)
    rules: RuleSettings = RuleSettings.model_validate(
        {}
    )  # over the profile's thresholds (threshold, floor, MCut, ...)
    batch_timeout: float = 0.0  # seconds one session call may take; 0: no limit


class ModelTimeout(Exception):
    pass


class Normaliser:
    """uint8 RGB NHWC -> the model's float input, as its profile says: scaled and
    normalised with the RGB-ordered mean and std, then put in the model's channel order."""

    def __init__(self, pre: Preprocess):
        std = np.asarray(pre.std, np.float32)
        mean = np.asarray(pre.mean, np.float32)
        unit = 255.0 if pre.value_range is ValueRange.UNIT else 1.0
        self.scale = (1.0 / (unit * std)).astype(np.float32)
        self.offset = (-mean / std).astype(np.float32)
        self.bgr = pre.channel_order is ChannelOrder.BGR
        self.nchw = pre.layout is Layout.NCHW

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels.astype(np.float32) * self.scale + self.offset
        if self.bgr:
            x = x[..., ::-1]
        if self.nchw:
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)


class TaggerStage:
    def __init__(self, settings: TaggerSettings, bundle: ModelBundle | None = None):
        self.settings = settings
        self.bundle = bundle or load_bundle(settings.model_dir, settings.profile)
        profile = self.bundle.profile
        model_input = profile.input_name or self.bundle.input_names[0]
        if settings.normalise_in_graph:
            graph, self.input_name = uint8_input_model(
                self.bundle.model_path, profile.preprocess, model_input
            )
            self.session, self.session_info = create_session(
                graph,
                settings.provider,
                settings.intra_op_threads,
                external_data_dir=Path(self.bundle.model_path).parent,
            )
            self.normalise = None  # uint8 goes straight in
        else:
            self.session, self.session_info = create_session(
                self.bundle.model_path, settings.provider, settings.intra_op_threads
            )
            self.input_name = model_input
            self.normalise = Normaliser(profile.preprocess)
        log.info(
            "tagger session on %s (%s, %s)",
            self.session_info.provider,
            self.bundle.model_path,
            "uint8 in" if self.normalise is None else "float in",
        )
        self.output_name = profile.output_name or self.bundle.output_names[0]
        self.embedding_name = self.bundle.embedding_output
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        fixed = shapes[self.input_name][0] if shapes.get(self.input_name) else None
        self.fixed_batch = (
            fixed if isinstance(fixed, int) and fixed > 0 else None
        )  # some WD exports take batch 1
        self.postprocess = Postprocessor.for_bundle(
            self.bundle, settings.rules, dense_logits=settings.dense_logits
        )
        width = self.bundle.embedding_width if self.embedding_name else None
        if self.embedding_name and width is None:
            width = self._probe_embedding_width()
        self.schema = tag_row_schema(self.postprocess.category_names, width)

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        names = [self.output_name] + ([self.embedding_name] if self.embedding_name else [])
        step = self.fixed_batch or len(x)
        parts = [self._session_run(names, x[i : i + step]) for i in range(0, len(x), step)]
        if len(parts) == 1:  # the usual case: no copy of a 100k-wide output
            return parts[0][0], (parts[0][1] if self.embedding_name else None)
        raw = np.concatenate([p[0] for p in parts])
        emb = np.concatenate([p[1] for p in parts]) if self.embedding_name else None
        return raw, emb

    def _session_run(self, names: list[str], x: np.ndarray) -> list[np.ndarray]:
        """session.run, stopped by ONNX Runtime's terminate flag once batch_timeout has
        passed (checked between graph nodes: a hung kernel is not interrupted)."""
        if not self.settings.batch_timeout:
            return self.session.run(names, {self.input_name: x})
        import onnxruntime as ort

        options = ort.RunOptions()
        timer = threading.Timer(self.settings.batch_timeout, lambda: setattr(options, "terminate", True))
        timer.start()
        try:
            return self.session.run(names, {self.input_name: x}, options)
        except Exception:
            if options.terminate:
                raise ModelTimeout(
                    f"model call on {counted(len(x), 'images')} took longer than the "
                    f"{self.settings.batch_timeout:g} s limit"
                ) from None
            raise
        finally:
            timer.cancel()

    def infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, list[tuple[str, str] | None]]:
        """Raw outputs for a batch and, per row, None or (error kind, message). A batch the
        model rejects is retried row by row; one that runs out of time is not (the rows
        are model_timeout errors, tried again by the next run)."""
        x = np.ascontiguousarray(pixels, np.uint8) if self.normalise is None else self.normalise(pixels)
        width = len(self.bundle.vocabulary)
        try:
            raw, emb = self._run(x)
            return raw, emb, [None] * len(x)
        except ModelTimeout as exc:
            log.warning("%s; its rows are error rows", exc)
            return np.zeros((len(x), width), np.float32), None, [(ErrorKind.MODEL_TIMEOUT, str(exc))] * len(x)
        except Exception as batch_exc:
            log.warning("model rejected a batch of %d (%s); retrying one by one", len(x), batch_exc)
        raw = np.zeros((len(x), width), np.float32)
        emb = None
        errors: list[tuple[str, str] | None] = []
        for i in range(len(x)):
            try:
                r, e = self._run(x[i : i + 1])
                raw[i] = r[0]
                if e is not None:
                    emb = emb if emb is not None else np.zeros((len(x), e.shape[1]), np.float32)
                    emb[i] = e[0]
                errors.append(None)
            except Exception as exc:
                errors.append((ErrorKind.MODEL_ERROR, f"{type(exc).__name__}: {exc}"[:500]))
        return raw, emb, errors

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["uri"])
        # an all-null string column can reach us as floats (NaN) after Arrow round trips
        error = np.asarray(_strings(batch["error"]), object)
        error_kind = np.asarray(_strings(batch["error_kind"]), object)
        ok = np.flatnonzero([e is None for e in error])
        results: dict[str, list] = {}
        embeddings = None
        if len(ok):
            pixels = np.asarray(batch["pixels"])
            raw, emb, model_errors = self.infer(
                pixels if len(ok) == n else pixels[ok]
            )  # no 100 MB copy when all decoded
            for j, failure in enumerate(model_errors):
                if failure is not None:
                    error_kind[ok[j]], error[ok[j]] = failure
            # only rows the model answered: a failed row's zeros would pass the floor for every tag
            good = np.flatnonzero([m is None for m in model_errors])
            if len(good) < len(raw):
                raw, emb = raw[good], (emb[good] if emb is not None else None)
            results = self.postprocess(raw, emb) if len(good) else {}
            embeddings = emb
            ok_rows = {int(ok[j]): k for k, j in enumerate(good)}
        else:
            ok_rows = {}
        return self._table(batch, n, error, error_kind, results, embeddings, ok_rows)

    def _probe_embedding_width(self) -> int:
        """The embedding width of a model whose graph leaves it symbolic: one blank image."""
        pre = self.bundle.profile.preprocess
        blank = np.zeros((1, pre.height, pre.width, 3), np.uint8)
        _raw, emb = self._run(blank if self.normalise is None else self.normalise(blank))
        assert emb is not None  # called only for a model with an embedding output
        return int(emb.shape[-1])

    def _table(self, batch, n, error, error_kind, results, embeddings, ok_rows) -> pa.Table:
        """The batch's rows in the declared schema (pipeline/core/schemas.py): the same column
        types whether every row failed, none did, or the model gave no embedding."""
        fp = self.bundle.fingerprint
        decoded = np.asarray([e is None for e in _strings(batch["error"])], bool)  # hash exists

        def per_row(key):
            return [results[key][ok_rows[i]] if i in ok_rows else None for i in range(n)]

        def emb_row(i):
            return (
                embeddings[ok_rows[i]].astype(np.float16) if i in ok_rows and embeddings is not None else None
            )

        values = {
            "uri": [str(u) for u in batch["uri"]],
            "sha256": _strings(batch["sha256"]),
            "size": np.asarray(batch["size"], np.int64),
            "width": np.asarray(batch["width"], np.int32),
            "height": np.asarray(batch["height"], np.int32),
            "phash": pa.array(np.asarray(batch["phash"], np.uint64), mask=~decoded),
            "phash_hex": [f"{int(h):016x}" if ok else None for h, ok in zip(batch["phash"], decoded)],
            "phash_degenerate": pa.array(np.asarray(batch["phash_degenerate"], bool), mask=~decoded),
            "error": list(error),
            "error_kind": list(error_kind),
            "model_name": [self.bundle.name] * n,
            "model_sha256": [fp.model_sha256] * n,
            "calibration_sha256": [fp.calibration_sha256] * n,
            "embedding": [emb_row(i) for i in range(n)],
            "run_id": [self.settings.run_id] * n,
            "tagged_at": [datetime.now(UTC)] * n,
        }
        arrays = [
            pa.array(values[f.name] if f.name in values else per_row(f.name), f.type) for f in self.schema
        ]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        for key in batch:  # other input columns travel along (the job's slice id)
            if key not in values and key != "pixels" and key not in self.schema.names:
                table = table.append_column(key, pa.array(list(batch[key])))
        return table


def _strings(values) -> list[str | None]:
    return [v if isinstance(v, str) else None for v in values]
