"""Faults and hostile input (issue 11): a store that answers 503 SlowDown and drops
connections, a tagger actor killed mid-run, the driver killed at several points,
hostile object keys (stragglers and big files: test_failures.py). The list with results
is in docs/reliability.md."""

from __future__ import annotations

import json

import pytest
import s3fs

from pipeline.demo.end_to_end import check_tags
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.storage.outputs import OUTPUT_MARKER
from pipeline.table.tag_table import TagTable, read_current
from tests.faults import FaultProxy

CORPUS_ERRORS = {"empty": 1, "not_an_image": 2, "truncated": 1}


def test_s3_slowdowns_and_dropped_connections_lose_nothing(ray_session, s3_server, demo_bundle, demo_corpus):
    fs = s3fs.S3FileSystem()
    fs.mkdir("tagpipe-faults")
    fs.put(str(demo_corpus / "images") + "/", "tagpipe-faults/images/", recursive=True)
    images = sorted(f"s3://{p}" for p in fs.find("tagpipe-faults/images"))
    with FaultProxy(s3_server, every=3, faults=80) as proxy:
        cfg = make_tag_config(
            inputs=["s3://tagpipe-faults/images/"],
            output="s3://tagpipe-faults/tags/",
            model=str(demo_bundle),
            rows_per_part=16,
            storage_options={"endpoint_url": proxy.url},
        )
        summary = run_tag_job(cfg)
    # every third request failed (half of them with no answer at all), up to 80 faults
    assert min(proxy.injected.values()) >= 20 and proxy.requests >= 3 * sum(proxy.injected.values()), (
        proxy.injected
    )
    assert summary.images == len(images) and summary.errors_by_kind == CORPUS_ERRORS  # no read_error rows
    fs.invalidate_cache()
    table = read_current("s3://tagpipe-faults/tags/")  # straight from the server, not through the proxy
    assert sorted(table.column("uri").to_pylist()) == images  # every row, exactly once
    checked, correct, wrong = check_tags(
        "s3://tagpipe-faults/tags", demo_corpus, images_root="s3://tagpipe-faults/images", storage_options={}
    )
    assert (checked, correct, wrong) == (len(images), len(images), [])


