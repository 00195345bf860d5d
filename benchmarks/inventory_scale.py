"""Reading an S3 Inventory report of 10M rows, CSV.gz and Parquet, from local disk.

    python benchmarks/inventory_scale.py [--rows 10000000] [--formats csv,parquet]
                                         [--files 10] [--before] [--workdir DIR]

Writes a report as AWS lays out a downloaded one (STAMP/manifest.json, data/part-*.csv.gz
or .parquet) with the versioned schema (IsLatest, IsDeleteMarker), then times
read_inventory (pipeline/storage/inventory.py) with the default listing rules in a fresh
subprocess per format: every row read, filtered and turned into a manifest row. The rows:
`photos/NNNNN/imgNNNNNNNN.jpg`, 1,000 a folder; 2% with a space, a '+', a '%' or an 'é' in
the name (URL-encoded in CSV, as AWS writes it); 1% caption sidecars (.txt); 0.1% folder
markers; 2% old versions and 1% delete markers. Target (issue 34): <= 60 s for 10M rows.
"CPU s" is the reading process's CPU time (all its threads): on a shared machine, wall
seconds grow with the load and CPU seconds far less.

--before also times the row-by-row reader this replaced (a copy of its per-row step, kept
here as it was) on the same files, side by side.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote_plus

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from memory import PeakSampler, in_subprocess, rss_mib  # benchmarks/memory.py, beside this script

from pipeline.core.schemas import MANIFEST_SCHEMA
from pipeline.storage import inventory
from pipeline.storage.manifest import ListingRules, Skipped

CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
SNAKE = {"Bucket": "bucket", "Key": "key", "VersionId": "version_id", "IsLatest": "is_latest",
         "IsDeleteMarker": "is_delete_marker", "Size": "size", "LastModifiedDate": "last_modified_date",
         "ETag": "e_tag", "StorageClass": "storage_class"}  # fmt: skip


def _keys(start: int, rows: int) -> pa.Array:
    """Plain keys (not encoded), a few with awkward names, sidecars and folder markers."""
    i = np.arange(start, start + rows)
    number = pc.utf8_lpad(pa.array(i).cast(pa.string()), 8, "0")
    folder = pc.utf8_lpad(pa.array(i // 1000).cast(pa.string()), 5, "0")
    stem = pc.binary_join_element_wise("photos/", folder, "/img", number, "")
    odd = np.array(["", " cat", "+b", " 100%", " café"], object)[np.where(i % 50 == 7, i // 50 % 4 + 1, 0)]
    ext = np.where(i % 100 == 3, ".txt", ".jpg")
    keys = pc.binary_join_element_wise(stem, pa.array(odd, pa.string()), pa.array(ext), "")
    return pc.if_else(pa.array(i % 1000 == 999), pc.binary_join_element_wise(folder, "/", ""), keys)


def _encoded(keys: pa.Array) -> pa.Array:
    """Form encoding, as AWS's CSV writes keys ('/' left as it is)."""
    for plain, code in (("%", "%25"), ("+", "%2B"), (" ", "+"), ("é", "%C3%A9")):
        keys = pc.replace_substring(keys, plain, code)
    return keys


def _batch(start: int, rows: int) -> pa.Table:
    i = np.arange(start, start + rows)
    return pa.table(
        {
            "Bucket": pa.array(np.full(rows, "src-bucket", object), pa.string()),
            "Key": _keys(start, rows),
            "VersionId": pc.cast(pa.array(i), pa.string()),
            "IsLatest": pa.array(i % 50 != 11),
            "IsDeleteMarker": pa.array(i % 100 == 13),
            "Size": pa.array(1000 + i % 7919),
            "LastModifiedDate": pa.array(1_780_000_000_000 + i, pa.timestamp("ms", "UTC")),
            "ETag": pc.binary_join_element_wise("e", pc.cast(pa.array(i % 65536), pa.string()), ""),
            "StorageClass": pa.array(np.full(rows, "STANDARD", object), pa.string()),
        }
    )


