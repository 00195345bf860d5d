"""Fit an OOD reference from a tagged corpus: what `tagpipe model fit-ood` writes.

The reference is the bundle format (model_ood_ref.npz: mu [D], cov_inv [D, D], p50,
p95, float32) over the stored embeddings (float16 in the rows). The covariance is
shrunk with the Ledoit-Wolf estimate (closed form, as scikit-learn's ledoit_wolf), so
it is invertible even with fewer images than dimensions. The shrinkage is applied to
the standardised embeddings (towards the diagonal of variances, not towards one
common variance): embedding dimensions differ in scale by orders of magnitude, and
shrinking towards a scaled identity drowned the low-variance ones, where planted noise
images differ most (their distances fell below p95 in tests/corpus/test_ood.py).
"""

from __future__ import annotations

import logging
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.core.errors import TagpipeError
from pipeline.core.settings import KeyRole, Setting, SettingsModel, StorageOptions
from pipeline.storage.filesystem import filesystem_for
from pipeline.table.reading import read_parquet

log = logging.getLogger(__name__)


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(shrunk covariance, shrinkage) of rows x, centred here."""
    n, p = x.shape
    x = x - x.mean(axis=0)
    x2 = x**2
    emp_cov_trace = x2.sum(axis=0) / n
    mu = emp_cov_trace.sum() / p
    beta_ = float((x2.T @ x2).sum())
    delta_ = float(((x.T @ x) ** 2).sum()) / n**2
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * emp_cov_trace.sum() + p * mu**2) / p
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    emp_cov = x.T @ x / n
    shrunk = (1.0 - shrinkage) * emp_cov
    shrunk.flat[:: p + 1] += shrinkage * mu
    return shrunk, shrinkage


def fit_reference(embeddings: np.ndarray) -> dict[str, np.ndarray]:
    x = embeddings.astype(np.float64)
    if len(x) < 2:
        raise TagpipeError(f"need at least 2 embeddings to fit an OOD reference, got {len(x)}")
    mu = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, max(float(scale.max()), 1.0) * 1e-6)  # constant dimensions
    cov_z, shrinkage = ledoit_wolf(x / scale)
    cov = cov_z * np.outer(scale, scale)
    cov_inv = np.linalg.inv(cov)
    centred = x - mu
    distances = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", centred, cov_inv, centred), 0.0))
    log.info(
        "OOD reference from %d embeddings of %d dimensions (Ledoit-Wolf shrinkage %.3f)",
        len(x),
        x.shape[1],
        shrinkage,
    )
    return {
        "mu": mu.astype(np.float32),
        "cov_inv": cov_inv.astype(np.float32),
        "p50": np.float32(np.percentile(distances, 50)),
        "p95": np.float32(np.percentile(distances, 95)),
    }


def read_embeddings(
    tags: str, storage_options: dict | None = None, model_sha256: str | None = None
) -> np.ndarray:
    """Embeddings of the rows without errors in a tag output directory (of one model)."""
    try:
        table = read_parquet(tags, storage_options, ["embedding", "model_sha256", "error"])
    except pa.ArrowInvalid as exc:
        if "embedding" not in str(exc):
            raise
        raise TagpipeError(f"{tags}: rows have no embedding column") from None
    table = table.filter(
        pc.and_(pc.is_null(table.column("error")), pc.is_valid(table.column("embedding")))
    ).select(["embedding", "model_sha256"])
    models = set(table.column("model_sha256").drop_null().to_pylist())
    if model_sha256 is not None and models - {model_sha256}:
        raise TagpipeError(
            f"{tags}: rows were made by model {sorted(models)}, not by the bundle given ({model_sha256})"
        )
    if len(models) > 1:
        raise TagpipeError(
            f"{tags}: rows from {len(models)} different models; embeddings of different models do not mix"
        )
    if table.num_rows == 0:
        raise TagpipeError(f"{tags}: no rows with an embedding (was the model's embedding output exposed?)")
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)


def fit_ood(
    tags: str, output: str, storage_options: dict | None = None, model_sha256: str | None = None
) -> dict[str, np.ndarray]:
    reference = fit_reference(read_embeddings(tags, storage_options, model_sha256))
    fs, path = filesystem_for(output, storage_options)
    with fs.open(path, "wb") as handle:
        # numpy's stub reads **kwds as allow_pickle
        np.savez(handle, **reference)  # type: ignore[arg-type]
    return reference


class FitOodSettings(SettingsModel):
    """What `tagpipe model fit-ood` takes (its options come from these fields)."""

    tags: Annotated[
        str,
        Field(min_length=1, description="a tag output directory whose rows carry embeddings"),
        Setting(KeyRole.NONE),
    ]
    output: Annotated[
        str,
        Field(min_length=1, description="the .npz to write (e.g. `BUNDLE/model_ood_ref.npz`)"),
        Setting(KeyRole.NONE, flags=("--output", "-o")),
    ]
    model: Annotated[
        str | None,
        Field(description="the bundle the tags came from: checked against the rows"),
        Setting(KeyRole.NONE, flags=("--model", "-m"), default_text="unchecked"),
    ] = None
    storage_options: StorageOptions
