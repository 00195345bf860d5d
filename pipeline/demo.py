"""`tagpipe demo`: the whole chain on an embedded default, nothing downloaded.

Builds the demo model and a synthetic corpus, tags it on a local Ray with local
files, and checks the tags against what the corpus generator knows to be right.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path


from pipeline.config import make_tag_config
from pipeline.demo_model import write_demo_bundle
from pipeline.synthetic import load_expected, make_corpus
from pipeline.table import read_current
from pipeline.tag_job import RunSummary, run_tag_job

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    workdir: Path
    model_dir: Path
    corpus_dir: Path
    tags_dir: Path
    summary: RunSummary
    checked: int
    correct: int
    wrong: list
    report: Path | None = None  # report.html over the tags, duplicate clusters and splits


def check_tags(tags_dir: str | Path, corpus_dir: Path, images_root: str | None = None, storage_options: dict | None = None) -> tuple[int, int, list]:
    """Compare written tags with the corpus's known tags: (checked, correct, mismatches).

    images_root: where the corpus's images were tagged from, when not corpus_dir/images
    (a copy on S3); storage_options: fsspec options for tags_dir.
    """
    expected = load_expected(corpus_dir)
    table = read_current(str(tags_dir), storage_options, ["uri", "tags", "rating", "quality", "error"])
    images_root = (images_root or str((corpus_dir / "images").resolve())).rstrip("/")
    correct, wrong = 0, []
    for row in table.to_pylist():
        rel = posixpath.relpath(row["uri"], images_root)
        entry = expected[rel]
        if entry.broken:
            ok = row["error"] is not None
        else:
            got = set(row["tags"] or []) - {row["rating"], row["quality"]}
            ok = row["error"] is None and got == set(entry.tags) and row["rating"] == entry.rating and row["quality"] == entry.quality
        correct += ok
        if not ok:
            wrong.append((rel, row["tags"], row["error"]))
    return table.num_rows, correct, wrong


def run_demo(workdir: str | Path = "tagpipe-demo", images_per_kind: int = 3, **tag_options) -> DemoResult:
    workdir = Path(workdir).resolve()
    model_dir, corpus_dir, tags_dir = workdir / "model", workdir / "corpus", workdir / "tags"
    write_demo_bundle(model_dir)
    make_corpus(corpus_dir, images_per_kind=images_per_kind)
    tag_options.setdefault("max_delete_fraction", 1.0)  # the demo owns its corpus: a smaller one is not a lost input
    cfg = make_tag_config(inputs=[str(corpus_dir / "images")], output=str(tags_dir), model=str(model_dir), **tag_options)
    summary = run_tag_job(cfg)
    checked, correct, wrong = check_tags(tags_dir, corpus_dir)
    from pipeline.dedup import run_dedup
    from pipeline.report import build_report
    from pipeline.split import run_split

    dedup_dir, split_dir, report = workdir / "dedup", workdir / "splits", workdir / "report.html"
    run_dedup(str(tags_dir), str(dedup_dir))
    run_split(str(tags_dir), str(dedup_dir), str(split_dir), {"train": 0.8, "val": 0.1, "test": 0.1})
    build_report(str(tags_dir), str(report), dedup=str(dedup_dir), split=str(split_dir), title="tagpipe demo")
    return DemoResult(workdir, model_dir, corpus_dir, tags_dir, summary, checked, correct, wrong, report)
