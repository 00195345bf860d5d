"""Edit calibration at tag time: how far the tagger's embedding moves when an image of
this corpus is cropped, mirrored, shrunk, re-compressed, framed, captioned, recoloured
or turned (pipeline/image/edits.py).

Dedup joins copies by the cosine of the embedding; to choose that cosine from a budget
of false edges it has to know how close real edited copies land, for this model, this
preprocessing and these images. So the first run that commits a version of an inference
key samples `edit_calibration_images` of the version's decoded images (the smallest keyed
blake2b of the uri: the same images on every run, spread over the table whatever its
order), edits each, and runs originals and copies through the run's own DecodeStage and
TaggerStage, as plain callables in one Ray task that asks for what one tagger actor asks
(a GPU on a GPU cluster). The cosines go to `_calibration/<inference key>.parquet`
(EDIT_CALIBRATION_SCHEMA); a later run of the same key finds the file and does nothing.

Calibration never fails the run: the version is committed before it starts, and an error
is one warning line (the next run that commits tries again).
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.schemas import EDIT_CALIBRATION_METADATA, EDIT_CALIBRATION_SCHEMA
from pipeline.image.decode import DecodeStage, time_limit
from pipeline.image.edits import STANDARD_EDITS, editable, edited_bytes
from pipeline.image.imaging import DecodeOptions, open_image
from pipeline.job.graph import decode_options, plan_placement
from pipeline.job.model_runs import ModelRun, tagger_settings
from pipeline.job.run_summary import EditCalibration
from pipeline.model.profiles import Preprocess
from pipeline.model.tagger import TaggerSettings, TaggerStage
from pipeline.table.tag_table import READ_THREADS, Snapshot, TagTable

log = logging.getLogger(__name__)

EDITS = tuple(STANDARD_EDITS)  # the rows of each image, in this order
SAMPLE_KEY = b"tagpipe-edit-calibration"  # the sample's seed: blake2b's key


@dataclass(frozen=True)
class CalibrationWork:
    """What the calibration task needs: the sample, and the run's decode and tagger."""

    uris: tuple[str, ...]
    tagger: TaggerSettings
    preprocess: Preprocess
    options: DecodeOptions
    storage_options: dict
    timeout: float  # seconds per image's decode (and per edit)
    max_file_bytes: int
    originals_per_call: int  # images whose copies share one model call


def calibrate_edits(run: ModelRun, snapshot: Snapshot) -> EditCalibration | None:
    """After `snapshot` was committed: calibrate its inference key if no file has it yet.
    Returns what ran, for the run summary (None when nothing ran); never raises."""
    if not run.cfg.edit_calibration_images:
        return None
    started = time.monotonic()
    try:
        done = _calibrate(run, snapshot)
    except Exception as exc:
        log.warning(
            "edit calibration failed, version %d committed without it: %s", snapshot.version, _line(exc)
        )
        done = replace(EditCalibration(0.0), error=_line(exc))
    return replace(done, seconds=round(time.monotonic() - started, 3)) if done else None


def _calibrate(run: ModelRun, snapshot: Snapshot) -> EditCalibration | None:
    if run.table.has_edit_calibration(snapshot.inference_key):
        return None
    if not run.bundle.has_embedding_output:
        log.info("edit calibration skipped: model %s has no embedding output", run.bundle.name)
        return None
    uris = sample_uris(run.table, snapshot.files, run.cfg.edit_calibration_images)
    if not uris:
        log.info("edit calibration skipped: no decoded image in version %d", snapshot.version)
        return None
    rows = _run_task(run, uris).replace_schema_metadata(_metadata(run, snapshot, len(uris)))
    file = run.table.write_edit_calibration(snapshot.inference_key, rows)
    failed = rows.num_rows - rows.column("error").null_count
    log.info("edit calibration: %d images x %d edits (%d failed) -> %s", len(uris), len(EDITS), failed, file)
    return EditCalibration(0.0, len(uris), len(EDITS), rows.num_rows, failed, file)


def sample_uris(table: TagTable, files: tuple[str, ...], size: int) -> list[str]:
    """The `size` decoded rows (no error, so an embedding) of these parts whose keyed
    blake2b of the uri is smallest, in that order: stable across runs and machines."""

    def smallest(file: str) -> list[tuple[bytes, str]]:
        part = table.read_part(file, ["uri", "error"])
        decoded = part.filter(pc.is_null(part.column("error"))).column("uri").to_pylist()
        return heapq.nsmallest(size, ((_rank(uri), uri) for uri in decoded))

    with ThreadPoolExecutor(READ_THREADS) as pool:
        candidates = [found for part in pool.map(smallest, files) for found in part]
    return [uri for _, uri in heapq.nsmallest(size, candidates)]


