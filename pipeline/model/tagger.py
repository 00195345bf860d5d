"""The tagging stage: one model's decoded rows in, its tag rows out.

TaggerStage puts together the ONNX session runner (session_runner: the timeout, the
fixed batch, the row retry), the postprocessor (postprocess) and the row builder
(tag_rows). It is a Ray Data callable class (heavy state in __init__, a batch in
__call__) and a plain object for loops in tests. It knows nothing of Ray: where it runs
(GPUs, CPUs, actors) is decided in pipeline/job/graph.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.core.schemas import tag_row_schema
from pipeline.model.bundle import ModelBundle, load_bundle
from pipeline.model.postprocess import Postprocessor
from pipeline.model.profiles import Profile
from pipeline.model.rules import RuleSettings
from pipeline.model.runtime import ProviderChoice
from pipeline.model.session_runner import RowFailure, SessionRunner
from pipeline.model.tag_rows import Answers, TagRowBuilder, strings


@dataclass(frozen=True)
class TaggerSettings:
    model_dir: str
    profile: Profile | str | None = None  # None: detected from the bundle
    provider: ProviderChoice = ProviderChoice.AUTO
    intra_op_threads: int = 0
    run_id: str = ""
    dense_logits: bool = False
    normalise_in_graph: bool = True  # feed uint8 to prepended Cast/scale nodes (see onnx_tools)
    # over the profile's thresholds (threshold, floor, MCut, ...)
    rules: RuleSettings = RuleSettings.model_validate({})
    batch_timeout: float = 0.0  # seconds one session call may take; 0: no limit


class TaggerStage:
    """A decoded batch (pipeline/core/schemas.py DECODED_COLUMNS names) -> its tag rows."""

    def __init__(self, settings: TaggerSettings, bundle: ModelBundle | None = None):
        self.settings = settings
        self.bundle = bundle or load_bundle(settings.model_dir, settings.profile)
        self.runner = SessionRunner(
            self.bundle,
            settings.provider,
            settings.intra_op_threads,
            settings.normalise_in_graph,
            settings.batch_timeout,
        )
        self.postprocess = Postprocessor.for_bundle(
            self.bundle, settings.rules, dense_logits=settings.dense_logits
        )
        self.schema = tag_row_schema(self.postprocess.category_names, self.runner.embedding_width())
        self.rows = TagRowBuilder(self.bundle, self.schema, settings.run_id)

    @property
    def normalise(self):
        """The numpy normaliser, None when the graph takes uint8."""
        return self.runner.normalise

    def infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, list[RowFailure]]:
        return self.runner.infer(pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self.rows(batch, self.answers(batch))

    def answers(self, batch: dict[str, np.ndarray]) -> Answers:
        """The model's answers for the rows that decoded: a row that failed to decode or
        that the model failed on keeps its error and gets no tags (a failed row's zeros
        would pass the floor for every tag)."""
        answers = Answers(
            np.asarray(strings(batch["error"]), object), np.asarray(strings(batch["error_kind"]), object)
        )
        ok = np.flatnonzero([e is None for e in answers.error])
        if not len(ok):
            return answers
        pixels = np.asarray(batch["pixels"])
        raw, emb, failures = self.infer(
            pixels if len(ok) == len(pixels) else pixels[ok]
        )  # no copy when all decoded
        for j, failure in enumerate(failures):
            if failure is not None:
                answers.error_kind[ok[j]], answers.error[ok[j]] = failure
        good = np.flatnonzero([f is None for f in failures])
        if len(good) < len(raw):
            raw, emb = raw[good], (emb[good] if emb is not None else None)
        answers.results = self.postprocess(raw, emb) if len(good) else {}
        answers.embeddings = emb
        answers.answered = {int(ok[j]): k for k, j in enumerate(good)}
        return answers
