"""`tagpipe report` on a large synthetic tag table: time, peak memory, page size.

    python benchmarks/report.py                 # 1M rows (issue 12: < 60 s, < 2 GiB)
    python benchmarks/report.py --rows 10000000

Writes a committed tag table (pipeline/table/tag_table.py) of `--rows` rows in parts of 100k, with
the columns a real run has: ~30 tags per row from a Zipf-distributed 20k vocabulary in
five categories, their scores, OOD distances, 0.5% error rows. Then builds the report
in a fresh process and prints its wall time and peak RSS against the targets.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PART_ROWS = 100_000
CATEGORIES = ["general", "character", "copyright", "artist", "meta"]


def make_table(root: Path, rows: int, seed: int = 0, part_rows: int = PART_ROWS) -> None:
    from pipeline.table.tag_table import Snapshot, TagTable, now_iso
    from pipeline.table.version_fields import RulesRecord

    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    vocab = pa.array([f"tag_{i:05d}" for i in range(20_000)])
    category_of = np.arange(20_000) % len(CATEGORIES)
    table = TagTable(str(root))
    files = []
    for start in range(0, rows, part_rows):
        n = min(part_rows, rows - start)
        per_row = rng.integers(10, 50, n)
        offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
        index = np.minimum(rng.zipf(1.3, offsets[-1]) - 1, 19_999)
        scores = rng.uniform(0.35, 1.0, offsets[-1]).astype(np.float32)
        error = rng.random(n) < 0.005
        columns = {
            "uri": pa.array([f"s3://corpus/images/{start + i:09d}.jpg" for i in range(n)]),
            "error": pa.array(
                np.where(error, "OSError: cannot identify image file", None).tolist(), pa.string()
            ),
            "error_kind": pa.array(np.where(error, "not_an_image", None).tolist(), pa.string()),
            "tags": pa.ListArray.from_arrays(offsets, pc.take(vocab, index)),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(scores)),
            "ood_distance": pa.array(rng.gamma(9.0, 0.3, n).astype(np.float32)),
        }
        columns["ood"] = pc.greater(columns["ood_distance"], 4.5)
        for c, name in enumerate(CATEGORIES):
            keep = category_of[index] == c
            counts = (
                np.add.reduceat(keep.astype(np.int32), offsets[:-1]) if len(index) else np.zeros(n, np.int32)
            )
            columns[f"tags_{name}"] = pa.ListArray.from_arrays(
                np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), pc.take(vocab, index[keep])
            )
        file = f"data/bench/part-{start // part_rows:05d}.parquet"
        table.write_part(file, pa.table(columns))
        files.append(file)
    snapshot = Snapshot(
        version=1,
        files=tuple(files),
        rows=rows,
        model_sha256="0" * 64,
        inference_key="bench",
        rules_key="bench",
        run_id="bench",
        committed_at=now_iso(),
        model_name="synthetic",
        rules=RulesRecord(default_threshold=0.5),
    )
    table.commit(None, snapshot)


def measure(root: Path, output: Path) -> dict:
    """build_report in a fresh process: (seconds, peak RSS)."""
    code = (
        "import json, resource, sys, time\n"
        "from pipeline.corpus.report import build_report\n"
        "t = time.perf_counter()\n"
        "s = build_report(sys.argv[1], sys.argv[2])\n"
        "print(json.dumps({'seconds': time.perf_counter() - t, "
        "'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
        "'bytes': s.bytes, 'rows': s.rows}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(root), str(output)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", default="/tmp/tagpipe-bench-report")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    started = time.perf_counter()
    make_table(work / "tags", args.rows)
    made = time.perf_counter() - started
    result = measure(work / "tags", work / "report.html")
    print(
        f"synthetic table: {args.rows:,} rows written in {made:.1f} s (peak RSS of this process "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)"
    )
    print("| rows | build time | target | peak RSS | target | page size |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {result['rows']:,} | {result['seconds']:.1f} s | 60 s ({result['seconds'] / 60:.0%}) | "
        f"{result['peak_rss_mib']:.0f} MiB | 2048 MiB ({result['peak_rss_mib'] / 2048:.0%}) | "
        f"{result['bytes'] / 1024:.0f} KiB |"
    )
    return result


if __name__ == "__main__":
    main()
