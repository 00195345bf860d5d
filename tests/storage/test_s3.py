"""The tag job against S3: moto's standalone server on loopback, reached through the
standard AWS variables only (AWS_ENDPOINT_URL etc., set by the s3_server fixture)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import s3fs

from pipeline.demo.end_to_end import check_tags
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.table.tag_table import GUARD_FILE, read_current


def test_tag_job_reads_and_writes_s3(ray_session, s3_server, demo_bundle, demo_corpus):
    fs = s3fs.S3FileSystem()  # configured by the environment alone, as tagpipe's is
    fs.mkdir("tagpipe-test")
    fs.put(str(demo_corpus / "images") + "/", "tagpipe-test/corpus/images/", recursive=True)
    images = sorted(f"s3://{p}" for p in fs.find("tagpipe-test/corpus/images"))
    assert len(images) == len(list((demo_corpus / "images").rglob("*.*")))

    cfg = make_tag_config(
        inputs=["s3://tagpipe-test/corpus/images/"],
        output="s3://tagpipe-test/tags/",
        model=str(demo_bundle),
        rows_per_part=24,
    )
    summary = run_tag_job(cfg)
    assert summary.images == len(images) and summary.errors_by_kind == {
        "empty": 1,
        "not_an_image": 2,
        "truncated": 1,
    }

    fs.invalidate_cache()
    table = read_current("s3://tagpipe-test/tags/")
    assert sorted(table.column("uri").to_pylist()) == images  # every input exactly once
    etags = set(table.column("etag").drop_null().to_pylist())
    assert len(etags) >= len(images) - 1  # S3 etags from the listing travel along
    checked, correct, wrong = check_tags(
        "s3://tagpipe-test/tags",
        demo_corpus,
        images_root="s3://tagpipe-test/corpus/images",
        storage_options={},
    )
    assert (checked, correct, wrong) == (len(images), len(images), [])
    (listing,) = fs.find("tagpipe-test/tags/_manifests")
    with fs.open(listing, "rb") as handle:
        assert sorted(pq.read_table(handle).column("uri").to_pylist()) == images
    assert len(fs.find("tagpipe-test/tags/_runs")) == 1

    again = run_tag_job(cfg)  # nothing left to do: nothing rewritten, nothing duplicated
    assert again.images == 0 and again.skipped == len(images) and again.version == 1

    # nightly on S3: one new object, one overwritten (its etag changes), one deleted
    fs.put(str(demo_corpus / "images" / "red" / "red_001.png"), "tagpipe-test/corpus/images/red/red_new.png")
    fs.put(
        str(demo_corpus / "images" / "green" / "green_000.jpg"),
        "tagpipe-test/corpus/images/blue/blue_000.jpg",
    )
    fs.rm("tagpipe-test/corpus/images/noise/noise_001.png")
    nightly = run_tag_job(cfg)
    assert (nightly.new, nightly.changed, nightly.deleted, nightly.skipped, nightly.images) == (
        1,
        1,
        1,
        len(images) - 2,
        2,
    )
    after = {r["uri"]: r for r in read_current("s3://tagpipe-test/tags/").to_pylist()}
    assert len(after) == len(images) and "s3://tagpipe-test/corpus/images/noise/noise_001.png" not in after
    assert "green_theme" in after["s3://tagpipe-test/corpus/images/blue/blue_000.jpg"]["tags"]
    assert after["s3://tagpipe-test/corpus/images/red/red_new.png"]["run_id"] == nightly.run_id


def test_credentials_never_reach_logs_or_run_records(s3_server, demo_bundle, demo_corpus, tmp_path):
    """A run with keys in the environment and in --storage-options, verbose: none of the
    secrets appears in its output, logs or any file it writes beside the parts."""
    import json
    import os
    import subprocess
    import sys

    fs = s3fs.S3FileSystem()
    fs.mkdirs("tagpipe-creds/images", exist_ok=True)
    for path in sorted((demo_corpus / "images" / "red").iterdir()):
        fs.put(str(path), f"tagpipe-creds/images/{path.name}")
    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIATAGPIPEKEYID0001",
        "AWS_SECRET_ACCESS_KEY": "tagpipe+secret/Value0001",
        "AWS_SESSION_TOKEN": "tagpipeSessionToken0001",
    }
    options = {"key": "AKIATAGPIPEKEYID0002", "secret": "tagpipe+secret/Value0002"}
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **secrets}
    # the images, plus two keys that do not exist: error rows carry the store's messages
    fs.pipe(
        "tagpipe-creds/list.txt",
        "\n".join(
            [
                *(f"s3://{p}" for p in fs.find("tagpipe-creds/images")),
                "s3://tagpipe-creds/images/gone.jpg",
                "s3://tagpipe-creds/nope/x.png",
            ]
        ).encode(),
    )
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "tag",
        "-i",
        "s3://tagpipe-creds/list.txt",
        "-o",
        "s3://tagpipe-creds/tags/",
        "-m",
        str(demo_bundle),
        "--storage-options",
        json.dumps(options),
        "--verbose",
        "--no-progress",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "7 images tagged" in done.stdout and "not_found" in done.stdout
    ray_logs = {
        str(p): p.read_text(errors="replace")
        for p in Path("/tmp/ray/session_latest/logs").rglob("*")
        if p.is_file()
    }
    assert ray_logs  # the subprocess's Ray session: its workers' logs
    # a run that fails (an option the store rejects) prints its error, not the secrets
    bad = [*command[:-4], "--storage-options", json.dumps({**options, "no_such_option": 1}), "--no-progress"]
    failed = subprocess.run(bad, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and failed.stderr
    parquet = lambda p: p.endswith(".parquet") and GUARD_FILE not in p  # noqa: E731 - guard files are text
    written = {
        p: fs.cat_file(p).decode("utf-8", "replace")
        for p in fs.find("tagpipe-creds/tags")
        if "/data/" not in p and not parquet(p)
    }
    written.update(
        {
            p: str(pq.read_table(fs.open(p, "rb")).to_pylist())
            for p in fs.find("tagpipe-creds/tags")
            if parquet(p)
        }
    )
    assert any("_runs/" in p for p in written) and any(p.endswith("_current.json") for p in written)
    errors = [
        r["error"]
        for p in fs.find("tagpipe-creds/tags/data")
        if parquet(p)
        for r in pq.read_table(fs.open(p, "rb")).to_pylist()
        if r["error"]
    ]
    assert len(errors) == 2
    texts = {
        "stdout": done.stdout,
        "stderr": done.stderr,
        "failed stdout": failed.stdout,
        "failed stderr": failed.stderr,
        **written,
        **ray_logs,
    }
    for secret in [*secrets.values(), *options.values()]:
        for name, text in texts.items():
            assert secret not in text, f"{secret!r} in {name}"
