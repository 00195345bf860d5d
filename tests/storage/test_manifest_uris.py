"""A manifest's relative uris are taken against the manifest's own folder, as a folder
input's files are named: the same image gets one uri, from any working directory."""

from __future__ import annotations

from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.storage.manifest import build_manifest


def _photos(root: Path) -> list[Path]:
    files = [root / "photos" / "a.png", root / "photos" / "sub" / "b.jpg"]
    for file in files:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"x")
    return files


def _write(manifest: Path, uris: list[str]) -> None:
    manifest.parent.mkdir(parents=True, exist_ok=True)
    if manifest.suffix == ".txt":
        manifest.write_text("# images\n" + "\n".join(uris) + "\n")
    elif manifest.suffix == ".csv":
        manifest.write_text("uri\n" + "\n".join(uris) + "\n")
    else:
        pq.write_table(pa.table({"uri": uris}), manifest)


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".parquet"])
def test_relative_uris_are_absolute_against_the_manifest_from_any_directory(tmp_path, monkeypatch, suffix):
    files = _photos(tmp_path)
    manifest = tmp_path / "lists" / f"images{suffix}"
    _write(manifest, ["../photos/a.png", "../photos/./sub/b.jpg", "s3://bucket/kept.png"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    listed = build_manifest(["../lists/" + manifest.name], parallel=False).manifest
    uris = listed.column("uri").to_pylist()
    assert uris == sorted([str(files[0]), str(files[1]), "s3://bucket/kept.png"])
    folder = build_manifest([str(tmp_path / "photos")], parallel=False).manifest
    assert set(folder.column("uri").to_pylist()) <= set(uris)  # one uri per image, either way


def test_absolute_uris_are_kept_as_written(tmp_path):
    files = _photos(tmp_path)
    manifest = tmp_path / "lists" / "images.txt"
    _write(manifest, [str(files[0]), f"file://{files[1]}"])
    uris = build_manifest([str(manifest)], parallel=False).manifest.column("uri").to_pylist()
    assert uris == sorted([str(files[0]), f"file://{files[1]}"])


def test_relative_uris_in_a_manifest_on_s3_stay_in_its_bucket(s3_server):
    client = boto3.client("s3")
    client.create_bucket(Bucket="tagpipe-manifest-uris")
    client.put_object(Bucket="tagpipe-manifest-uris", Key="lists/images.txt", Body=b"../photos/a.png\n")
    s3fs.S3FileSystem().invalidate_cache()
    listed = build_manifest(["s3://tagpipe-manifest-uris/lists/images.txt"], parallel=False).manifest
    assert listed.column("uri").to_pylist() == ["s3://tagpipe-manifest-uris/photos/a.png"]
