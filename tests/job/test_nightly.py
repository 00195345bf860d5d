"""Nightly incremental re-tagging: only new and changed images are tagged, deleted ones
leave the current version, a new model re-tags all, new thresholds rethreshold without
inference, and a SIGKILL mid-run leaves the previous version as it was."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.errors import TagpipeError
from pipeline.demo.model import build_graph, save_with_external_data
from pipeline.job.changes import classify
from pipeline.job.incremental import (
    CHANGED,
    DELETED,
    NEW,
    RETRY,
    UNCHANGED,
    UNKNOWN,
)
from pipeline.job.nightly import run_nightly
from pipeline.job.settings import load_nightly_config, make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.table.tag_table import TagTable, read_current

VOLATILE = {"run_id", "tagged_at"}


def _config(tmp_path: Path, corpus: Path, bundle: Path, **tag) -> Path:
    settings = {
        "inputs": [str(corpus)],
        "output": str(tmp_path / "tags"),
        "model": str(bundle),
        "rows_per_part": 8,
        "batch_size": 8,
        **tag,
    }
    lines = ["[tag]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["[nightly]", 'ratios = "train=0.6,val=0.2,test=0.2"', "seed = 3"]
    path = tmp_path / "nightly.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(table: pa.Table) -> dict[str, dict]:
    return {r["uri"]: r for r in table.to_pylist()}


def test_classify_by_etag_then_size_mtime_then_unknown():
    def table(rows, extra=False):
        cols = {k: [r[i] for r in rows] for i, k in enumerate(["uri", "source_size", "etag", "mtime"])}
        t = pa.table(
            {
                "uri": pa.array(cols["uri"], pa.string()),
                "source_size": pa.array(cols["source_size"], pa.int64()),
                "etag": pa.array(cols["etag"], pa.string()),
                "mtime": pa.array(cols["mtime"], pa.float64()),
            }
        )
        if extra:
            t = t.append_column("sha256", pa.array(["s"] * len(rows), pa.string()))
            t = t.append_column(
                "error_kind", pa.array([None, None, None, None, None, "read_error", None], pa.string())
            )
            t = t.append_column("_file", pa.array([0, 0, 1, 1, 2, 2, 2], pa.int32()))
        return t

    view = table(
        [
            ("a", 1, "e1", 5.0),
            ("b", 1, "e2", 5.0),
            ("c", 1, None, 5.0),
            ("d", 1, None, None),
            ("e", 1, None, 5.0),
            ("f", 1, None, 5.0),
            ("g", 2, "x", 1.0),
        ],
        extra=True,
    )
    listing = table(
        [
            ("a", 1, "e1", 9.0),
            ("b", 1, "e3", 5.0),
            ("c", 1, None, 6.0),
            ("d", 1, None, None),
            ("e", 2, None, None),
            ("f", 1, None, 5.0),
            ("h", 1, None, 1.0),
        ]
    )
    status = {r["uri"]: (r["status"], r["_file"]) for r in classify(listing, view).as_table().to_pylist()}
    assert status == {
        "a": (UNCHANGED, 0),  # same etag: a touched mtime alone is no change
        "b": (CHANGED, 0),  # etag differs
        "c": (CHANGED, 1),  # no etag: mtime differs
        "d": (UNKNOWN, 1),  # nothing to compare: sha256 decides
        "e": (CHANGED, 2),  # size differs, whatever else is missing
        "f": (RETRY, 2),  # unchanged, but it failed to read last time
        "g": (DELETED, 2),
        "h": (NEW, -1),
    }


def test_nightly_tags_only_new_and_changed_and_drops_deleted(ray_session, demo_bundle, demo_corpus, tmp_path):
    corpus = tmp_path / "images"
    shutil.copytree(demo_corpus / "images", corpus)
    cfg_path = _config(tmp_path, corpus, demo_bundle)
    first = run_nightly(load_nightly_config(cfg_path))
    total = first.tag.listed
    assert (
        first.tag.change == "first run"
        and first.tag.new == first.tag.images == total
        and first.tag.version == 1
    )
    v1 = _rows(read_current(str(tmp_path / "tags")))
    splits_v1 = _read(tmp_path / "tags-splits" / "splits.parquet")

    # grow by one image (a re-encoded copy of a tagged one), change one, delete one
    original = corpus / "noise" / "noise_001.png"
    Image.open(original).convert("RGB").save(corpus / "noise" / "noise_copy_new.jpg", quality=92)
    changed = corpus / "blue" / "blue_000.jpg"
    shutil.copyfile(corpus / "green" / "green_000.jpg", changed)  # now shows green
    os.utime(changed, (time.time() + 10, time.time() + 10))
    deleted = corpus / "white" / "white_001.png"
    deleted.unlink()

    second = run_nightly(load_nightly_config(cfg_path))
    s = second.tag
    assert (s.new, s.changed, s.deleted, s.skipped, s.images, s.errors) == (1, 1, 1, total - 2, 2, 0)
    assert s.change == "incremental" and s.version == 2 and s.rows == total
    record = json.loads((tmp_path / "tags" / "_runs" / f"{s.run_id}.nightly.json").read_text())
    assert {k: record["counts"][k] for k in ("new", "changed", "deleted", "skipped", "errors")} == {
        "new": 1,
        "changed": 1,
        "deleted": 1,
        "skipped": total - 2,
        "errors": 0,
    }
    assert {"tag", "dedup", "split", "audit", "total"} <= set(
        record["timings"]
    ) and "tag.list_seconds" in record["timings"]

    v2 = _rows(read_current(str(tmp_path / "tags")))
    assert set(v2) == (set(v1) - {str(deleted)}) | {str(corpus / "noise" / "noise_copy_new.jpg")}
    assert (
        v2[str(changed)]["run_id"] == s.run_id
        and "green_theme" in v2[str(changed)]["tags"]
        and "blue_theme" not in v2[str(changed)]["tags"]
    )
    assert v2[str(corpus / "noise" / "noise_copy_new.jpg")]["run_id"] == s.run_id
    unchanged = set(v2) - {str(changed), str(corpus / "noise" / "noise_copy_new.jpg")}
    for uri in unchanged:  # not recomputed: the first run's rows, as they were
        assert v2[uri] == v1[uri], uri
    assert len(read_current(str(tmp_path / "tags"), version=1)) == total  # the old version stays readable

    # the new copy joins its original's cluster and split; nothing assigned moved; no leaks
    splits_v2 = _read(tmp_path / "tags-splits" / "splits.parquet")
    new_uri, original_uri = str(corpus / "noise" / "noise_copy_new.jpg"), str(original)
    assert (
        splits_v2[new_uri]["cluster_id"] == splits_v2[original_uri]["cluster_id"]
        and splits_v2[new_uri]["split"] == splits_v2[original_uri]["split"]
    )
    assert all(
        splits_v2[u]["split"] == splits_v1[u]["split"]
        for u in splits_v2
        if u in splits_v1 and u != str(changed)
    )
    assert (
        splits_v2[str(changed)]["cluster_id"]
        == splits_v2[str(corpus / "green" / "green_000.jpg")]["cluster_id"]
    )  # its new content's
    assert (
        second.split.kept_from_previous == len(splits_v1) - 2
        and second.leaks == 0
        and second.audits["split"].leaks == 0
    )

    third = run_tag_job(load_nightly_config(cfg_path).tag)  # nothing changed: no work, no version
    assert (third.change, third.images, third.version, third.skipped) == ("no change", 0, 2, total)

    # an external training set now holds a val/test image: stability keeps it where it
    # was, so the audit must report the leak and the command exit 1
    held = next(r for r in splits_v2.values() if r["split"] in ("val", "test"))
    pq.write_table(pa.table({"sha256": [held["sha256"]]}), tmp_path / "external_train.parquet")
    cfg_path.write_text(cfg_path.read_text() + f'exclude = ["{tmp_path / "external_train.parquet"}"]\n')
    result = CliRunner().invoke(app, ["nightly", "-c", str(cfg_path), "--no-progress"])
    assert result.exit_code == 1, result.output
    external = re.escape(str(tmp_path / "external_train.parquet"))
    line = rf"audit exclude:{external}: LEAKS FOUND[^\n]*: 1 of \d+ eval"
    assert re.search(line, result.output), result.output  # the audit's own words (AuditReport.text)
    as_json = CliRunner().invoke(
        app, ["nightly", "-c", str(cfg_path), "--no-progress", "--log-format", "json"]
    )
    record = next(json.loads(x) for x in as_json.stdout.splitlines() if x.startswith('{"result"'))
    assert as_json.exit_code == 1 and record["result"] == "NightlySummary" and record["leaks"] == 1


def _read(path: Path) -> dict[str, dict]:
    return _rows(pq.read_table(path))


def test_new_model_weights_retag_all_and_thresholds_only_rethreshold(
    ray_session, demo_bundle, demo_corpus, tmp_path
):
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle)
    out = str(tmp_path / "tags")
    cfg = make_tag_config(
        inputs=[str(demo_corpus / "images")], output=out, model=str(bundle), rows_per_part=16
    )
    first = run_tag_job(cfg)
    v1 = _rows(read_current(out))

    # thresholds only: no inference, stored logits untouched, tags follow the new threshold
    strict = run_tag_job(
        make_tag_config(
            inputs=[str(demo_corpus / "images")],
            output=out,
            model=str(bundle),
            rows_per_part=16,
            threshold=0.9,
        )
    )
    assert (
        strict.change == "rules changed"
        and strict.images == 0
        and strict.rows_by_node == {}
        and strict.rethresholded == first.listed
    )
    v2 = _rows(read_current(out))
    dropped = 0
    for uri, row in v2.items():
        assert (
            row["logit_indices"] == v1[uri]["logit_indices"]
            and row["logit_values"] == v1[uri]["logit_values"]
        )
        assert set(row["tags"] or []) <= set(v1[uri]["tags"] or [])
        dropped += len(set(v1[uri]["tags"] or []) - set(row["tags"] or []))
        general = [
            score
            for tag, score in zip(row["tags"] or [], row["scores"] or [])
            if tag in (row["tags_general"] or [])
        ]
        assert all(score >= 0.9 for score in general)
    assert dropped > 0

    # a new OOD reference (calibration side): rethreshold recomputes distances, no inference
    reference = dict(np.load(bundle / "model_ood_ref.npz"))
    reference["mu"] = reference["mu"] + 1.0
    np.savez(bundle / "model_ood_ref.npz", **reference)
    recal = run_tag_job(
        make_tag_config(
            inputs=[str(demo_corpus / "images")],
            output=out,
            model=str(bundle),
            rows_per_part=16,
            threshold=0.9,
        )
    )
    assert recal.change == "rules changed" and recal.images == 0 and recal.rethresholded == first.listed
    v3 = _rows(read_current(out))
    moved = [
        u
        for u, r in v3.items()
        if r["ood_distance"] is not None and r["ood_distance"] != v2[u]["ood_distance"]
    ]
    assert len(moved) == sum(1 for r in v2.values() if r["ood_distance"] is not None) > 0
    assert all(v3[u]["logit_values"] == v2[u]["logit_values"] for u in v3)

    # the same file name, other weights: everything is tagged again with the new model
    save_with_external_data(build_graph(seed=1), bundle / "model.onnx")
    reinfer = run_tag_job(
        make_tag_config(
            inputs=[str(demo_corpus / "images")],
            output=out,
            model=str(bundle),
            rows_per_part=16,
            threshold=0.9,
        )
    )
    assert (
        reinfer.change == "inference settings changed"
        and reinfer.images == reinfer.reinferred == first.listed
        and reinfer.model_sha256 != first.model_sha256
    )
    v4 = read_current(out)
    assert set(v4.column("model_sha256").to_pylist()) == {reinfer.model_sha256} and set(
        v4.column("run_id").to_pylist()
    ) == {reinfer.run_id}
    old = read_current(out, version=1)  # the previous model's rows stay readable
    assert set(old.column("model_sha256").to_pylist()) == {first.model_sha256}

    # vacuum: parts only old versions use go; the kept versions read as before
    table = TagTable(out)
    stray = (
        tmp_path / "tags" / "data" / "stray"
    )  # an unnamed part of a run in progress: kept by the grace period
    stray.mkdir()
    (stray / "part-inflight.parquet").write_bytes(b"x")
    before_parts = len(list((tmp_path / "tags").glob("data/*/part-*.parquet")))
    result = CliRunner().invoke(
        app, ["vacuum", "--tags", out, "--keep-versions", "1", "--grace-hours", "0", "--dry-run"]
    )
    assert result.exit_code == 0 and "would delete" in result.output
    assert len(list((tmp_path / "tags").glob("data/*/part-*.parquet"))) == before_parts
    long_ago = time.time() - 7200
    for part in (tmp_path / "tags").glob("data/*/part-*.parquet"):  # every committed part: two hours old
        os.utime(part, (long_ago, long_ago))
    os.utime(stray / "part-inflight.parquet")  # the in-flight one: just written
    leftover = stray / "part-killed.parquet.tmp-0123"  # a temp file a killed writer left
    leftover.write_bytes(b"x")
    os.utime(leftover, (long_ago, long_ago))
    report = table.vacuum(keep_versions=2, grace_hours=1)
    assert report["tmp_deleted"] == 1 and not leftover.exists()
    assert (
        report["versions_kept"] == [3, 4]
        and report["versions_deleted"] == [1, 2]
        and table.versions() == [3, 4]
    )
    assert (stray / "part-inflight.parquet").exists()
    remaining = {
        str(p.relative_to(tmp_path / "tags")) for p in (tmp_path / "tags").glob("data/*/part-*.parquet")
    } - {"data/stray/part-inflight.parquet"}
    assert remaining == set(table.snapshot(3).files) | set(table.snapshot(4).files)
    assert read_current(out).equals(v4)
    with pytest.raises(TagpipeError, match="no version 1"):
        read_current(out, version=1)


def test_mass_deletion_is_refused_and_changes_nothing(ray_session, demo_bundle, demo_corpus, tmp_path):
    corpus = tmp_path / "images"
    shutil.copytree(demo_corpus / "images", corpus)
    cfg = make_tag_config(inputs=[str(corpus)], output=str(tmp_path / "tags"), model=str(demo_bundle))
    run_tag_job(cfg)
    for kind in ("red", "green", "blue", "noise"):
        shutil.rmtree(corpus / kind)
    with pytest.raises(TagpipeError, match="max_delete_fraction=0.2"):
        run_tag_job(cfg)
    assert TagTable(str(tmp_path / "tags")).current().version == 1
    accepted = run_tag_job(
        make_tag_config(
            inputs=[str(corpus)],
            output=str(tmp_path / "tags"),
            model=str(demo_bundle),
            max_delete_fraction=1.0,
        )
    )
    assert accepted.version == 2 and accepted.deleted > 0 and accepted.images == 0


def test_unchanged_bytes_without_metadata_are_compared_by_sha256(
    ray_session, demo_bundle, demo_corpus, tmp_path
):
    images = sorted(str(p) for p in (demo_corpus / "images").rglob("*.jpg"))[:6]
    copies = tmp_path / "imgs"
    copies.mkdir()
    uris = []
    for i, path in enumerate(images):
        shutil.copyfile(path, copies / f"{i}.jpg")
        uris.append(str(copies / f"{i}.jpg"))
    listing = tmp_path / "list.txt"  # a plain URI list: no size, etag or mtime
    listing.write_text("\n".join(uris) + "\n")
    cfg = make_tag_config(inputs=[str(listing)], output=str(tmp_path / "tags"), model=str(demo_bundle))
    run_tag_job(cfg)
    shutil.copyfile(images[-1], copies / "0.jpg")  # other bytes under the same name
    again = run_tag_job(cfg)
    assert (again.changed, again.skipped, again.images) == (1, 5, 1)


# slow (70 s): tests/job/test_reliability.py kills the driver at each point of a nightly run
# in the default suite; this one kills a real `tagpipe nightly` mid-tagging end to end
@pytest.mark.slow
def test_sigkill_mid_nightly_keeps_the_current_version_and_rerun_completes(
    ray_session, demo_bundle, demo_corpus, tmp_path
):
    corpus = tmp_path / "images"
    shutil.copytree(demo_corpus / "images", corpus)
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle)
    cfg_path = _config(tmp_path, corpus, bundle, batch_size=4, decode_batch_size=4)
    first = run_tag_job(load_nightly_config(cfg_path).tag)
    out = tmp_path / "tags"
    before = read_current(str(out))
    current_json = (out / "_current.json").read_bytes()

    # new weights (every image must be tagged again), one image added, one deleted
    save_with_external_data(build_graph(seed=1), bundle / "model.onnx")
    shutil.copyfile(corpus / "red" / "red_001.png", corpus / "red" / "red_extra.png")
    (corpus / "noise" / "noise_001.png").unlink()
    known = set(p for p in out.glob("data/*/part-*.parquet"))
    command = [
        sys.executable,
        str(Path(__file__).parents[2] / "jobs" / "nightly.py"),
        "-c",
        str(cfg_path),
        "--no-progress",
    ]  # the Ray job entrypoint
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not set(out.glob("data/*/part-*.parquet")) - known:
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no part written in time"
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    staged = len(set(out.glob("data/*/part-*.parquet")) - known)

    assert (out / "_current.json").read_bytes() == current_json  # the previous version, untouched
    assert read_current(str(out)).equals(before)

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "reused from an interrupted run" in rerun.stdout and staged >= 1
    after = _rows(read_current(str(out)))
    assert (
        len(after) == first.listed
        and str(corpus / "red" / "red_extra.png") in after
        and str(corpus / "noise" / "noise_001.png") not in after
    )
    assert {r["model_sha256"] for r in after.values()} != {first.model_sha256}
    assert len({r["model_sha256"] for r in after.values()}) == 1
    manifest = sorted((out / "_runs").glob("*.nightly.json"))[-1]
    counts = json.loads(manifest.read_text())["counts"]
    assert (counts["new"], counts["deleted"], counts["reinferred"], counts["images"] + counts["reused"]) == (
        1,
        1,
        first.listed - 1,
        first.listed,
    )

    clean_out = tmp_path / "clean"  # the same result as an uninterrupted run, row for row
    run_tag_job(
        make_tag_config(inputs=[str(corpus)], output=str(clean_out), model=str(bundle), rows_per_part=8)
    )
    clean = _rows(read_current(str(clean_out)))
    strip = lambda rows: {u: {k: v for k, v in r.items() if k not in VOLATILE} for u, r in rows.items()}  # noqa: E731
    assert strip(after) == strip(clean)


def test_table_commit_refuses_a_concurrent_writer(tmp_path):
    from pipeline.table.tag_table import CommitConflict, Snapshot

    table = TagTable(str(tmp_path / "t"))

    def snap(v, run):
        return Snapshot(
            version=v,
            files=(),
            rows=0,
            model_sha256="m",
            inference_key="i",
            rules_key="r",
            run_id=run,
            committed_at="2026-01-01T00:00:00+00:00",
        )

    table.commit(None, snap(1, "r1"))
    base = table.current()
    table.commit(base, snap(2, "winner"))
    with pytest.raises(
        CommitConflict,
        match=r"version 2 was committed by run winner .* while run loser worked from version 1",
    ):
        table.commit(base, snap(2, "loser"))
    assert table.current().run_id == "winner" and table.versions() == [1, 2]
    assert json.loads((tmp_path / "t" / "_current.json").read_text())["files"] == []


def test_example_nightly_config_parses_and_names_bad_fields(tmp_path):
    example = Path(__file__).parents[2] / "configs" / "nightly.example.toml"
    cfg = load_nightly_config(example)
    assert (
        cfg.dedup_output == cfg.tag.output.rstrip("/") + "-dedup"
        and cfg.tag.max_delete_fraction == 0.2
        and cfg.fail_on_leaks
    )
    bad = tmp_path / "bad.toml"
    ratios = "ratios = { train = 0.9, val = 0.05, test = 0.05 }"
    assert ratios in example.read_text()
    bad.write_text(example.read_text().replace(ratios, 'ratios = "val=1"'))
    with pytest.raises(Exception, match=r"field nightly.split.ratios has a bad value: 'val=1'"):
        load_nightly_config(bad)
    bad.write_text(example.read_text().replace("\n[nightly.dedup]", "max_distanse = 3\n\n[nightly.dedup]"))
    with pytest.raises(Exception, match=r"unknown field\(s\) in \[nightly\]: max_distanse"):
        load_nightly_config(bad)


def test_job_entrypoints_run_the_cli_commands():
    root = Path(__file__).parents[2]
    for script, words in (("jobs/nightly.py", "refresh dedup"), ("jobs/tag.py", "versioned Parquet table")):
        done = subprocess.run(
            [sys.executable, str(root / script), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=root,
        )
        assert done.returncode == 0 and words in " ".join(done.stdout.split()), done.stdout + done.stderr


def test_demo_reruns_change_nothing_and_a_smaller_demo_drops_the_rest(ray_session, tmp_path):
    from pipeline.demo.end_to_end import run_demo

    first = run_demo(tmp_path / "demo", images_per_kind=2)
    again = run_demo(tmp_path / "demo", images_per_kind=2)  # same bytes rewritten nowhere: no work
    assert (again.summary.change, again.summary.images, again.summary.version) == ("no change", 0, 1)
    smaller = run_demo(tmp_path / "demo", images_per_kind=1)
    assert (
        smaller.summary.deleted == first.summary.listed - smaller.summary.listed > 0
    )  # (other sizes drawn: many changed)
    assert smaller.checked == smaller.correct == smaller.summary.listed


def test_the_nightly_audit_line_is_the_audits_own_and_an_unchecked_audit_never_exits_0(
    ray_session, demo_bundle, demo_corpus, tmp_path
):
    """The audit's line is the audit's own (AuditReport.text), and the record the nightly
    file keeps says the same.
    With the embedding, the demo's flat colours (too little detail for phash) are checked
    by it: complete, exit 0. With the embedding off, nothing checks them for near copies:
    the line says how many, and the nightly exits 4, not 0."""
    from pipeline.corpus.audit import missing_text, short_of

    def nightly(name: str, extra: str) -> tuple:
        root = tmp_path / name
        corpus = root / "images"
        shutil.copytree(demo_corpus / "images", corpus)
        cfg_path = _config(root, corpus, demo_bundle)
        cfg_path.write_text(cfg_path.read_text() + extra)
        result = CliRunner().invoke(app, ["nightly", "-c", str(cfg_path), "--no-progress"])
        record = json.loads(next((root / "tags" / "_runs").glob("*.nightly.json")).read_text())
        return result, record["audits"]["split"]

    result, audit = nightly("with", "[nightly.dedup]\nembedding_threshold = 0.99\n")
    assert audit["asked"] == ["sha256", "phash", "embedding"] and audit["not_checked"]["phash"] > 0
    assert audit["complete"] and not short_of(audit["asked"], audit["not_checked"]), audit
    assert result.exit_code == 0 and "audit split: clean: 0 of" in result.output, result.output
    result, audit = nightly("without", '[nightly.dedup]\nembedding_threshold = "off"\n')
    missing = short_of(audit["asked"], audit["not_checked"])
    assert audit["asked"] == ["sha256", "phash"] and missing and not audit["complete"], audit
    assert missing_text(missing, audit["eval_images"]) in result.output
    assert result.exit_code == 4 and "NOT FULLY CHECKED" in result.output, result.output


def test_the_nightly_audit_is_asked_for_the_embedding_unless_dedup_turned_it_off(demo_bundle, tmp_path):
    """dedup's threshold when it had one; when it was asked for one and found none, the
    audit asks too (so it cannot read as checked); `off` in [nightly.dedup] is off."""
    from pipeline.corpus.audit import asked_signals
    from pipeline.corpus.embedding_threshold import EmbeddingThreshold
    from pipeline.job.nightly import _audit_threshold

    cfg = load_nightly_config(_config(tmp_path, tmp_path, demo_bundle))
    assert _audit_threshold(cfg, EmbeddingThreshold(0.93, "auto")) == 0.93
    assert _audit_threshold(cfg, EmbeddingThreshold(reason="too few rows")) == "auto"
    assert "embedding" in asked_signals(_audit_threshold(cfg, EmbeddingThreshold()))
    off = cfg.model_copy(update={"dedup": cfg.dedup.model_copy(update={"embedding_threshold": None})})
    assert _audit_threshold(off, EmbeddingThreshold()) is None and asked_signals(None) == ("sha256", "phash")
