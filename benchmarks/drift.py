"""Drift between two versions of a large synthetic tag table: time and peak memory.

    python benchmarks/drift.py                 # 1M rows
    python benchmarks/drift.py --rows 10000000

Writes version 1 as benchmarks/report.py does (parts of 100k rows, ~30 Zipf tags a row),
then version 2: the same parts but the last, replaced by a part drawn with another seed
(nightly's shape: most parts shared). Then, each in a fresh process: `version_drift`
(reads the shared parts once, the two others each), and `build_report` with its drift
section (the page's pass over version 2 feeds the drift; only version 1's own part is
read again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from report import make_table  # noqa: E402

CODE = """
import json, resource, sys, time
t = time.perf_counter()
if sys.argv[1] == "drift":
    from pipeline.corpus.drift import version_drift
    s = version_drift(sys.argv[2])
else:
    from pipeline.corpus.report import build_report
    s = build_report(sys.argv[2], sys.argv[3]).drift
print(json.dumps({"seconds": time.perf_counter() - t, "parts_read": s.parts_read, "movers": s.tag_movers,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def second_version(root: Path, rows: int) -> None:
    """Version 2: version 1's parts, the last one replaced by one drawn with another seed."""
    from pipeline.table.tag_table import TagTable, commit_version
    from pipeline.table.version_fields import RulesRecord

    make_table(root.parent / "other", min(rows, 100_000), seed=1)
    other = TagTable(str(root.parent / "other"))
    table = TagTable(str(root))
    base = table.current()
    table.write_part("data/bench2/part-new.parquet", other.read(other.current()))
    files = [*base.files[:-1], "data/bench2/part-new.parquet"]
    commit_version(
        table,
        base,
        files,
        model_sha256="0" * 64,
        inference_key="bench",
        rules_key="bench",
        run_id="bench2",
        model_name="synthetic",
        rules=RulesRecord(default_threshold=0.5),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", default="/tmp/tagpipe-bench-drift")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    make_table(work / "tags", args.rows)
    second_version(work / "tags", args.rows)
    results = {}
    for what in ("drift", "report"):
        done = subprocess.run(
            [sys.executable, "-c", CODE, what, str(work / "tags"), str(work / "report.html")],
            capture_output=True,
            text=True,
            check=True,
        )
        results[what] = json.loads(done.stdout.strip().splitlines()[-1])
    print("| rows | what | time | peak RSS | parts read |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for what, r in results.items():
        print(
            f"| {args.rows:,} | {what} | {r['seconds']:.1f} s | {r['peak_rss_mib']:.0f} MiB "
            f"| {r['parts_read']} |"
        )
    return results


if __name__ == "__main__":
    main()
