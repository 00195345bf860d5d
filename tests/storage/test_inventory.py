"""S3 Inventory reports as inputs, against moto's S3 server (the s3_server fixture).

The reports are written as AWS writes them (docs.aws.amazon.com/AmazonS3/latest/userguide/
storage-inventory.html and storage-inventory-location.html): manifest.json under
`<prefix>/<source bucket>/<config>/<timestamp>/`, data files under `<prefix>/<source
bucket>/<config>/data/`; CSV gzip'd, without a header, every field quoted, keys URL-encoded
with a space as '+'; Parquet with AWS's snake-case columns and plain keys. Their rows come
from the store's own listing (ListObjectsV2, ListObjectVersions), so what the inventory says
is what the bucket holds, and the manifest built from it is checked against s3fs's listing.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
from urllib.parse import quote_plus

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.core.errors import ConfigError
from pipeline.storage.manifest import ListingRules, build_manifest

DEST = "tagpipe-inventory-dest"
STAMP = "2026-12-01T00-00Z"
OBJECTS = {  # key -> bytes: the awkward names an inventory must carry through its encoding
    "top.jpg": b"t" * 11,
    "photos/cat 1.jpg": b"c" * 23,
    "photos/a+b.png": b"p" * 31,
    "photos/café ü.jpg": b"u" * 41,
    "photos/100% sure.png": b"s" * 53,
    "photos/cat 1.txt": b"a cat",  # a caption: sidecar
    "photos/.DS_Store": b"\0" * 7,  # os_debris
    "dir/": b"",  # a folder marker, as the console makes: no file
}
SKIPPED = {"photos/cat 1.txt": "sidecar", "photos/.DS_Store": "os_debris"}
CSV_SCHEMA = "Bucket, Key, Size, LastModifiedDate, ETag, StorageClass"
VERSIONED_CSV_SCHEMA = (
    "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
)
PARQUET_NAMES = {  # the CSV schema's names as AWS's Parquet files spell them
    "Bucket": "bucket",
    "Key": "key",
    "VersionId": "version_id",
    "IsLatest": "is_latest",
    "IsDeleteMarker": "is_delete_marker",
    "Size": "size",
    "LastModifiedDate": "last_modified_date",
    "ETag": "e_tag",
    "StorageClass": "storage_class",
}


@pytest.fixture(scope="module")
def store(s3_server):
    """The destination bucket, and a source bucket holding OBJECTS."""
    client = boto3.client("s3")
    client.create_bucket(Bucket=DEST)
    _fill(client, "tagpipe-inventory-src")
    return client


def _fill(client, bucket: str) -> None:
    client.create_bucket(Bucket=bucket)
    for key, body in OBJECTS.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def _put(client, key: str, body: bytes | str) -> None:
    """Write into the destination bucket; s3fs (and so tagpipe) forgets what it had listed."""
    client.put_object(Bucket=DEST, Key=key, Body=body)
    s3fs.S3FileSystem().invalidate_cache()


def _current_rows(client, bucket: str) -> list[dict]:
    """An inventory of current versions: one row per object, as ListObjectsV2 gives them."""
    objects = client.list_objects_v2(Bucket=bucket)["Contents"]
    return [_row(bucket, o) for o in objects]


def _all_version_rows(client, bucket: str) -> list[dict]:
    """An inventory of all versions: old versions and delete markers too."""
    answer = client.list_object_versions(Bucket=bucket)
    rows = [_row(bucket, v) for v in answer.get("Versions", [])]
    rows += [{**_row(bucket, m), "IsDeleteMarker": True} for m in answer.get("DeleteMarkers", [])]
    return rows


def _row(bucket: str, entry: dict) -> dict:
    return {
        "Bucket": bucket,
        "Key": entry["Key"],
        "VersionId": entry.get("VersionId"),
        "IsLatest": entry.get("IsLatest", True),
        "IsDeleteMarker": False,
        "Size": entry.get("Size"),
        "LastModifiedDate": entry["LastModified"],
        "ETag": entry["ETag"].strip('"') if "ETag" in entry else None,
        "StorageClass": entry.get("StorageClass", "STANDARD"),
    }


def _csv_field(name: str, value) -> str:
    """A value as AWS's CSV inventory writes it."""
    if value is None:
        return ""
    if name == "Key":  # form encoding: a space is '+', a '+' is %2B; '/' is left as it is
        return quote_plus(value, safe="/")
    if isinstance(value, bool):
        return "true" if value else "false"
    if name == "LastModifiedDate":
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    return str(value)


