"""A batch's tag rows, in the declared schema, from its decoded columns and the model's answers.

Kept apart from the session (session_runner) so the row layout is one short piece: the
same column types whether every row failed, none did, or the model gave no embedding
(pipeline/core/schemas.py tag_row_schema), which is what lets parts concatenate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from pipeline.model.bundle import ModelBundle


@dataclass
class Answers:
    """What the model said about a batch: per-row errors, then the postprocessed columns
    and embeddings of the rows it answered (`answered`: batch row -> row of those)."""

    error: np.ndarray  # object: a message or None, one per batch row
    error_kind: np.ndarray
    results: dict[str, list] = field(default_factory=dict)
    embeddings: np.ndarray | None = None
    answered: dict[int, int] = field(default_factory=dict)


class TagRowBuilder:
    """The tag rows of one model's batches: the file's facts, the model's answers, the run."""

    def __init__(self, bundle: ModelBundle, schema: pa.Schema, run_id: str):
        self.bundle, self.schema, self.run_id = bundle, schema, run_id

    def __call__(self, batch: dict[str, np.ndarray], answers: Answers) -> pa.Table:
        n = len(batch["uri"])
        fp = self.bundle.fingerprint
        decoded = np.asarray([e is None for e in strings(batch["error"])], bool)  # hash exists
        values = {
            "uri": [str(u) for u in batch["uri"]],
            "sha256": strings(batch["sha256"]),
            "size": np.asarray(batch["size"], np.int64),
            "width": np.asarray(batch["width"], np.int32),
            "height": np.asarray(batch["height"], np.int32),
            "phash": pa.array(np.asarray(batch["phash"], np.uint64), mask=~decoded),
            "phash_hex": [f"{int(h):016x}" if ok else None for h, ok in zip(batch["phash"], decoded)],
            "phash_degenerate": pa.array(np.asarray(batch["phash_degenerate"], bool), mask=~decoded),
            "error": list(answers.error),
            "error_kind": list(answers.error_kind),
            "model_name": [self.bundle.name] * n,
            "model_sha256": [fp.model_sha256] * n,
            "calibration_sha256": [fp.calibration_sha256] * n,
            "embedding": _embeddings(answers, n),
            "run_id": [self.run_id] * n,
            "tagged_at": [datetime.now(UTC)] * n,
        }
        arrays = [
            pa.array(values[f.name] if f.name in values else _per_row(answers, f.name, n), f.type)
            for f in self.schema
        ]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        for key in batch:  # other input columns travel along (the job's slice number)
            if key not in values and key != "pixels" and key not in self.schema.names:
                table = table.append_column(key, pa.array(list(batch[key])))
        return table


def _per_row(answers: Answers, key: str, n: int) -> list:
    """A postprocessed column over the whole batch: None on the rows the model did not answer."""
    column, answered = answers.results.get(key), answers.answered
    return [column[answered[i]] if column is not None and i in answered else None for i in range(n)]


def _embeddings(answers: Answers, n: int) -> list:
    emb, answered = answers.embeddings, answers.answered
    return [
        emb[answered[i]].astype(np.float16) if emb is not None and i in answered else None for i in range(n)
    ]


def strings(values) -> list[str | None]:
    """A string column as str or None: an all-null one can reach us as floats (NaN) after
    Arrow round trips."""
    return [v if isinstance(v, str) else None for v in values]
