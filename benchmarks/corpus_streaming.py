"""Export and split at 1M rows (issue 31): the code before and after, side by side in one run.

    python benchmarks/corpus_streaming.py                       # 1M rows, and 100k for the old code
    python benchmarks/corpus_streaming.py --rows 200000 --small-rows 50000

Writes a committed tag table through the table API (TagTable.write_part, commit_version)
in the part schema (tag_row_schema + part_schema): parts of 4096 rows (rows_per_part's
default), each cut from the sorted listing with its rows in any order, as a first run
writes them; 20-40 tags a row from a 5,000-tag vocabulary in five categories, with
scores (by score), rating, sizes, hashes, 30 stored logits, and a 1152-wide float16
embedding (2.3 GB at 1M rows: a read of it shows in memory); 0.5% error rows. A
clusters.parquet beside it: 1% of the images in clusters of 2-5 copies.

Each measurement runs in a fresh process, so its peak RSS is its own (wait4's
ru_maxrss). The old code is the modules at --old-rev (the commit before this work), from
`git show` into a temporary folder; the new code is this checkout. A watchdog kills a
run past --rss-limit-gib (the old export turns every embedding into Python floats: a 1M
table does not fit in 24 GiB), reported as killed. At --small-rows both run to the end.
Last, a later run's parts are added with uris between the first run's (the export's
bucket path), and the new JSONL export measured on that version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PART_ROWS = 4096
VOCAB = 5000
WIDTH = 1152
CATEGORIES = ["general", "character", "copyright", "artist", "meta"]
CATEGORY_SHARE = [0.80, 0.08, 0.05, 0.05, 0.02]
OLD_REV = "aa3723e8caca1fee97c4ac721a71bedcc4b0c369"  # main before issue 31's streaming export/split


def uri_of(i: int, suffix: str = "") -> str:
    return f"s3://corpus/images/{i // 1000:04d}/{i:09d}{suffix}.jpg"


def tag_lists(rng, n: int, vocab: pa.Array, category: np.ndarray) -> dict[str, pa.Array]:
    """tags (distinct in a row: a start drawn by popularity, then a stride prime to the
    vocabulary), their scores by score, and the tags_<category> lists."""
    count = rng.integers(20, 41, n)
    offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int32)
    start = np.minimum(rng.zipf(1.3, n) - 1, VOCAB - 1)
    step = rng.choice([s for s in range(1, 400, 2) if s % 5], n)
    k = np.arange(offsets[-1]) - np.repeat(offsets[:-1], count)
    codes = (np.repeat(start, count) + k * np.repeat(step, count)) % VOCAB
    scores = np.sort(rng.uniform(0.35, 1.0, offsets[-1]).astype(np.float32))[::-1].copy()
    out = {
        "tags": pa.ListArray.from_arrays(offsets, vocab.take(pa.array(codes))),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(scores)),
        "logit_indices": pa.ListArray.from_arrays(offsets, pa.array(codes.astype(np.int32))),
        "logit_values": pa.ListArray.from_arrays(offsets, pa.array(scores.astype(np.float16))),
    }
    for c, name in enumerate(CATEGORIES):
        keep = category[codes] == c
        kept = np.concatenate([[0], np.cumsum(np.add.reduceat(keep.astype(np.int32), offsets[:-1]))])
        out[f"tags_{name}"] = pa.ListArray.from_arrays(
            kept.astype(np.int32), vocab.take(pa.array(codes[keep]))
        )
    return out


def part(
    rng, numbers: np.ndarray, vocab: pa.Array, category: np.ndarray, schema, suffix: str = ""
) -> pa.Table:
    """Rows for these image numbers, in the order given, in the part schema."""
    n = len(numbers)
    error = rng.random(n) < 0.005
    sha = [hashlib.sha256(f"{i}{suffix}".encode()).hexdigest() for i in numbers.tolist()]
    phash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    columns = tag_lists(rng, n, vocab, category)
    for name in ("tags", *(f"tags_{c}" for c in CATEGORIES), "scores"):
        columns[name] = pa.ListArray.from_arrays(
            columns[name].offsets, columns[name].values, mask=pa.array(error)
        )
    columns |= {
        "uri": pa.array([uri_of(i, suffix) for i in numbers.tolist()]),
        "sha256": pa.array(sha),
        "size": pa.array(rng.integers(50_000, 5_000_000, n)),
        "width": pa.array(rng.integers(512, 4096, n).astype(np.int32)),
        "height": pa.array(rng.integers(512, 4096, n).astype(np.int32)),
        "phash": pa.array(phash),
        "phash_hex": pa.array([f"{h:016x}" for h in phash.tolist()]),
        "phash_degenerate": pa.array(rng.random(n) < 0.01),
        "error": pa.array(np.where(error, "OSError: cannot identify image file", None).tolist(), pa.string()),
        "error_kind": pa.array(np.where(error, "not_an_image", None).tolist(), pa.string()),
        "model_name": pa.array(["bench-tagger"] * n),
        "model_sha256": pa.array(["0" * 64] * n),
        "rating": pa.array(rng.choice(["general", "sensitive", "questionable", "explicit"], n)),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(rng.standard_normal(n * WIDTH, np.float32).astype(np.float16)), WIDTH
        ),
        "ood_distance": pa.array(rng.gamma(9.0, 0.3, n).astype(np.float32)),
        "run_id": pa.array(["bench"] * n),
        "source_size": pa.array(rng.integers(50_000, 5_000_000, n)),
        "etag": pa.array(sha),
    }
    return pa.table([columns.get(f.name, pa.nulls(n, f.type)).cast(f.type) for f in schema], schema=schema)


def make_table(root: Path, rows: int, seed: int = 0) -> str:
    """Version 1 of a tag table: the first run's parts, each a range of the sorted listing."""
    from pipeline.core.schemas import part_schema, tag_row_schema
    from pipeline.table.tag_table import TagTable

    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    vocab = pa.array([f"tag_{i:04d}_name" for i in range(VOCAB)])
    category = rng.choice(len(CATEGORIES), VOCAB, p=CATEGORY_SHARE)
    schema = part_schema(tag_row_schema(CATEGORIES, WIDTH))
    table, files = TagTable(str(root)), []
    for start in range(0, rows, PART_ROWS):
        numbers = rng.permutation(np.arange(start, min(start + PART_ROWS, rows)))
        file = f"data/bench/part-{hashlib.sha1(str(start).encode()).hexdigest()[:12]}.parquet"
        files.append(table.write_part(file, part(rng, numbers, vocab, category, schema)))
    commit(table, None, files, "bench")
    return str(root)