def _tagger_processes() -> list:
    """Tagger actors' processes while they run a batch (Ray titles them `...Tagger)).submit`)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(proc.info["cmdline"] or [])
            if ("PassTagger" in title or "FusedTagger" in title) and ".submit" in title:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_a_tagger_actor_killed_mid_run_loses_and_duplicates_nothing(
    ray_session, demo_bundle, demo_corpus, tmp_path
):
    """SIGKILL the tagger actor's process while it tags a batch: Ray restarts the actor
    and resubmits its batches (Ray Data's defaults, which graph.py keeps). The demo model
    made slower (same outputs) keeps the actor at work long enough to be found."""
    import signal
    import threading
    import time

    from pipeline.demo.model import write_demo_bundle

    out = tmp_path / "tags"
    cfg = make_tag_config(
        inputs=[str(demo_corpus / "images")],
        output=str(out),
        model=str(write_demo_bundle(tmp_path / "slower", slow_layers=24)),
        rows_per_part=8,
        batch_size=4,
        decode_batch_size=4,
    )
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run_tag_job(cfg)))
    job.start()
    killed = []
    deadline = time.monotonic() + 240
    while not killed and job.is_alive() and time.monotonic() < deadline:
        for proc in _tagger_processes():
            proc.send_signal(signal.SIGKILL)
            killed.append(proc.pid)
        time.sleep(0.02)
    job.join(timeout=300)
    assert killed, "the tagger actor was not found mid-run"
    summary = result["summary"]
    images = sorted(str(p) for p in (demo_corpus / "images").rglob("*") if p.is_file())
    table = read_current(str(out))
    assert sorted(table.column("uri").to_pylist()) == images  # every input exactly once
    assert summary.errors_by_kind == CORPUS_ERRORS  # no row lost to the kill as an error either
    checked, correct, wrong = check_tags(out, demo_corpus)
    assert (checked, correct, wrong) == (len(images), len(images), [])
    assert len(set(table.column("run_id").to_pylist())) == 1


SLOW = pytest.mark.slow  # each point is a real run killed; the default run kills two of them


@pytest.mark.parametrize(
    "point",
    [
        pytest.param("listing", marks=SLOW),
        "tagging",
        pytest.param("commit-version", marks=SLOW),
        "commit-rename",
    ],
)
def test_driver_killed_at_each_point_of_a_nightly_run(ray_session, demo_bundle, demo_corpus, tmp_path, point):
    """A committed table; the corpus gains and loses an image; the nightly run's driver is
    SIGKILLed at `point`. Readers see the old version, byte for byte; the rerun commits
    the right table, and unchanged rows were not recomputed."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    corpus = tmp_path / "images"
    shutil.copytree(demo_corpus / "images", corpus)
    out = tmp_path / "tags"
    cfg = make_tag_config(inputs=[str(corpus)], output=str(out), model=str(demo_bundle), rows_per_part=16)
    first = run_tag_job(cfg)
    before = {r["uri"]: r for r in read_current(str(out)).to_pylist()}
    current = (out / "_current.json").read_bytes()
    shutil.copy(corpus / "red" / "red_001.png", corpus / "red" / "red_new.png")
    (corpus / "noise" / "noise_001.png").unlink()

    command = [
        sys.executable,
        str(Path(__file__).parents[1] / "kill_at.py"),
        point,
        "tag",
        "-i",
        str(corpus),
        "-o",
        str(out),
        "-m",
        str(demo_bundle),
        "--rows-per-part",
        "16",
        "--no-progress",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "_current.json").read_bytes() == current  # the pointer file is untouched
    if point in (
        "commit-version",
        "commit-rename",
    ):  # the version record is the commit: readers see version 2 at once
        assert TagTable(str(out)).current().version == 2
        rerun = run_tag_job(cfg)
        assert (rerun.new, rerun.deleted, rerun.version, rerun.change) == (0, 0, 2, "no change")
        assert (
            json.loads((out / "_current.json").read_text())["version"] == 2
        )  # the rerun brought the pointer up
    else:
        assert {
            r["uri"]: r for r in read_current(str(out)).to_pylist()
        } == before  # readers see version 1 as it was
        rerun = run_tag_job(cfg)
        assert (rerun.new, rerun.deleted, rerun.version) == (1, 1, 2)
    after_rows = {r["uri"]: r for r in read_current(str(out)).to_pylist()}
    images = sorted(str(p) for p in corpus.rglob("*") if p.is_file())
    assert sorted(after_rows) == images  # every input exactly once, the deleted one gone
    assert all(after_rows[u] == before[u] for u in images if u in before)  # unchanged rows kept as they were
    added = after_rows[str(corpus / "red" / "red_new.png")]
    copied_from = before[str(corpus / "red" / "red_001.png")]
    assert (
        added["run_id"] != first.run_id and added["error"] is None
    )  # tagged by the killed run (a reused part) or the rerun
    assert (added["tags"], added["sha256"]) == (copied_from["tags"], copied_from["sha256"])


HOSTILE_KEYS = [
    "with space.jpg",
    "ünï cödé/日本語.jpg",
    "a/../b.jpg",
    "b.jpg",
    "/lead.jpg",
    "./dot.jpg",
    "q?x=1#f.jpg",
    "%41.jpg",
    "plus+sign.jpg",
    "../../../../escape.jpg",
    "x" * 900 + ".jpg",
    "deep/" * 20 + "end.jpg",
]


def test_hostile_object_keys_are_tagged_and_outputs_stay_under_their_root(
    ray_session, s3_server, demo_bundle, demo_corpus, tmp_path
):
    """Keys with spaces, unicode, `..`, `.`, a leading slash (`in//lead.jpg`), URL syntax
    and 900-byte names: each is listed, read and tagged under its own URI, and nothing
    is written outside the output root, by the tag job or by a captions export."""
    import boto3

    from pipeline.corpus.export import export_tags

    source = demo_corpus / "images" / "red" / "red_001.png"
    client = boto3.client("s3")
    client.create_bucket(Bucket="tagpipe-hostile")
    for key in HOSTILE_KEYS:
        client.put_object(Bucket="tagpipe-hostile", Key=f"in/{key}", Body=source.read_bytes())
    cfg = make_tag_config(
        inputs=["s3://tagpipe-hostile/in/"],
        output="s3://tagpipe-hostile/out/tags/",
        model=str(demo_bundle),
        rows_per_part=5,
    )
    summary = run_tag_job(cfg)
    uris = sorted(f"s3://tagpipe-hostile/in/{key}" for key in HOSTILE_KEYS)
    assert summary.images == len(HOSTILE_KEYS) and summary.errors == 0
    table = read_current("s3://tagpipe-hostile/out/tags/")
    assert sorted(table.column("uri").to_pylist()) == uris
    assert len({tuple(t) for t in table.column("tags").to_pylist()}) == 1  # the same image under every key
    written = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="tagpipe-hostile")
        for o in page.get("Contents", [])
    ]
    assert all(k.startswith("in/") or k.startswith("out/tags/") for k in written) and len(written) > len(
        HOSTILE_KEYS
    )

    captions = tmp_path / "export" / "captions"
    before = set(tmp_path.rglob("*"))
    exported = export_tags(
        "s3://tagpipe-hostile/out/tags/", str(captions), "captions", relative_to="s3://tagpipe-hostile/in"
    )
    created = set(tmp_path.rglob("*")) - before
    files = [p for p in created if p.is_file() and p.name != OUTPUT_MARKER]  # the mark naming them
    assert exported.written == len(files) == len(HOSTILE_KEYS)  # one caption each, none overwritten
    outside = [
        p
        for p in created
        if p != captions and captions.resolve() not in p.resolve().parents and p not in captions.parents
    ]
    assert not outside, outside  # nothing outside the export root
    assert {p.read_text() for p in files} == {", ".join(table.column("tags")[0].as_py()) + "\n"}