def write_report(rows: int, file_format: str, files: int, root: Path) -> str:
    (root / "data").mkdir(parents=True)
    (root / "STAMP").mkdir()
    entries = []
    for index, start in enumerate(range(0, rows, -(-rows // files))):
        batch = _batch(start, min(-(-rows // files), rows - start))
        if file_format == "csv":
            name = root / "data" / f"part-{index}.csv.gz"
            batch = batch.set_column(1, "Key", _encoded(batch["Key"].combine_chunks()))
            stamps = pc.strftime(batch["LastModifiedDate"], "%Y-%m-%dT%H:%M:%SZ")
            batch = batch.set_column(6, "LastModifiedDate", stamps)
            with pa.CompressedOutputStream(str(name), "gzip") as out:
                pacsv.write_csv(
                    batch, out, pacsv.WriteOptions(include_header=False, quoting_style="all_valid")
                )
        else:
            name = root / "data" / f"part-{index}.parquet"
            pq.write_table(batch.rename_columns([SNAKE[n] for n in batch.column_names]), name)
        entries.append({"key": f"inventory/data/{name.name}", "size": name.stat().st_size})
    report = {"sourceBucket": "src-bucket", "destinationBucket": "arn:aws:s3:::dest", "version": "2016-11-30",
              "fileFormat": "CSV" if file_format == "csv" else "Parquet", "fileSchema": CSV_SCHEMA,
              "files": entries}  # fmt: skip
    (root / "STAMP" / "manifest.json").write_text(json.dumps(report))
    return str(root / "STAMP" / "manifest.json")


def rows_one_by_one(batch: pa.Table, url_encoded: bool, rules, skipped: list) -> pa.Table:
    """The reader's per-row step before issue 34, as it was: a Python string per key."""
    batch = batch.filter(inventory._current(batch))
    keep, uris = [], []
    for i, (bucket, key) in enumerate(zip(batch["Bucket"].to_pylist(), batch["Key"].to_pylist())):
        key = unquote_plus(key) if url_encoded else key
        if key.endswith("/"):
            continue
        reason = rules.skip_reason(f"{bucket}/", f"{bucket}/{key}")
        if reason:
            skipped.append((reason, f"s3://{bucket}/{key}"))
        else:
            keep.append(i)
            uris.append(f"s3://{bucket}/{key}")
    batch = batch.take(pa.array(keep, pa.int64()))
    return pa.table(
        {"uri": pa.array(uris, pa.string()), "source_size": inventory._column(batch, "Size", pa.int64()),
         "etag": pc.utf8_trim(inventory._column(batch, "ETag", pa.string()), '"'),
         "mtime": inventory._mtime(batch)}, schema=MANIFEST_SCHEMA,
    )  # fmt: skip


def read_once(manifest: str, before: bool) -> dict:
    if before:
        inventory._rows = rows_one_by_one
    skipped, rss_before = Skipped(), rss_mib()
    started, cpu = time.perf_counter(), time.process_time()
    with PeakSampler() as sampler:
        table = inventory.read_inventory(manifest, None, ListingRules(), skipped.add)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    distinct = pc.count_distinct(table["uri"]).as_py()
    return {"seconds": seconds, "cpu_s": cpu, "rows": table.num_rows, "skipped": dict(skipped.counts),
            "peak_mib": sampler.peak - rss_before, "uris": distinct}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--formats", default="csv,parquet")
    parser.add_argument("--files", type=int, default=10, help="data files in the report")
    parser.add_argument("--before", action="store_true", help="also time the row-by-row reader")
    parser.add_argument("--workdir", default=None, help="where the reports are written (default: temp dir)")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(read_once(args.one[0], args.one[1] == "before")))
        return
    print(f"S3 Inventory of {args.rows:,} rows in {args.files} data files; target <= 60 s (issue 34)")
    print("format   reader                write s  read s  CPU s    rows/s  manifest rows  "
          "skipped            peak MiB")  # fmt: skip
    for file_format in args.formats.split(","):
        with tempfile.TemporaryDirectory(dir=args.workdir) as root:
            started = time.perf_counter()
            manifest = write_report(args.rows, file_format, args.files, Path(root))
            written = time.perf_counter() - started
            for reader in ["vectorised", *(["row by row (before)"] if args.before else [])]:
                r = in_subprocess(__file__, manifest, "before" if reader.startswith("row") else "after")
                assert r["uris"] == r["rows"]
                skipped = ", ".join(f"{n:,} {k}" for k, n in sorted(r["skipped"].items()))
                print(f"{file_format:8} {reader:20} {written:8.1f} {r['seconds']:7.1f} {r['cpu_s']:5.1f} "
                      f"{args.rows / r['seconds']:9,.0f}  {r['rows']:13,}  {skipped:18} "
                      f"{r['peak_mib']:8,.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