def _rank(uri: str) -> bytes:
    return hashlib.blake2b(uri.encode(), digest_size=16, key=SAMPLE_KEY).digest()


def _run_task(run: ModelRun, uris: list[str]) -> pa.Table:
    """The calibration in one Ray task placed like one tagger actor (its GPU and CPUs)."""
    import ray

    cfg = run.cfg
    placement = plan_placement(cfg, ray.cluster_resources().get("GPU", 0))
    work = CalibrationWork(
        uris=tuple(uris),
        tagger=tagger_settings(run, placement),
        preprocess=run.bundle.profile.preprocess,
        options=decode_options(cfg),
        storage_options=cfg.storage_options,
        timeout=cfg.decode_timeout,
        max_file_bytes=cfg.max_file_bytes,
        originals_per_call=max(1, cfg.batch_size // (1 + len(EDITS))),
    )
    task = ray.remote(calibrate_sample).options(
        num_gpus=placement.tagger_gpus, num_cpus=placement.tagger_cpus, max_retries=0, name="edit_calibration"
    )
    return ray.get(task.remote(work))


def calibrate_sample(work: CalibrationWork) -> pa.Table:
    """The calibration rows of the sample (the task's body; a plain function in tests)."""
    decode = DecodeStage(
        work.preprocess, work.options, work.storage_options, work.timeout, work.max_file_bytes
    )
    tagger = TaggerStage(work.tagger)
    step = work.originals_per_call
    groups = [work.uris[i : i + step] for i in range(0, len(work.uris), step)]
    rows = [row for group in groups for row in _group_rows(group, decode, tagger, work)]
    return pa.Table.from_pylist(rows, schema=EDIT_CALIBRATION_SCHEMA)


def _group_rows(uris: tuple[str, ...], decode: DecodeStage, tagger: TaggerStage, work) -> list[dict]:
    """A few originals and their copies, decoded and tagged in one call each; per copy,
    its cosine to its original or the error that stopped it."""
    copies = [copy for uri in uris for copy in _copies(uri, decode, work)]
    names = [f"{uri}#{edit}" for uri in uris for edit in ("original", *EDITS)]
    tagged = tagger(decode.decode_bytes(names, [data for data, _ in copies]))
    vectors = tagged.column("embedding").to_pylist()
    errors = [known or found for (_, known), found in zip(copies, tagged.column("error").to_pylist())]
    rows, width = [], 1 + len(EDITS)
    for k, uri in enumerate(uris):
        base = k * width
        for j, edit in enumerate(EDITS, start=1):
            cosine, error = _outcome(vectors[base], errors[base], vectors[base + j], errors[base + j])
            rows.append({"uri": uri, "edit": edit, "cosine": cosine, "error": error})
    return rows


def _copies(uri: str, decode: DecodeStage, work: CalibrationWork) -> list[tuple[bytes, str | None]]:
    """The original's bytes, then each edit's, as (bytes, None), or (b"", why) where
    reading, opening or editing failed. The edits start from the upright image the run's
    decode opens (its bomb limits, its JPEG draft), in an editable mode."""
    data, failure = decode.read(uri)
    if data is None:
        assert failure is not None
        return [(b"", failure[1])] * (1 + len(EDITS))
    try:
        with time_limit(work.timeout):
            source = editable(open_image(data, work.options, work.preprocess)[0])
    except Exception as exc:
        return [(data, None)] + [(b"", f"opening for edits: {_line(exc)}")] * len(EDITS)
    copies: list[tuple[bytes, str | None]] = [(data, None)]
    for edit in EDITS:
        try:
            with time_limit(work.timeout):
                copies.append((edited_bytes(edit, source), None))
        except Exception as exc:
            copies.append((b"", f"{edit}: {_line(exc)}"))
    return copies


def _outcome(original, original_error, copy, copy_error) -> tuple[float | None, str | None]:
    """The copy's cosine to its original (float32, from the stored float16), or why none."""
    if original_error or original is None:
        return None, f"original: {original_error or 'no embedding'}"
    if copy_error or copy is None:
        return None, copy_error or "no embedding"
    a, b = np.asarray(original, np.float32), np.asarray(copy, np.float32)
    norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    if not norms:
        return None, "zero embedding"
    return float(np.clip(np.dot(a, b) / np.float32(norms), -1.0, 1.0)), None


def _metadata(run: ModelRun, snapshot: Snapshot, sample_size: int) -> dict[bytes, bytes]:
    fp = run.bundle.fingerprint
    values = (run.bundle.name, fp.model_sha256, snapshot.inference_key, str(sample_size), ",".join(EDITS))
    return dict(zip(EDIT_CALIBRATION_METADATA, (value.encode() for value in values), strict=True))


def _line(exc: BaseException) -> str:
    """An error in one line; a Ray task's error as the exception the task raised."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:500]
