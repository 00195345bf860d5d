"""Edit calibration at tag time: the standard edits do what they are named, and a tag run
writes, once per inference key, how far each edited copy's embedding lands from its
original's (real Ray, the demo model's ONNX Runtime session, real Parquet)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import shutil
from datetime import datetime

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core.schemas import EDIT_CALIBRATION_METADATA, EDIT_CALIBRATION_SCHEMA
from pipeline.image import edits
from pipeline.image.decode import DecodeStage
from pipeline.image.edits import EDITABLE_MODES, STANDARD_EDITS, editable, edited_bytes
from pipeline.job import edit_calibration
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job, run_tag_pass
from pipeline.model.profiles import load_profile
from pipeline.table.tag_table import TagTable, read_current
from tests.sample_photos import photo_paths

pytestmark = pytest.mark.edit_calibration  # these tag runs calibrate (tests/conftest.py)

NAMES = [
    "crop_5",
    "crop_10",
    "crop_20",
    "corner_crop",
    "flip",
    "resize_half",
    "jpeg_q30",
    "border",
    "text_band",
    "greyscale",
    "brightness",
    "rotate_5",
]


def _positions(width: int = 200, height: int = 150) -> Image.Image:
    """Each pixel says where it is (red: x, green: y), so a crop says where it was cut."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.dstack([x, y, (x + y) % 256]).astype(np.uint8), "RGB")


def _photo() -> Image.Image:
    return Image.open(next(p for p in photo_paths() if p.name == "astronaut.png")).convert("RGB")


# ---- the edits ---------------------------------------------------------------------------------


def test_the_standard_edits_are_the_twelve_named_each_said_in_one_line():
    assert list(STANDARD_EDITS) == NAMES
    for name, edit in STANDARD_EDITS.items():
        doc = (edit.__doc__ or "").strip()
        assert doc and "\n" not in doc, name


@pytest.mark.parametrize("name,keep", [("crop_5", 0.95), ("crop_10", 0.90), ("crop_20", 0.80)])
def test_a_crop_keeps_its_share_off_centre_and_the_same_every_time(name, keep):
    image = _positions()
    out = STANDARD_EDITS[name](image)
    assert out.size == (round(200 * keep), round(150 * keep))
    left, top = (int(v) for v in np.asarray(out)[0, 0, :2])  # the window's corner in the original
    assert np.array_equal(
        np.asarray(out), np.asarray(image.crop((left, top, left + out.width, top + out.height)))
    )
    assert (left, top) != ((200 - out.width) // 2, (150 - out.height) // 2)  # off-centre
    assert out.tobytes() == STANDARD_EDITS[name](image).tobytes()  # seeded, not random
    assert getattr(edits, name)(image, seed=1).tobytes() != out.tobytes()  # the seed places it


def test_corner_crop_is_the_top_left_sixty_percent():
    out = STANDARD_EDITS["corner_crop"](_positions())
    assert out.size == (120, 90)
    assert np.array_equal(np.asarray(out), np.asarray(_positions())[:90, :120])


def test_flip_is_the_mirror_image():
    image = _photo()
    out = STANDARD_EDITS["flip"](image)
    assert out.size == image.size
    assert np.array_equal(np.asarray(out), np.asarray(image)[:, ::-1])


def test_resize_half_halves_each_side():
    assert STANDARD_EDITS["resize_half"](_positions(201, 151)).size == (100, 75)


def _quality_30_tables() -> dict:
    reference = io.BytesIO()
    Image.new("RGB", (16, 16)).save(reference, "JPEG", quality=30)
    return Image.open(reference).quantization


def test_jpeg_q30_is_a_quality_30_jpeg_of_the_same_size():
    image = _photo()
    out = STANDARD_EDITS["jpeg_q30"](image)
    assert out.format == "JPEG" and out.size == image.size and out.mode == "RGB"
    assert out.quantization == _quality_30_tables()
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(image, np.int16)).mean()
    assert 0.5 < diff < 20
    data = edited_bytes("jpeg_q30", image)  # the JPEG itself goes to decode, not a PNG of it
    assert data[:2] == b"\xff\xd8" and Image.open(io.BytesIO(data)).quantization == _quality_30_tables()