def grow_table(root: str, rows: int, new_rows: int, seed: int = 1) -> None:
    """Version 2: a later run's parts, their images' uris between the first run's."""
    from pipeline.core.schemas import part_schema, tag_row_schema
    from pipeline.table.tag_table import TagTable

    rng = np.random.default_rng(seed)
    vocab = pa.array([f"tag_{i:04d}_name" for i in range(VOCAB)])
    category = rng.choice(len(CATEGORIES), VOCAB, p=CATEGORY_SHARE)
    schema = part_schema(tag_row_schema(CATEGORIES, WIDTH))
    table = TagTable(root)
    numbers = np.sort(rng.choice(rows, new_rows, replace=False))
    files = list(table.snapshot().files)
    for start in range(0, new_rows, PART_ROWS):
        rows_here = numbers[start : start + PART_ROWS]
        file = f"data/bench2/part-{start // PART_ROWS:05d}.parquet"
        files.append(table.write_part(file, part(rng, rows_here, vocab, category, schema, suffix="-new")))
    commit(table, table.current(), files, "bench2")


def commit(table, base, files: list[str], run_id: str) -> None:
    from pipeline.table.tag_table import commit_version

    commit_version(table, base, files, model_sha256="0" * 64, inference_key="bench", rules_key="bench",
                   run_id=run_id, model_name="bench-tagger",)  # fmt: skip


