"""OOD: Ledoit-Wolf as scikit-learn computes it; a fitted reference reproduces its own
p95; planted out-of-distribution images (noise) score above it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

from pipeline.core.errors import TagpipeError
from pipeline.corpus.ood import fit_ood, ledoit_wolf, read_embeddings
from pipeline.image.decode import DecodeStage
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.model.bundle import load_bundle
from pipeline.model.postprocess import mahalanobis
from pipeline.model.runtime import ProviderChoice
from pipeline.model.tagger import TaggerSettings, TaggerStage


@pytest.mark.parametrize("shape", [(200, 12), (30, 64)])
def test_ledoit_wolf_matches_scikit_learn(shape):
    x = np.random.default_rng(1).normal(size=shape) @ np.random.default_rng(2).normal(
        size=(shape[1], shape[1])
    )
    ours, shrinkage = ledoit_wolf(x)
    theirs, their_shrinkage = sklearn_ledoit_wolf(x)
    assert shrinkage == pytest.approx(their_shrinkage, rel=1e-9)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_fitted_reference_reproduces_p95_and_flags_noise(ray_session, demo_bundle, demo_corpus, tmp_path):
    images = sorted(
        p for p in (demo_corpus / "images").rglob("*.*") if p.parent.name not in ("noise", "broken")
    )
    noise = sorted((demo_corpus / "images" / "noise").glob("*"))
    listing = tmp_path / "in_distribution.txt"
    listing.write_text("\n".join(str(p) for p in images) + "\n")
    tags = tmp_path / "tags"
    run_tag_job(make_tag_config(inputs=[str(listing)], output=str(tags), model=str(demo_bundle)))

    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle)
    reference = fit_ood(
        str(tags),
        str(bundle / "model_ood_ref.npz"),
        model_sha256=load_bundle(demo_bundle).fingerprint.model_sha256,
    )
    loaded = load_bundle(bundle)
    assert (
        loaded.fingerprint.calibration_sha256 != load_bundle(demo_bundle).fingerprint.calibration_sha256
    )  # a new reference: rethreshold territory
    own = mahalanobis(read_embeddings(str(tags)), loaded.ood_reference)
    assert np.percentile(own, 95) == pytest.approx(float(reference["p95"]), rel=1e-4)

    stage = TaggerStage(TaggerSettings(str(bundle), provider=ProviderChoice.CPU))
    rows = stage(
        DecodeStage(stage.bundle.profile.preprocess)({"uri": np.array([str(p) for p in noise], object)})
    ).to_pydict()
    assert all(d > float(reference["p95"]) for d in rows["ood_distance"]) and all(rows["ood"])

    with pytest.raises(TagpipeError, match="not by the bundle"):
        fit_ood(str(tags), str(tmp_path / "x.npz"), model_sha256="0" * 64)


def test_rows_without_embeddings_are_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core.errors import TagpipeError
    from pipeline.corpus.ood import read_embeddings

    pq.write_table(
        pa.table({"uri": ["a"], "model_sha256": ["m"], "error": pa.nulls(1, pa.string())}),
        tmp_path / "rows.parquet",
    )
    with pytest.raises(TagpipeError, match="no embedding column"):
        read_embeddings(str(tmp_path / "rows.parquet"))