def test_border_adds_a_tenth_of_solid_white_to_each_side():
    image = _positions()
    out = np.asarray(STANDARD_EDITS["border"](image))
    assert out.shape == (150 + 2 * 15, 200 + 2 * 20, 3)
    assert np.array_equal(out[15:-15, 20:-20], np.asarray(image))
    frame = np.concatenate([out[:15].reshape(-1, 3), out[-15:].reshape(-1, 3), out[:, :20].reshape(-1, 3)])
    assert (frame == 255).all()


def test_text_band_covers_the_bottom_with_text_and_leaves_the_rest():
    image = _photo()
    out = np.asarray(STANDARD_EDITS["text_band"](image))
    band = round(image.height * 0.15)
    assert out.shape == np.asarray(image).shape
    assert np.array_equal(out[:-band], np.asarray(image)[:-band])
    bottom = out[-band:]
    assert (bottom == 0).all(axis=2).mean() > 0.7  # opaque black
    assert (bottom == 255).all(axis=2).sum() > 50  # white text drawn on it


def test_greyscale_is_luminance_alpha_kept():
    image = _photo()
    out = STANDARD_EDITS["greyscale"](image)
    assert out.mode == "L" and out.size == image.size
    assert np.array_equal(np.asarray(out), np.asarray(image.convert("L")))
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.new("L", image.size, 77))
    grey = STANDARD_EDITS["greyscale"](rgba)
    assert grey.mode == "LA" and (np.asarray(grey.getchannel("A")) == 77).all()


def test_brightness_multiplies_colours_by_1_4_alpha_kept():
    image = _photo()
    out = np.asarray(STANDARD_EDITS["brightness"](image), np.float32)
    want = np.clip(np.asarray(image, np.float32) * 1.4, 0, 255)
    assert np.abs(out - want).max() <= 1
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.new("L", image.size, 77))
    assert (np.asarray(STANDARD_EDITS["brightness"](rgba).getchannel("A")) == 77).all()


def test_rotate_5_turns_in_its_own_frame():
    image = _photo()
    out = STANDARD_EDITS["rotate_5"](image)
    assert out.size == image.size
    assert np.asarray(out)[0, -1].tolist() == [0, 0, 0]  # a corner turned out of the frame
    want = image.rotate(5, resample=Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out), np.asarray(want))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "I;16", "1", "F"])
def test_every_edit_takes_any_decoded_mode_and_gives_a_file(mode):
    image = editable(_photo().resize((64, 48)).convert(mode))
    assert image.mode in EDITABLE_MODES
    for name in STANDARD_EDITS:
        data = edited_bytes(name, image)
        assert data == edited_bytes(name, image), name  # deterministic, bytes and all
        decoded = Image.open(io.BytesIO(data))
        assert decoded.format == ("JPEG" if name == "jpeg_q30" else "PNG"), name


def test_editable_scales_16_bit_as_decode_does():
    """Pillow's own convert would clip 4095 to 255; decode scales it to 16."""
    deep = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).convert("I;16")
    assert np.asarray(editable(deep)).max() == 16


def test_decode_bytes_equals_decoding_the_file(tmp_path):
    path = photo_paths()[0]
    stage = DecodeStage(load_profile("cl_tagger_v2").preprocess)
    from_file = stage({"uri": np.asarray([str(path)], object)})
    from_bytes = stage.decode_bytes([str(path)], [path.read_bytes()])
    for column in ("pixels", "width", "height", "sha256", "phash", "size"):
        assert np.array_equal(from_file[column], from_bytes[column]), column
    small = DecodeStage(load_profile("cl_tagger_v2").preprocess, max_file_bytes=10)
    assert small.decode_bytes(["x"], [path.read_bytes()])["error_kind"][0] == "too_large"


# ---- calibration at tag time -------------------------------------------------------------------


def _photos(folder, count: int):
    folder.mkdir(parents=True, exist_ok=True)
    for path in photo_paths()[:count]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"not an image")  # an error row: never sampled
    return folder


def _config(inputs, output, model, **settings):
    return make_tag_config(
        inputs=[str(inputs)], output=str(output), model=str(model), progress=False, **settings
    )


def _calibration_files(output) -> list:
    folder = output / "_calibration"
    return sorted(folder.glob("*.parquet")) if folder.exists() else []


