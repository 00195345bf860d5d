"""`tagpipe review` over a large synthetic tag table: time and peak memory per queue kind.

    python benchmarks/review_scale.py                  # 1M rows
    python benchmarks/review_scale.py --rows 10000000

Writes a committed tag table (parts of 100k rows) with the columns the queues read: the
label-check columns (issue 25: 10 source tags, 0-3 likely_wrong and 0-3 likely_missing
per row with their scores, label_quality), 30 stored logits per row over the demo
model's 256-tag vocabulary, OOD distances, 0.5% error rows. Then runs each kind
(--limit 200) in a fresh process and prints its time and peak resident size. The uris name
no files, so the page's thumbnails are left out (each is one bounded read of an image).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PART_ROWS = 100_000
KINDS = ("likely-wrong", "likely-missing", "uncertain", "ood")


def _lists(rng, n: int, low: int, high: int, values) -> tuple[np.ndarray, pa.ListArray]:
    counts = rng.integers(low, high + 1, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return offsets, pa.ListArray.from_arrays(offsets, values(int(offsets[-1])))


def make_table(root: Path, rows: int, model_sha256: str, vocabulary: int, seed: int = 0) -> None:
    from pipeline.table.tag_table import TagTable, commit_version

    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    names = pa.array([f"tag_{i:05d}" for i in range(20_000)])
    table = TagTable(str(root))
    files = []
    for start in range(0, rows, PART_ROWS):
        n = min(PART_ROWS, rows - start)
        error = rng.random(n) < 0.005
        tags = lambda k: pc.take(names, np.minimum(rng.zipf(1.3, k) - 1, 19_999))  # noqa: E731
        columns = {
            "uri": pa.array([f"/nonexistent/images/{start + i:09d}.jpg" for i in range(n)]),
            "error": pa.array(
                np.where(error, "OSError: cannot identify image file", None).tolist(), pa.string()
            ),
            "model_sha256": pa.array([model_sha256] * n),
            "tags": _lists(rng, n, 10, 30, tags)[1],
            "source_tags": _lists(rng, n, 5, 15, tags)[1],
        }
        for name, low, high in (("likely_wrong", 0.0, 0.1), ("likely_missing", 0.9, 1.0)):
            offsets, listed = _lists(rng, n, 0, 3, tags)
            columns[name] = listed
            scores = rng.uniform(low, high, offsets[-1]).astype(np.float32)
            columns[f"{name}_scores"] = pa.ListArray.from_arrays(offsets, pa.array(scores))
        columns["label_quality"] = pa.array(rng.uniform(0, 1, n).astype(np.float32))
        offsets, indices = _lists(
            rng, n, 30, 30, lambda k: pa.array(rng.integers(0, vocabulary, k), pa.int32())
        )
        values = rng.normal(-1.0, 1.5, offsets[-1]).astype(np.float16)
        columns["logit_indices"] = indices
        columns["logit_values"] = pa.ListArray.from_arrays(offsets, pa.array(values))
        columns["ood_distance"] = pa.array(rng.gamma(9.0, 0.3, n).astype(np.float32))
        columns["ood"] = pc.greater(columns["ood_distance"], 4.5)
        files.append(table.write_part(f"data/bench/part-{start // PART_ROWS:05d}.parquet", pa.table(columns)))
    commit_version(
        table, None, files, model_sha256=model_sha256, inference_key="bench", rules_key="bench",
        run_id="bench", model_name="demo",
    )  # fmt: skip


def run_kind(tags: str, kind: str, model: str, out: Path) -> dict:
    """One kind in a fresh process: its result, and its resident size after the imports and
    at its peak while the queue is made (memory.PeakSampler, sampled in that process)."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from memory import PeakSampler, rss_mib\n"
        "from pipeline.corpus.review import ReviewSettings, run_review\n"
        "import pipeline.model.bundle  # imported before the baseline: uncertain needs it\n"
        "base = rss_mib()\n"
        "with PeakSampler() as peak:\n"
        f"    s = run_review(ReviewSettings(tags={tags!r}, kind={kind!r}, model={model!r}, out={str(out)!r}, "
        "overwrite=True))\n"
        "print(json.dumps({'queued': s.queued, 'rows': s.rows, 'seconds': s.seconds, "
        "'rss_after_imports_mib': round(base), 'peak_mib': round(peak.peak)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", default="/tmp/tagpipe-review-bench")
    args = parser.parse_args()
    from pipeline.demo.model import write_demo_bundle
    from pipeline.model.bundle import load_bundle

    work = Path(args.workdir)
    model = write_demo_bundle(work / "model")
    bundle = load_bundle(model)
    started = time.monotonic()
    make_table(work / "tags", args.rows, bundle.fingerprint.model_sha256, len(bundle.vocabulary))
    print(f"table: {args.rows:,} rows in {time.monotonic() - started:.1f} s")
    for kind in KINDS:
        result = run_kind(str(work / "tags"), kind, str(model), work / f"{kind}.jsonl")
        print(json.dumps({"kind": kind, **result}))


if __name__ == "__main__":
    main()
