"""One model's ONNX Runtime session, fed uint8 pixels: the raw outputs of a batch.

The runner owns what calling the session safely takes: feeding a model whose export
takes a fixed batch (some WD exports take 1) in steps of that size, stopping a call past
the batch timeout, and retrying a batch the model rejects row by row so that one bad
row does not fail the others. Turning the outputs into tag rows is the row builder's job
(tag_rows); TaggerStage (tagger) puts the two together.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.core.errors import ErrorKind
from pipeline.core.words import counted
from pipeline.model.bundle import ModelBundle
from pipeline.model.onnx_tools import uint8_input_model
from pipeline.model.profiles import ChannelOrder, Layout, Preprocess, ValueRange
from pipeline.model.runtime import ProviderChoice, create_session

log = logging.getLogger(__name__)

RowFailure = tuple[str, str] | None  # (error kind, message) for a row the model did not answer


class ModelTimeout(Exception):
    pass


class BusyClock:
    """Wall time some call was inside a measured section: the union over overlapping
    calls (two batches in flight in one session count their shared second once), so
    busy seconds over wall seconds is the fraction of the time the session was running.
    Cheap enough for every session call: a lock and two monotonic reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._since = 0.0
        self._seconds = 0.0

    @contextlib.contextmanager
    def running(self):
        with self._lock:
            if not self._active:
                self._since = time.monotonic()
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if not self._active:
                    self._seconds += time.monotonic() - self._since

    @property
    def seconds(self) -> float:
        """Busy seconds so far, a section still running counted up to now."""
        with self._lock:
            return self._seconds + (time.monotonic() - self._since if self._active else 0.0)


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


class SessionRunner:
    """The bundle's session, with its scores output and (when it has one) its embedding.

    normalise_in_graph: uint8 goes into Cast/scale nodes prepended to the graph
    (onnx_tools); otherwise numpy normalises first (Normaliser)."""

    def __init__(
        self,
        bundle: ModelBundle,
        provider: ProviderChoice,
        intra_op_threads: int,
        normalise_in_graph: bool = True,
        timeout: float = 0.0,
    ):
        self.bundle, self.timeout = bundle, timeout  # timeout: seconds one call may take; 0: none
        profile = bundle.profile
        model_input = profile.input_name or bundle.input_names[0]
        if normalise_in_graph:
            graph, self.input_name = uint8_input_model(bundle.model_path, profile.preprocess, model_input)
            external = Path(bundle.model_path).parent
            self.session, self.session_info = create_session(graph, provider, intra_op_threads, external)
            self.normalise: Normaliser | None = None
        else:
            self.session, self.session_info = create_session(bundle.model_path, provider, intra_op_threads)
            self.input_name, self.normalise = model_input, Normaliser(profile.preprocess)
        where = "uint8 in" if self.normalise is None else "float in"
        log.info("tagger session on %s (%s, %s)", self.session_info.provider, bundle.model_path, where)
        self.output_name = profile.output_name or bundle.output_names[0]
        self.embedding_name = bundle.embedding_output
        self.fixed_batch = self._fixed_batch()
        self.busy = BusyClock()  # time inside session.run, for the run's busy fraction

    def _fixed_batch(self) -> int | None:
        """The batch size the graph's input declares, when it declares one."""
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        fixed = shapes[self.input_name][0] if shapes.get(self.input_name) else None
        return fixed if isinstance(fixed, int) and fixed > 0 else None

    def embedding_width(self) -> int | None:
        """The embedding width, probed with one blank image where the graph leaves it symbolic."""
        if not self.embedding_name:
            return None
        if self.bundle.embedding_width is not None:
            return self.bundle.embedding_width
        pre = self.bundle.profile.preprocess
        _raw, emb = self._run(self._input(np.zeros((1, pre.height, pre.width, 3), np.uint8)))
        assert emb is not None  # the model has an embedding output
        return int(emb.shape[-1])

    def infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, list[RowFailure]]:
        """Raw outputs for a batch and, per row, None or (error kind, message). A batch the
        model rejects is retried row by row; one that runs out of time is not (the rows
        are model_timeout errors, tried again by the next run)."""
        x = self._input(pixels)
        try:
            raw, emb = self._run(x)
            return raw, emb, [None] * len(x)
        except ModelTimeout as exc:
            log.warning("%s; its rows are error rows", exc)
            width = len(self.bundle.vocabulary)
            return np.zeros((len(x), width), np.float32), None, [(ErrorKind.MODEL_TIMEOUT, str(exc))] * len(x)
        except Exception as batch_exc:
            log.warning("model rejected a batch of %d (%s); retrying one by one", len(x), batch_exc)
        return self._row_by_row(x)

    def _input(self, pixels: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(pixels, np.uint8) if self.normalise is None else self.normalise(pixels)

    def _row_by_row(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, list[RowFailure]]:
        raw = np.zeros((len(x), len(self.bundle.vocabulary)), np.float32)
        emb = None
        errors: list[RowFailure] = []
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
        """session.run, stopped by ONNX Runtime's terminate flag once the timeout has
        passed (checked between graph nodes: a hung kernel is not interrupted)."""
        with self.busy.running():
            return self._timed_run(names, x)

    def _timed_run(self, names: list[str], x: np.ndarray) -> list[np.ndarray]:
        if not self.timeout:
            return self.session.run(names, {self.input_name: x})
        import onnxruntime as ort

        options = ort.RunOptions()
        timer = threading.Timer(self.timeout, lambda: setattr(options, "terminate", True))
        timer.start()
        try:
            return self.session.run(names, {self.input_name: x}, options)
        except Exception:
            if options.terminate:
                raise ModelTimeout(
                    f"model call on {counted(len(x), 'images')} took longer than the {self.timeout:g} s limit"
                ) from None
            raise
        finally:
            timer.cancel()