def test_a_tag_run_calibrates_its_inference_key_once(ray_session, demo_bundle, tmp_path):
    """The table sits inside its input folder: its _calibration files are not inputs."""
    images = _photos(tmp_path / "corpus", 5)
    out = images / "tags"
    summary = run_tag_job(_config(images, out, demo_bundle, edit_calibration_images=4))
    table = TagTable(str(out))
    snapshot = table.snapshot()
    calibration = table.edit_calibration(snapshot)
    assert calibration is not None and summary.version == 1
    decoded = sorted(str(images / p.name) for p in photo_paths()[:5])
    ranked = sorted(
        decoded,
        key=lambda uri: hashlib.blake2b(
            uri.encode(), digest_size=16, key=b"tagpipe-edit-calibration"
        ).digest(),
    )
    assert calibration.schema.remove_metadata() == EDIT_CALIBRATION_SCHEMA
    assert calibration.column("uri").to_pylist() == [uri for uri in ranked[:4] for _ in NAMES]
    assert calibration.column("edit").to_pylist() == NAMES * 4
    cosines = calibration.column("cosine").to_numpy()
    assert calibration.column("error").null_count == 48 and np.isfinite(cosines).all()
    assert ((cosines >= -1) & (cosines <= 1)).all() and cosines.std() > 0
    metadata = calibration.schema.metadata
    assert set(metadata) == set(EDIT_CALIBRATION_METADATA)
    assert (
        metadata[b"tagpipe.sample_size"] == b"4"
        and metadata[b"tagpipe.model_sha256"] == summary.model_sha256.encode()
    )
    assert metadata[b"tagpipe.inference_key"] == snapshot.inference_key.encode()
    assert metadata[b"tagpipe.edits"].decode().split(",") == NAMES
    (path,) = _calibration_files(out)
    assert path.name == f"{snapshot.inference_key}.parquet" and pq.read_table(path).num_rows == 48
    assert summary.edit_calibration.images == 4 and "edit calibration: 4 images x 12 edits" in summary.text()
    import json

    manifest = json.loads((out / "_runs" / f"{summary.run_id}.json").read_text())
    assert manifest["timings"]["edit_calibration_seconds"] == summary.edit_calibration.seconds > 0

    # the same key again, with a new image to commit: no recalibration, the file untouched
    before = (path.stat().st_mtime_ns, path.read_bytes())
    shutil.copy(photo_paths()[5], images / photo_paths()[5].name)
    again = run_tag_job(_config(images, out, demo_bundle, edit_calibration_images=4))
    assert again.version == 2 and again.new == 1 and again.edit_calibration is None
    assert "edit calibration" not in again.text()
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert read_current(str(out)).num_rows == 7  # the table's own files were not listed as inputs
    assert TagTable(str(out)).edit_calibration(TagTable(str(out)).snapshot()) is not None

    TagTable(str(out)).vacuum(keep_versions=1, grace_hours=0)  # calibration is not a part
    assert _calibration_files(out) == [path]


def test_calibration_off_writes_nothing(ray_session, demo_bundle, tmp_path):
    images = _photos(tmp_path / "corpus", 2)
    summary = run_tag_job(_config(images, tmp_path / "out", demo_bundle, edit_calibration_images=0))
    table = TagTable(str(tmp_path / "out"))
    assert summary.version == 1 and summary.edit_calibration is None
    assert _calibration_files(tmp_path / "out") == [] and table.edit_calibration(table.snapshot()) is None


def test_a_failing_calibration_still_commits(ray_session, demo_bundle, tmp_path, monkeypatch, caplog):
    """The task cannot load the model (a bundle the calibration task's node cannot read)."""
    real = edit_calibration.tagger_settings

    def unreadable(run, placement):
        return dataclasses.replace(real(run, placement), model_dir=str(tmp_path / "gone"))

    monkeypatch.setattr(edit_calibration, "tagger_settings", unreadable)
    images = _photos(tmp_path / "corpus", 2)
    with caplog.at_level(logging.WARNING, logger="pipeline.job.edit_calibration"):
        summary = run_tag_job(_config(images, tmp_path / "out", demo_bundle))
    assert summary.version == 1 and read_current(str(tmp_path / "out")).num_rows == 3
    assert _calibration_files(tmp_path / "out") == []
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "edit calibration failed, version 1 committed without it" in warning and "\n" not in warning
    assert "gone" in summary.edit_calibration.error and "edit calibration failed" in summary.text()


