"""Planted label noise on the demo corpus: how well `compare-tags` finds it.

    python benchmarks/label_noise.py [--images-per-kind 100] [--seed 0] [--workdir /tmp/tagpipe-bench]

Tags the synthetic corpus (12 kinds, each image's true tags known) once with the demo model
through the real tag job. Source tags = the true tags with 10% of the true (image, tag) pairs
removed and wrong pairs added equal to 5% of them (a tag the image lacks), seeded. The wrong
tags are drawn two ways: from every judged tag of the vocabulary (the demo's 234 filler tags
are most of it, and the model gives them ~0), and from the 15 tags that mean something (a
`monochrome` on a red image: the model's answer is a real one). For each, and for both rules
(data: confident-learning thresholds; calibrated: the bundle's calibration table), it runs
`run_compare_tags` on a copy of the table and measures precision and recall of
likely_missing against the removed pairs and of likely_wrong against the added ones, and
how well label_quality ranks noisy images below clean ones (AUC).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from tag_job import start_local_ray  # noqa: E402

from pipeline.corpus.label_settings import LabelCheckSettings  # noqa: E402
from pipeline.demo.label_noise import measure, plant_noise, quality_auc  # noqa: E402
from pipeline.demo.model import vocabulary, write_demo_bundle  # noqa: E402
from pipeline.demo.synthetic import load_expected, make_corpus  # noqa: E402
from pipeline.job.label_check import run_compare_tags  # noqa: E402
from pipeline.job.settings import make_tag_config  # noqa: E402
from pipeline.job.tag_job import run_tag_job  # noqa: E402
from pipeline.table.tag_table import read_current  # noqa: E402

JUDGED = [t for t, c in zip(*vocabulary()) if c not in ("rating", "quality")]
CANDIDATES = {
    "any vocabulary tag": JUDGED,
    "the 15 meaningful tags": [t for t in JUDGED if not t.startswith("unused_tag_")],
}
COLUMNS = ["uri", "likely_missing", "likely_wrong", "label_quality"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-kind", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/tagpipe-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir) / f"label-noise-{args.images_per_kind}"
    corpus, base = work / "corpus", work / "tags"
    model = write_demo_bundle(work / "model")
    entries = make_corpus(corpus, images_per_kind=args.images_per_kind, seed=args.seed, broken=False)
    start_local_ray()
    if not base.exists():
        cfg = make_tag_config(
            inputs=[str(corpus / "images")], output=str(base), model=str(model), rows_per_part=256
        )
        run_tag_job(cfg)
    root = str((corpus / "images").resolve())
    truth = {f"{root}/{path}": entry.tags for path, entry in load_expected(corpus).items()}
    pairs = sum(len(t) for t in truth.values())
    print(f"{len(entries)} images, {pairs} true (image, tag) pairs; seed {args.seed}")
    for name, candidates in CANDIDATES.items():
        noise = plant_noise(truth, candidates, seed=args.seed)
        source = work / "source_tags.parquet"
        pq.write_table(
            pa.table({"uri": list(noise.source), "tags": [" ".join(t) for t in noise.source.values()]}),
            source,
        )
        print(f"wrong tags from {name}: {len(noise.removed)} removed, {len(noise.added)} added")
        for rule in ("data", "calibrated"):
            table = work / f"tags-{rule}"
            shutil.rmtree(table, ignore_errors=True)
            shutil.copytree(base, table)
            t = time.perf_counter()
            summary = run_compare_tags(
                str(table), str(model), str(source), settings=LabelCheckSettings(label_rule=rule)
            )
            seconds = time.perf_counter() - t
            rows = read_current(str(table), columns=COLUMNS).to_pylist()
            found = measure(rows, noise)
            print(
                f"  {rule:10s} likely_missing {found['likely_missing'].text()}; "
                f"likely_wrong {found['likely_wrong'].text()}; "
                f"label_quality AUC {quality_auc(rows, noise):.3f}; {seconds:.1f} s"
            )
            print(f"             {summary.text()}")


if __name__ == "__main__":
    main()
