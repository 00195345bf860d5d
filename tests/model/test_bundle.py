import logging
import shutil

import numpy as np
import pytest

from pipeline.core.errors import BundleError
from pipeline.model.bundle import load_bundle
from pipeline.model.describe import describe_bundle
from tests.helpers import joytag_bundle, jtp_bundle, wd_bundle


def test_cl_layout_loads_every_side_file(demo_bundle):
    bundle = load_bundle(demo_bundle)
    assert bundle.profile.name == "cl_tagger_v2"
    assert [p.name for p in bundle.data_files] == ["model.onnx.data"]
    assert len(bundle.vocabulary) == bundle.output_width == 256
    counts = bundle.vocabulary.counts_by_category()
    assert counts["rating"] == 4 and counts["quality"] == 5 and counts["character"] == 1
    assert bundle.tag_metrics.calibration_table.shape == (256, 100)
    assert bundle.ood_reference.mu.shape == (22,) and bundle.ood_reference.p95 > bundle.ood_reference.p50 > 0
    assert bundle.has_embedding_output and bundle.name == "tagpipe-demo-tagger"


def test_wd_layout_maps_csv_categories(tmp_path):
    bundle = load_bundle(wd_bundle(tmp_path / "wd"))
    assert bundle.profile.name == "wd_v3"
    assert bundle.vocabulary.categories[:6] == ("rating",) * 4 + ("character",) * 2
    text = describe_bundle(tmp_path / "wd")
    assert "rating: 4" in text and "character: 2" in text and "general: 6" in text
    assert "input: float[1, 448, 448, 3]" in text.replace("  ", " ")
    assert "tag_metrics: missing (feature off)" in text


def test_joytag_and_jtp_layouts(tmp_path):
    joy = load_bundle(joytag_bundle(tmp_path / "joy"))
    assert joy.profile.name == "joytag" and joy.vocabulary.tags[3] == "joy_3"
    jtp = load_bundle(jtp_bundle(tmp_path / "jtp"))  # model file not named model.onnx
    assert jtp.profile.name == "jtp1" and jtp.model_path.name == "jtp_pilot.onnx" and len(jtp.vocabulary) == 9
    assert "joy_9" not in describe_bundle(tmp_path / "joy") and "tags:        10" in describe_bundle(
        tmp_path / "joy"
    )


def test_vocabulary_size_mismatch_is_refused(tmp_path):
    with pytest.raises(BundleError, match="12 tags but selected_tags.csv lists 13.*do not belong together"):
        load_bundle(wd_bundle(tmp_path / "wd", tags=12, vocab_size=13))


def test_missing_optional_files_switch_features_off_once(demo_bundle, tmp_path, caplog):
    copy = tmp_path / "cl"
    shutil.copytree(demo_bundle, copy)
    (copy / "model_ood_ref.npz").unlink()
    (copy / "model_tag_metrics.npz").unlink()
    with caplog.at_level(logging.INFO, logger="pipeline.model.bundle"):
        bundle = load_bundle(copy)
    assert bundle.ood_reference is None and bundle.tag_metrics is None
    messages = [r.getMessage() for r in caplog.records]
    assert sum("model_ood_ref.npz not present; OOD distance is off" in m for m in messages) == 1
    assert sum("model_tag_metrics.npz not present" in m for m in messages) == 1


def test_npz_side_files_never_unpickle(demo_bundle, tmp_path):
    copy = tmp_path / "cl"
    shutil.copytree(demo_bundle, copy)
    np.savez(
        copy / "model_ood_ref.npz", mu=np.array([{"x": 1}], dtype=object), cov_inv=np.eye(1), p50=1.0, p95=2.0
    )
    with pytest.raises(BundleError, match="refused"):
        load_bundle(copy)


def test_json_side_files_are_data_never_code(demo_bundle, tmp_path):
    """Vocabulary JSON is parsed with json: a payload written as Python stays a string."""
    import json

    copy = tmp_path / "cl"
    shutil.copytree(demo_bundle, copy)
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    vocabulary = copy / "model_vocabulary.json"
    data = json.loads(vocabulary.read_text())
    first = data["idx_to_tag"]["0"]
    data["idx_to_tag"]["0"] = payload
    data["tag_to_idx"][payload] = data["tag_to_idx"].pop(first)
    data["tag_to_category"][payload] = data["tag_to_category"].pop(first)
    vocabulary.write_text(json.dumps(data))
    bundle = load_bundle(copy)
    assert bundle.vocabulary.tags[0] == payload and not marker.exists()


def test_fingerprint_follows_content_not_names(demo_bundle, tmp_path):
    base = load_bundle(demo_bundle).fingerprint
    renamed = tmp_path / "renamed_v2_01a"
    shutil.copytree(demo_bundle, renamed)
    assert load_bundle(renamed).fingerprint == base  # same files, other directory name
    data = bytearray((renamed / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF  # new weights under the same file name
    (renamed / "model.onnx.data").write_bytes(bytes(data))
    changed = load_bundle(renamed).fingerprint
    assert changed.model_sha256 != base.model_sha256 and changed.calibration_sha256 == base.calibration_sha256
    recal = tmp_path / "recal"
    shutil.copytree(demo_bundle, recal)
    with np.load(recal / "model_tag_metrics.npz") as npz:
        arrays = dict(npz)
    arrays["best_thr"] = arrays["best_thr"] * 0.9
    np.savez(recal / "model_tag_metrics.npz", **arrays)
    recalibrated = load_bundle(recal).fingerprint
    assert (
        recalibrated.model_sha256 == base.model_sha256
        and recalibrated.calibration_sha256 != base.calibration_sha256
    )


def test_a_shipped_profile_for_another_model_is_blamed_by_name(demo_bundle):
    """`--profile wd_v3` (NHWC) on a CL-style bundle (NCHW): the error names the profile
    as the mistake, not a setting inside it (issue 32)."""
    with pytest.raises(BundleError) as info:
        load_bundle(demo_bundle, "wd_v3")
    message = str(info.value)
    assert "profile wd_v3 does not fit this model" in message and "takes NCHW" in message
    assert "preprocess.layout" not in message


def test_a_folder_without_a_model_says_so_not_pass_profile(tmp_path):
    """A folder of photos given as --model: the missing model is the cause, not the family."""
    from pipeline.model.bundle import load_bundle

    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(BundleError, match=r"no ONNX model \(\*\.onnx\) here") as info:
        load_bundle(tmp_path)
    assert "--profile" not in str(info.value)
    (tmp_path / "model.onnx").write_bytes(b"")  # a model without side files: the family is the question
    with pytest.raises(BundleError, match="cannot tell the model family"):
        load_bundle(tmp_path)
