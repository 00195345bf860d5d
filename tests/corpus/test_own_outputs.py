"""tagpipe never reads its own outputs as inputs: every output folder or file it writes
is marked (pipeline/storage/outputs.py), and a listing leaves out what the marks name,
counted as `tagpipe_output` (locally, and on S3 listed by key ranges)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import boto3
import pytest
import s3fs
from PIL import Image

from pipeline.job.nightly import run_nightly
from pipeline.job.settings import load_nightly_config
from pipeline.storage.key_ranges import KeyRangeSettings
from pipeline.storage.manifest import ListingRules, build_manifest
from pipeline.storage.outputs import GUARD_FILE, OUTPUT_MARKER, mark_file, mark_output
from pipeline.table.tag_table import read_current


def _files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.is_file()}


def _nightly_config(tmp_path: Path, corpus: Path, bundle: Path) -> Path:
    """A nightly whose every output lies inside its input, and not beside each other."""
    tag = {
        "inputs": [str(corpus)],
        "output": str(corpus / "tags"),
        "model": str(bundle),
        "rows_per_part": 8,
        "batch_size": 8,
    }
    nightly = {
        "dedup_output": str(corpus / "work" / "dedup"),
        "splits_output": str(corpus / "green" / "splits"),  # among the images themselves
        "ratios": "train=0.6,val=0.2,test=0.2",
        "seed": 3,
    }
    lines = ["[tag]"] + [f"{k} = {json.dumps(v)}" for k, v in tag.items()]
    lines += ["[nightly]"] + [f"{k} = {json.dumps(v)}" for k, v in nightly.items()]
    path = tmp_path / "nightly.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_nightly_with_its_outputs_inside_its_input_never_tags_them(
    ray_session, demo_bundle, demo_corpus, tmp_path
):
    corpus = tmp_path / "images"
    shutil.copytree(demo_corpus / "images", corpus)
    images = _files(corpus)
    cfg_path = _nightly_config(tmp_path, corpus, demo_bundle)
    outputs = [corpus / "tags", corpus / "work" / "dedup", corpus / "green" / "splits"]
    first_failed: set[str] = set()
    for night in range(3):
        if night == 2:  # a new image among the outputs' folders: tagged like any other
            Image.new("RGB", (32, 32), (9, 200, 9)).save(corpus / "green" / "new.png")
            images.add(str(corpus / "green" / "new.png"))
        written = set().union(*(_files(o) for o in outputs if o.exists()))
        summary = run_nightly(load_nightly_config(cfg_path))
        uris = set(read_current(str(corpus / "tags"), columns=["uri"]).column("uri").to_pylist())
        assert uris == images, sorted(uris ^ images)[:5]  # no row for any file of its own
        skipped = summary.tag.skipped_files
        assert skipped.get("tagpipe_output", 0) == len(written), (night, skipped)
        assert summary.tag.files_found == len(images) + sum(skipped.values())
        if written:
            assert f"{len(written)} tagpipe_output" in summary.tag.text()
        record = json.loads((corpus / "tags" / "_runs" / f"{summary.run_id}.nightly.json").read_text())
        assert record["counts"]["skipped_files"].get("tagpipe_output", 0) == len(written)
        errors = read_current(str(corpus / "tags"), columns=["uri", "error_kind"]).to_pylist()
        failed = {r["uri"] for r in errors if r["error_kind"]}
        if night == 0:
            first_failed = failed
        assert failed == first_failed  # the demo's own broken files only, every night
    for folder in outputs[1:]:
        assert json.loads((folder / OUTPUT_MARKER).read_text())["whole"]
    assert not (corpus / "tags" / "_runs" / OUTPUT_MARKER).exists()  # the table's marker names _runs/


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def test_marks_name_whole_folders_files_and_extensions(tmp_path):
    _tree(
        tmp_path,
        {
            "a.png": b"x",
            "b/c.png": b"x",
            "b/c.txt": b"a caption a user wrote",
            "out/dedup/clusters.parquet": b"x",
            "out/dedup/_summary.json": b"{}",
            "out/dedup/_index/seg.parquet": b"x",
            "report.html": b"<html>",
            "captions/d.txt": b"tags",
            "captions/d.png": b"x",
        },
    )
    mark_output(
        str(tmp_path / "out" / "dedup"), "dedup", writes=("clusters.parquet", "_summary.json", "_index")
    )
    mark_file(str(tmp_path / "report.html"), "report")
    mark_output(str(tmp_path / "captions"), "captions export", names=(), extensions=(".txt",))
    for rules in (ListingRules(), ListingRules(skip_sidecars=False), ListingRules(frozenset({"png"}))):
        listing = build_manifest([str(tmp_path)], rules=rules, parallel=False)
        uris = set(listing.manifest.column("uri").to_pylist())
        assert {str(tmp_path / n) for n in ("a.png", "b/c.png", "captions/d.png")} <= uris
        # three dedup files + report + caption + three markers, whatever other rule they met
        # first; except a single file named by its folder's marker that another rule skipped
        # (report.html, not a png), which keeps that rule's reason: skipped files are
        # counted by folder and extension, not kept one by one
        expected = 7 if rules.extensions else 8
        assert listing.skipped["tagpipe_output"] == expected, (rules, listing.skipped)
        assert not any("/out/" in u or u.endswith((".html", "d.txt")) for u in uris)
        assert listing.found == 9 + 3
    # a marker adds to what its folder's marker said, never narrows it
    mark_file(str(tmp_path / "out" / "dedup" / "report.html"), "report")
    assert json.loads((tmp_path / "out" / "dedup" / OUTPUT_MARKER).read_text())["whole"]


def test_a_listing_of_the_output_itself_lists_nothing(tmp_path):
    _tree(tmp_path, {"splits/splits.parquet": b"x", "splits/_report.json": b"{}"})
    mark_output(str(tmp_path / "splits"), "split", writes=("splits.parquet", "_report.json"))
    listing = build_manifest([str(tmp_path / "splits")], parallel=False)
    assert listing.manifest.num_rows == 0 and listing.skipped == {"tagpipe_output": 3}


def test_marked_outputs_on_s3_are_left_out_whatever_range_lists_them(s3_server):
    bucket = "tagpipe-own-outputs"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    mark_output(f"s3://{bucket}/photos/out", "dedup")  # before its first file, as dedup marks it
    keys = [f"photos/{i:03d}.png" for i in range(40)] + [f"photos/out/{i:03d}.parquet" for i in range(30)]
    keys += ["photos/out/_summary.json", "photos/zz.html"]
    # a table from before the marker: its guard file names its entries
    keys += [f"photos/old/{GUARD_FILE}", "photos/old/data/k/part-0.parquet", "photos/old/_current.json"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    s3fs.S3FileSystem().invalidate_cache()
    mark_file(f"s3://{bucket}/photos/zz.html", "report")
    s3fs.S3FileSystem().invalidate_cache()
    # pages of 5 keys, ranges cut after 2 pages: the marker is listed in another range
    # than most of the files it names
    ranges = KeyRangeSettings(concurrency=4, pages_per_range=2, page_keys=5)
    listing = build_manifest([f"s3://{bucket}/photos"], parallel=False, key_ranges=ranges)
    uris = listing.manifest.column("uri").to_pylist()
    assert uris == [f"s3://{bucket}/photos/{i:03d}.png" for i in range(40)]
    assert listing.skipped == {"tagpipe_output": 30 + 1 + 1 + 2 + 2, "sidecar": 1}


@pytest.mark.parametrize("where", ["beside", "above"])
def test_a_tag_table_marks_only_its_own_entries(tmp_path, where):
    """A table at the root of its images leaves them listed (only its entries are its own)."""
    from pipeline.storage.outputs import TABLE_ENTRIES
    from pipeline.table import tag_table

    root = tmp_path if where == "beside" else tmp_path / "project"
    _tree(root, {"a.png": b"x", "data/k/part-1.parquet": b"x", "_current.json": b"{}"})
    tag_table.TagTable(str(root)).mark()
    listing = build_manifest([str(tmp_path)], parallel=False)
    assert listing.manifest.column("uri").to_pylist() == [str(root / "a.png")]
    assert listing.skipped == {"tagpipe_output": 2, "sidecar": 1}  # _current.json: a sidecar first
    names = {tag_table.DATA_DIR, tag_table.VERSIONS_DIR, tag_table.RUNS_DIR, tag_table.MANIFESTS_DIR}
    names |= {tag_table.CALIBRATION_DIR, tag_table.SUMMARIES_DIR, tag_table.CURRENT, tag_table.GUARD_FILE}
    assert names | {tag_table.LABELS_DIR} <= set(TABLE_ENTRIES)


def test_reports_exports_and_review_queues_inside_an_input_are_left_out(tagged, tmp_path):
    from pipeline.corpus.export import export_tags
    from pipeline.corpus.report import build_report
    from pipeline.corpus.review import ReviewSettings, run_review

    table, corpus = tagged
    photos = tmp_path / "photos"
    mine = [photos / "a.png", photos / "sub" / "b.png"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)
    build_report(str(table), str(photos / "report.html"))
    export_tags(str(table), str(photos / "sub"), "jsonl")  # beside an image of the user's
    export_tags(str(table), str(photos / "captions"), "captions", relative_to=str(corpus / "images"))
    run_review(ReviewSettings(tags=str(table), kind="uncertain", out=str(photos / "queue.jsonl")))
    written = _files(photos) - {str(p) for p in mine}
    assert len(written) > 8  # report, JSONL, captions, queue and page, markers
    listing = build_manifest([str(photos)], rules=ListingRules(skip_sidecars=False), parallel=False)
    assert listing.manifest.column("uri").to_pylist() == sorted(str(p) for p in mine)
    assert listing.skipped == {"tagpipe_output": len(written)}


def test_an_output_pointed_at_a_folder_of_images_marks_only_its_own_files(tmp_path):
    """`split -o photos` by mistake: the split's files are left out, the images stay inputs."""
    _tree(tmp_path, {"photos/a.png": b"x", "photos/sub/b.png": b"x", "photos/.DS_Store": b"x"})
    mark_output(str(tmp_path / "photos"), "split", writes=("splits.parquet", "_report.json"))
    _tree(tmp_path, {"photos/splits.parquet": b"x", "photos/_report.json": b"{}"})
    listing = build_manifest([str(tmp_path / "photos")], parallel=False)
    assert listing.manifest.column("uri").to_pylist() == [
        str(tmp_path / "photos/a.png"),
        str(tmp_path / "photos/sub/b.png"),
    ]
    assert listing.skipped == {
        "tagpipe_output": 2,
        "os_debris": 1,
        "sidecar": 1,
    }  # _report.json: a sidecar first
    mark_output(str(tmp_path / "new"), "split", writes=("splits.parquet",))  # a new folder: all of it
    assert json.loads((tmp_path / "new" / OUTPUT_MARKER).read_text())["whole"]