def _csv_file(rows: list[dict], schema: str) -> bytes:
    names = [n.strip() for n in schema.split(",")]
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")  # no header row
    for row in rows:
        writer.writerow([_csv_field(name, row[name]) for name in names])
    return gzip.compress(text.getvalue().encode("utf-8"))


def _parquet_file(rows: list[dict], schema: str) -> bytes:
    types = {"Size": pa.int64(), "LastModifiedDate": pa.timestamp("ms", "UTC")}
    types |= {"IsLatest": pa.bool_(), "IsDeleteMarker": pa.bool_()}
    names = [n.strip() for n in schema.split(",")]
    table = pa.table(
        {PARQUET_NAMES[n]: pa.array([r[n] for r in rows], types.get(n, pa.string())) for n in names}
    )
    out = io.BytesIO()
    pq.write_table(table, out, compression="snappy")
    return out.getvalue()


def _report(client, bucket: str, config: str, rows: list[dict], file_format="CSV", schema=CSV_SCHEMA) -> str:
    """Write an inventory report of rows (in two data files) and return its manifest.json's URI."""
    base = f"inventory/{bucket}/{config}"
    files = []
    for i, part in enumerate((rows[: len(rows) // 2], rows[len(rows) // 2 :])):
        if file_format == "CSV":
            key, body = f"{base}/data/part-{i}.csv.gz", _csv_file(part, schema)
        else:
            key, body = f"{base}/data/part-{i}.parquet", _parquet_file(part, schema)
        _put(client, key, body)
        files.append({"key": key, "size": len(body), "MD5checksum": "not checked"})
    if file_format == "Parquet":  # a schema string that only AWS's tools read
        schema = (
            "message s3.inventory { " + "; ".join(PARQUET_NAMES[n.strip()] for n in schema.split(",")) + "; }"
        )
    manifest = {
        "sourceBucket": bucket,
        "destinationBucket": f"arn:aws:s3:::{DEST}",
        "version": "2016-11-30",
        "creationTimestamp": "1796083200000",
        "fileFormat": file_format,
        "fileSchema": schema,
        "files": files,
    }
    key = f"{base}/{STAMP}/manifest.json"
    _put(client, key, json.dumps(manifest, indent=4).encode())
    return f"s3://{DEST}/{key}"


def _expected(bucket: str) -> list[str]:
    """What s3fs lists for the bucket (its current objects), less the skipped files and the
    folder marker (s3fs lists `dir/` as a file of 0 bytes; it is no image)."""
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    skipped = {f"{bucket}/{key}" for key in SKIPPED}
    found = fs.find(bucket)
    assert f"{bucket}/dir/" in found
    return sorted(f"s3://{p}" for p in found if p not in skipped and not p.endswith("/"))


def _check_rows(manifest: pa.Table, bucket: str) -> None:
    """The manifest is the bucket's listing less the skipped, with sizes, ETags and dates as
    the store gives them."""
    uris = manifest.column("uri").to_pylist()
    assert uris == _expected(bucket)
    assert {f"s3://{bucket}/photos/{name}" for name in ("cat 1.jpg", "a+b.png", "café ü.jpg")} <= set(uris)
    fs = s3fs.S3FileSystem()
    for row in manifest.to_pylist():
        info = fs.info(row["uri"])
        assert (row["source_size"], row["etag"]) == (info["size"], info["ETag"].strip('"')), row
        assert row["mtime"] == info["LastModified"].timestamp(), row


def test_a_csv_inventory_lists_the_bucket(store):
    uri = _report(store, "tagpipe-inventory-src", "csv-config", _current_rows(store, "tagpipe-inventory-src"))
    written = b"".join(
        gzip.decompress(
            s3fs.S3FileSystem().cat_file(f"{DEST}/inventory/tagpipe-inventory-src/csv-config/data/{name}")
        )
        for name in ("part-0.csv.gz", "part-1.csv.gz")
    )
    for encoded in (
        b'"photos/cat+1.jpg"',
        b'"photos/a%2Bb.png"',
        b'"photos/caf%C3%A9+%C3%BC.jpg"',
        b"100%25+sure",
    ):
        assert encoded in written  # as AWS writes them, so the decoding is what is tested
    listing = build_manifest([uri], parallel=False)
    _check_rows(listing.manifest, "tagpipe-inventory-src")
    assert listing.skipped == {"sidecar": 1, "os_debris": 1}
    assert listing.skipped_examples == {
        reason: [f"s3://tagpipe-inventory-src/{key}"] for key, reason in SKIPPED.items()
    }


def test_a_parquet_inventory_lists_the_bucket(store):
    rows = _current_rows(store, "tagpipe-inventory-src")
    uri = _report(store, "tagpipe-inventory-src", "parquet-config", rows, "Parquet")
    listing = build_manifest([uri], parallel=False)
    _check_rows(listing.manifest, "tagpipe-inventory-src")
    assert listing.skipped == {"sidecar": 1, "os_debris": 1}


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
def test_an_all_versions_inventory_gives_current_objects_only(store, file_format):
    bucket = f"tagpipe-inventory-versioned-{file_format.lower()}"
    store.create_bucket(Bucket=bucket)
    store.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    store.put_object(Bucket=bucket, Key="photos/cat 1.jpg", Body=b"old")  # then overwritten by _fill
    store.put_object(Bucket=bucket, Key="photos/gone.jpg", Body=b"gone")
    store.delete_object(Bucket=bucket, Key="photos/gone.jpg")  # a delete marker, latest
    _fill(store, bucket)
    rows = _all_version_rows(store, bucket)
    assert sum(r["IsDeleteMarker"] for r in rows) == 1 and sum(not r["IsLatest"] for r in rows) == 2
    uri = _report(store, bucket, "all-versions", rows, file_format, VERSIONED_CSV_SCHEMA)
    listing = build_manifest([uri], parallel=False)
    _check_rows(listing.manifest, bucket)
    assert f"s3://{bucket}/photos/gone.jpg" not in listing.manifest.column("uri").to_pylist()
    assert listing.skipped == {"sidecar": 1, "os_debris": 1}


def test_the_listing_rules_apply(store):
    bucket = "tagpipe-inventory-src"
    uri = _report(store, bucket, "rules-config", _current_rows(store, bucket))
    pngs = build_manifest([uri], rules=ListingRules(extensions=frozenset({"png"})), parallel=False)
    assert pngs.manifest.column("uri").to_pylist() == [
        f"s3://{bucket}/photos/100% sure.png",
        f"s3://{bucket}/photos/a+b.png",
    ]
    assert pngs.skipped == {"extension": 4, "os_debris": 1}
    captions = build_manifest([uri], rules=ListingRules(skip_sidecars=False), parallel=False)
    assert f"s3://{bucket}/photos/cat 1.txt" in captions.manifest.column("uri").to_pylist()
    outside = build_manifest([uri], rules=ListingRules(excluded=(f"{bucket}/photos",)), parallel=False)
    assert outside.manifest.column("uri").to_pylist() == [f"s3://{bucket}/top.jpg"]
    assert outside.skipped == {"tagpipe_output": 5, "os_debris": 1}  # debris is named first


def test_a_downloaded_report_reads_the_same(store, tmp_path):
    bucket = "tagpipe-inventory-src"
    uri = _report(store, bucket, "copied-config", _current_rows(store, bucket))
    from_s3 = build_manifest([uri], parallel=False)
    s3fs.S3FileSystem().get(f"{DEST}/inventory/{bucket}/copied-config/", str(tmp_path), recursive=True)
    manifest = tmp_path / STAMP / "manifest.json"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["part-0.csv.gz", "part-1.csv.gz"]
    local = build_manifest([str(manifest)], parallel=False)  # AWS's layout: <stamp>/../data/
    assert local.manifest.equals(from_s3.manifest) and local.skipped == from_s3.skipped
    # no LIST reaches the bucket: one object is read first, so a store it cannot reach stops
    # the listing, not every image's read later
    with pytest.raises(Exception, match="127.0.0.1:9"):
        build_manifest([str(manifest)], {"endpoint_url": "http://127.0.0.1:9"}, parallel=False)
    shutil.move(tmp_path / "data", tmp_path / STAMP / "data")  # or the files beside manifest.json
    assert build_manifest([str(manifest)], parallel=False).manifest.equals(from_s3.manifest)
    (tmp_path / STAMP / "data" / "part-1.csv.gz").unlink()
    with pytest.raises(ConfigError) as missing:
        build_manifest([str(manifest)], parallel=False)
    message = str(missing.value)
    assert "\n" not in message and str(manifest) in message
    assert str(tmp_path / "data" / "part-1.csv.gz") in message
    assert str(tmp_path / STAMP / "data" / "part-1.csv.gz") in message


GOOD = {
    "sourceBucket": "tagpipe-inventory-src",
    "destinationBucket": f"arn:aws:s3:::{DEST}",
    "fileFormat": "CSV",
    "fileSchema": CSV_SCHEMA,
    "files": [],
}


@pytest.mark.parametrize(
    "body, words",
    [
        (json.dumps({**GOOD, "fileFormat": "ORC"}), ["ORC", "CSV or Parquet"]),
        (b"{not json", ["not JSON"]),
        (json.dumps({k: v for k, v in GOOD.items() if k != "files"}), ["'files'"]),
        (json.dumps({k: v for k, v in GOOD.items() if k != "fileSchema"}), ["'fileSchema'"]),
        (json.dumps({**GOOD, "fileSchema": "Bucket, Size"}), ["'Key'"]),
        (json.dumps({**GOOD, "files": [{"size": 1}]}), ["'files'"]),
    ],
    ids=["orc", "not-json", "no-files", "no-schema", "no-key-column", "file-without-key"],
)
def test_a_report_tagpipe_cannot_read_is_a_one_line_config_error(store, body, words, request):
    key = f"inventory/tagpipe-inventory-src/{request.node.callspec.id}/{STAMP}/manifest.json"
    _put(store, key, body)
    with pytest.raises(ConfigError) as refused:
        build_manifest([f"s3://{DEST}/{key}"], parallel=False)
    message = str(refused.value)
    assert "\n" not in message and f"s3://{DEST}/{key}" in message
    for word in words:
        assert word in message


def _rows_one_by_one(batch: pa.Table, url_encoded: bool, rules: ListingRules) -> tuple[list, list]:
    """The oracle: what a data file's rows give, a row at a time in Python (the reader's
    rules before it was vectorised): current objects, keys decoded, the rules asked."""
    from urllib.parse import unquote_plus

    rows, skipped = [], []
    for row in batch.to_pylist():
        latest = row.get("IsLatest") in (True, "true", None)
        if not latest or row.get("IsDeleteMarker") in (True, "true"):
            continue
        key = unquote_plus(row["Key"]) if url_encoded else row["Key"]
        reason = rules.skip_reason(f"{row['Bucket']}/", f"{row['Bucket']}/{key}")
        if key.endswith("/"):
            continue
        if reason:
            skipped.append((reason, f"s3://{row['Bucket']}/{key}"))
        else:
            rows.append((f"s3://{row['Bucket']}/{key}", int(row["Size"]), row["ETag"].strip('"')))
    return rows, skipped


@pytest.mark.parametrize("url_encoded", [True, False], ids=["csv", "parquet"])
def test_rows_read_a_batch_at_a_time_are_those_read_one_by_one(url_encoded):
    """Generated keys with every odd case an inventory carries (form encoding, %XX at a
    key's end or before a non-hex digit, invalid UTF-8, folder markers, debris, sidecars,
    other extensions, delete markers, old versions) give the rows and skipped files the
    row-by-row reader gave, in order."""
    from pipeline.storage.inventory import _rows

    odd = ["a+b.jpg", "a%2Bb.jpg", "caf%C3%A9+%C3%BC.jpg", "100%25+sure.png", "x%4", "x%4g.jpg", "%%41.jpg",
           "%2541.jpg", "%E2%82%AC%", "bad%FF.jpg", "dir/", "d/.DS_Store", "d/Thumbs.db", "d/cap.txt",
           "d/.hidden/x.jpg", "a.webp", "\u00fcber.jpg", "d/@eaDir/x.jpg", "e%2F.jpg"]  # fmt: skip
    keys = [*odd * 6, *(f"k/{i:05d}.jpg" for i in range(300))]
    keys = [keys[i] for i in np.random.default_rng(0).permutation(len(keys))]
    if not url_encoded:  # Parquet keys are plain: '%' and '+' are themselves
        keys = [k.replace("%FF", "\u00ff") for k in keys]
    n = len(keys)
    batch = pa.table(
        {
            "Bucket": ["src"] * n,
            "Key": keys,
            "Size": [str(i) for i in range(n)],
            "ETag": [f'"e{i}"' for i in range(n)],
            "IsLatest": [["true", "false", None][i % 7 % 3] for i in range(n)],
            "IsDeleteMarker": [["false", "true"][i % 11 == 0] for i in range(n)],
        }
    )
    for rules in (ListingRules(), ListingRules(extensions=frozenset({"jpg"}))):
        skipped: list = []
        got = _rows(batch, url_encoded, rules, skipped)
        rows = list(zip(*(got[c].to_pylist() for c in ("uri", "source_size", "etag")), strict=True))
        assert (rows, skipped) == _rows_one_by_one(batch, url_encoded, rules)
        assert len(rows) > 100 and len(skipped) > 5
    from urllib.parse import unquote_plus

    from pipeline.storage.inventory import unquote_plus_keys

    touching = ["x%4", "1%20.jpg", "y%", "41%20.jpg", "%E2%82%AC", "z%2"]  # an escape never spans two keys
    assert unquote_plus_keys(pa.array(touching)).to_pylist() == [unquote_plus(k) for k in touching]