def make_clusters(tags: str, path: Path, seed: int = 0) -> None:
    """clusters.parquet for the images without errors: 1% in clusters of 2-5, the rest alone;
    a cluster's id is its smallest sha256 (dedup's rule)."""
    from pipeline.core.schemas import CLUSTERS_SCHEMA
    from pipeline.table.reading import read_parquet

    rng = np.random.default_rng(seed)
    table = read_parquet(tags, columns=["uri", "sha256", "phash", "error"])
    table = table.filter(pc.is_null(table.column("error"))).sort_by("uri")
    n, sha = table.num_rows, np.array(table.column("sha256").to_pylist(), dtype=object)
    label, size = np.arange(n), np.ones(n, np.int64)
    members = rng.permutation(n)[: n // 100]
    sizes = rng.integers(2, 6, len(members))
    edges = np.concatenate([[0], np.cumsum(sizes)])
    edges = edges[edges <= len(members)]
    for a, b in zip(edges[:-1], edges[1:]):
        group = members[a:b]
        label[group], size[group] = group.min(), len(group)
    first = {}
    for i in np.argsort(sha, kind="stable"):  # smallest sha256 of each cluster names it
        first.setdefault(int(label[i]), sha[i])
    out = table.drop(["error"]).append_column("cluster_id", pa.array([first[int(x)] for x in label]))
    out = out.append_column("cluster_size", pa.array(size)).append_column(
        "is_representative", pa.array(label == np.arange(n))
    )
    pq.write_table(out.cast(CLUSTERS_SCHEMA), path)


CHILD = """
import importlib.util, json, sys, time
impl, step, tags, out, clusters = sys.argv[1:6]
def load(name):
    if impl == "new":
        return importlib.import_module(f"pipeline.corpus.{name}")
    spec = importlib.util.spec_from_file_location(f"old_{name}", f"{sys.argv[6]}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
started = time.perf_counter()
if step == "split":
    report = load("split").run_split(tags, clusters, out)
    what = {"images": report.images, "clusters": report.clusters}
else:
    summary = load("export").export_tags(tags, out, step)
    what = {"written": summary.written, "errors": summary.skipped_errors}
print(json.dumps({"seconds": time.perf_counter() - started, **what}))
"""


def measure(impl: str, step: str, tags: str, out: Path, clusters: Path, old: Path, limit_gib: float) -> dict:
    """One step in a fresh process: wall time, peak RSS (MiB), or killed past the limit."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-c", CHILD, impl, step, tags, str(out), str(clusters), str(old)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=ROOT)
        killed = threading.Event()
        threading.Thread(target=_watch, args=(child.pid, limit_gib * 2**30, killed), daemon=True).start()
        _, status, usage = os.wait4(child.pid, 0)  # the child's own peak RSS, even when killed
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        stdout.seek(0)
        stderr.seek(0)
        printed, errors = stdout.read().decode(), stderr.read().decode()
    load = os.getloadavg()[0]  # the machine is shared: the 1-minute load average as the step ends
    result = {"impl": impl, "step": step, "peak_mib": usage.ru_maxrss / 1024, "wall": wall, "load": load}
    if killed.is_set():
        return result | {"failed": f"killed past {limit_gib:g} GiB after {wall:.0f} s"}
    if child.returncode:
        return result | {"failed": (errors.strip().splitlines() or ["exit " + str(child.returncode)])[-1]}
    return result | json.loads(printed.strip().splitlines()[-1])


def _watch(pid: int, limit: float, killed: threading.Event) -> None:
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            rss = next(
                int(line.split()[1]) * 1024
                for line in status.read_text().splitlines()
                if line.startswith("VmRSS")
            )
        except (OSError, StopIteration):
            return
        if rss > limit:
            killed.set()
            os.kill(pid, 9)
            return
        time.sleep(0.05)


def old_modules(rev: str, folder: Path) -> Path:
    for name in ("export", "split"):
        source = subprocess.run(["git", "show", f"{rev}:pipeline/corpus/{name}.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
        (folder / f"{name}.py").write_text(source)
    return folder


def row(result: dict, rows: int) -> str:
    peak = f"peak {result['peak_mib']:,.0f} MiB (load {result['load']:.1f})"
    if "failed" in result:
        return f"{result['failed']}, {peak}"
    return f"{result['wall']:.1f} s ({result['wall'] / rows * 1e6:.0f} µs/row), {peak}"


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
         .stdout.splitlines() if line.startswith("Model name")),
        "?",
    )  # fmt: skip
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB"


def run_size(label: str, tags: str, rows: int, work: Path, old: Path, limit: float, steps) -> list[dict]:
    """Each step, old code then new, on one table."""
    clusters = work / f"clusters-{label}.parquet"
    print("| rows | step | old code | new code |\n| ---: | --- | --- | --- |", flush=True)
    results = []
    for step in steps:
        pair = [measure(impl, step, tags, work / f"out-{label}-{step}-{impl}", clusters, old, limit)
                for impl in ("old", "new")]  # fmt: skip
        print(f"| {rows:,} | {step} | {row(pair[0], rows)} | {row(pair[1], rows)} |", flush=True)
        results += [{"rows": rows, **r} for r in pair]
        for impl in ("old", "new"):
            shutil.rmtree(work / f"out-{label}-{step}-{impl}", ignore_errors=True)
    return results


def prepare(what: str, path: str, rows: int, grow: int = 0, tags: str = "") -> None:
    """Build inputs in a process of their own: the process that starts the measured ones
    must stay small, for a child's ru_maxrss starts at its parent's peak (Linux carries it
    over fork and exec)."""
    argv = [sys.executable, __file__, "--prepare", what, path, str(rows), str(grow), tags]
    subprocess.run(argv, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _prepare(what: str, path: str, rows: int, grow: int, tags: str) -> None:
    started = time.perf_counter()
    if what == "table":
        make_table(Path(path), rows)
    elif what == "grow":
        grow_table(path, rows, grow)
    else:
        make_clusters(tags, Path(path))
    print(f"({what} {path}: {time.perf_counter() - started:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small-rows", type=int, default=100_000, help="where the old code runs to the end")
    parser.add_argument(
        "--grow-rows", type=int, default=40_960, help="a later run's rows (0: no grown version)"
    )
    parser.add_argument("--workdir", default=f"{tempfile.gettempdir()}/tagpipe-bench-streaming")
    parser.add_argument("--rss-limit-gib", type=float, default=8.0)
    parser.add_argument("--old-rev", default=OLD_REV)
    parser.add_argument("--steps", nargs="+", default=["jsonl", "captions", "split"])
    parser.add_argument("--prepare", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        what, path, rows, grow, tags = args.prepare
        _prepare(what, path, int(rows), int(grow), tags)
        return []
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tagpipe-old-") as folder:
        results = run_all(args, work, old_modules(args.old_rev, Path(folder)))
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return results


def run_all(args, work: Path, old: Path) -> list[dict]:
    """Both sizes, old code and new, then the grown table with the new code."""
    results = []
    print(f"machine: {machine()}; old code: {args.old_rev[:12]}", flush=True)
    for label, rows in (("small", args.small_rows), ("large", args.rows)):
        tags = str(work / f"tags-{label}")
        prepare("table", tags, rows)
        prepare("clusters", str(work / f"clusters-{label}.parquet"), rows, tags=tags)
        results += run_size(label, tags, rows, work, old, args.rss_limit_gib, args.steps)
    if args.grow_rows:
        prepare("grow", tags, args.rows, args.grow_rows)
        grown = measure("new", "jsonl", tags, work / "out-grown", work / "none", old, args.rss_limit_gib)
        total = args.rows + args.grow_rows
        print(f"| {total:,} (grown: interleaved parts) | jsonl | - | {row(grown, total)} |", flush=True)
        results.append({"rows": total, "grown": True, **grown})
        shutil.rmtree(work / "out-grown", ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