def test_several_models_each_calibrate_and_one_without_embedding_is_skipped(
    ray_session, demo_bundle, tmp_path, caplog
):
    from pipeline.demo.model import write_demo_bundle

    plain = write_demo_bundle(tmp_path / "plain", with_embedding_output=False, input_size=448, name="plain")
    images = _photos(tmp_path / "corpus", 2)
    cfg = make_tag_config(
        inputs=[str(images)],
        output=str(tmp_path / "out"),
        model=[str(demo_bundle), str(plain)],
        progress=False,
    )
    with caplog.at_level(logging.INFO, logger="pipeline.job.edit_calibration"):
        summary = run_tag_pass(cfg)
    first, second = summary.runs
    table = TagTable(first.output)
    calibration = table.edit_calibration(table.snapshot())
    assert calibration is not None and calibration.num_rows == 2 * 12 and first.edit_calibration.rows == 24
    assert second.edit_calibration is None and _calibration_files(tmp_path / "out" / "plain") == []
    # the second table committed before the first's calibration ended: it did not wait on it
    committed = datetime.fromisoformat(TagTable(second.output).snapshot().committed_at).timestamp()
    assert committed < _calibration_files(tmp_path / "out" / "tagpipe-demo-tagger")[0].stat().st_mtime
    assert any("plain has no embedding output" in r.getMessage() for r in caplog.records)


def test_calibration_rows_say_why_a_copy_has_no_cosine(demo_bundle, tmp_path):
    """The task's body as a plain function: a missing original fails all its rows; the
    demo model's flip and greyscale copies of a photo still have finite cosines."""
    from pipeline.image.imaging import DecodeOptions
    from pipeline.model.tagger import TaggerSettings

    photo = str(photo_paths()[0])
    work = edit_calibration.CalibrationWork(
        uris=(photo, str(tmp_path / "missing.png")),
        tagger=TaggerSettings(model_dir=str(demo_bundle), intra_op_threads=1),
        preprocess=load_profile("cl_tagger_v2").preprocess,
        options=DecodeOptions(),
        storage_options={},
        timeout=60.0,
        max_file_bytes=2**30,
        originals_per_call=1,
    )
    rows = edit_calibration.calibrate_sample(work).to_pylist()
    assert len(rows) == 24
    found = {(r["uri"], r["edit"]): r for r in rows}
    for edit in ("flip", "greyscale"):
        assert np.isfinite(found[(photo, edit)]["cosine"]) and found[(photo, edit)]["error"] is None
    missing = [r for r in rows if r["uri"].endswith("missing.png")]
    assert all(r["cosine"] is None and r["error"].startswith("original: FileNotFoundError") for r in missing)


def _quarters(folder, photos: int):
    """Each photo's four quarters as images of their own: four times the distinct images."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for path in photo_paths()[:photos]:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        w, h = rgb.size
        for q, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)]):
            rgb.crop((x, y, x + w // 2, y + h // 2)).save(folder / f"{path.stem}-{q}.png")
    return folder


def test_dedup_measures_its_threshold_on_the_planted_edits(ray_session, demo_bundle, tmp_path):
    """A calibrated table: auto's known copies are the planted edits, and the summary gives
    each edit kind's share at the chosen cosine (what the threshold accepts, named so)."""
    from pipeline.corpus.dedup import run_dedup

    images = _quarters(tmp_path / "corpus", 19)
    out = tmp_path / "tags"
    run_tag_job(_config(images, out, demo_bundle, edit_calibration_images=16))
    summary = run_dedup(str(out), str(tmp_path / "dedup"))
    emb = summary.embedding
    assert emb.positives == "planted edits" and emb.positive_pairs == 16 * 12
    assert emb.threshold is not None and set(emb.recall_by_edit) == set(NAMES)
    table = TagTable(str(out))
    calibration = table.edit_calibration(table.snapshot())
    edits, cosines = calibration.column("edit").to_pylist(), calibration.column("cosine").to_pylist()
    flips = np.asarray([c for e, c in zip(edits, cosines) if e == "flip"])
    assert emb.recall_by_edit["flip"] == pytest.approx(np.mean(flips >= emb.threshold))
    assert "by edit" in summary.text() and "planted edits at or above it" in summary.text()
