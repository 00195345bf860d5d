"""`tagpipe demo`: the whole chain on an embedded default, nothing downloaded.

Builds the demo model and a synthetic corpus, tags it on a local Ray with local
files, and checks the tags against what the corpus generator knows to be right.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field

from pipeline.core.settings import KeyRole, Setting, SettingsModel
from pipeline.core.words import counted
from pipeline.demo.model import write_demo_bundle
from pipeline.demo.synthetic import load_expected, make_corpus
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import RunSummary, run_tag_job
from pipeline.table.tag_table import read_current

log = logging.getLogger(__name__)
# The demo model's embedding is pooled colour statistics: planted copies sit at cosine
# >= 0.9925 to their originals and different kinds at <= 0.988 (benchmarks/dedup_signals.py).
# A quarter of the demo's image pairs are the same kind, near-identical to this model,
# which no estimate from random pairs can see past, so the demo states its threshold.
DEMO_EMBEDDING_THRESHOLD = 0.99


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
    duplicates: DuplicateCheck | None = None


@dataclass
class DuplicateCheck:
    """What the demo proves about its planted copies (resized, re-encoded, cropped)."""

    planted: int = 0
    with_original: int = 0  # copies in their original's cluster
    same_split: int = 0  # copies in their original's split
    mixed_clusters: list | None = None  # clusters holding images of two kinds (must be none)
    leaks_planted: int = 0  # copies moved to val against their original in train (the leaky split)
    leaks_found: int = 0  # of those, what the audit found
    audit_text: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.with_original == self.same_split == self.planted
            and not self.mixed_clusters
            and self.leaks_found == self.leaks_planted
        )

    def text(self) -> str:
        return (
            f"duplicates: {self.with_original}/{self.planted} planted copies share their original's cluster, "
            f"{self.same_split}/{self.planted} its split; "
            f"{counted(len(self.mixed_clusters or []), 'clusters')} mix kinds; "
            f"a deliberately leaky split: the audit found "
            f"{self.leaks_found}/{self.leaks_planted} planted leaks"
        )


def check_tags(
    tags_dir: str | Path,
    corpus_dir: Path,
    images_root: str | None = None,
    storage_options: dict | None = None,
) -> tuple[int, int, list]:
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
            ok = (
                row["error"] is None
                and got == set(entry.tags)
                and row["rating"] == entry.rating
                and row["quality"] == entry.quality
            )
        correct += ok
        if not ok:
            wrong.append((rel, row["tags"], row["error"]))
    return table.num_rows, correct, wrong


def run_demo(workdir: str | Path = "tagpipe-demo", images_per_kind: int = 3, **tag_options) -> DemoResult:
    workdir = Path(workdir).resolve()
    model_dir, corpus_dir, tags_dir = workdir / "model", workdir / "corpus", workdir / "tags"
    write_demo_bundle(model_dir)
    make_corpus(corpus_dir, images_per_kind=images_per_kind)
    tag_options.setdefault(
        "max_delete_fraction", 1.0
    )  # the demo owns its corpus: a smaller one is not a lost input
    cfg = make_tag_config(
        inputs=[str(corpus_dir / "images")], output=str(tags_dir), model=str(model_dir), **tag_options
    )
    summary = run_tag_job(cfg)
    checked, correct, wrong = check_tags(tags_dir, corpus_dir)
    from pipeline.corpus.dedup import run_dedup
    from pipeline.corpus.report import build_report
    from pipeline.corpus.split import run_split

    dedup_dir, split_dir, report = workdir / "dedup", workdir / "splits", workdir / "report.html"
    run_dedup(str(tags_dir), str(dedup_dir), embedding_threshold=DEMO_EMBEDDING_THRESHOLD)
    run_split(str(tags_dir), str(dedup_dir), str(split_dir), ratios={"train": 0.8, "val": 0.1, "test": 0.1})
    build_report(str(tags_dir), str(report), dedup=str(dedup_dir), split=str(split_dir), title="tagpipe demo")
    duplicates = check_duplicates(corpus_dir, tags_dir, dedup_dir, split_dir, workdir / "leaky-splits")
    return DemoResult(
        workdir, model_dir, corpus_dir, tags_dir, summary, checked, correct, wrong, report, duplicates
    )


def check_duplicates(
    corpus_dir: Path, tags_dir: Path, dedup_dir: Path, split_dir: Path, leaky_dir: Path
) -> DuplicateCheck:
    """Planted copies against dedup, split and audit: each copy in its original's cluster
    and split, no cluster of two kinds, and an audit of a split made leaky on purpose
    (every copy in val, its original in train) that must find every planted leak."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.corpus.audit import run_audit

    images = str((corpus_dir / "images").resolve())
    expected = load_expected(corpus_dir)
    rel = lambda uri: posixpath.relpath(uri, images)  # noqa: E731
    clusters = {
        rel(r["uri"]): r["cluster_id"] for r in pq.read_table(dedup_dir / "clusters.parquet").to_pylist()
    }
    splits_table = pq.read_table(split_dir / "splits.parquet")
    splits = {rel(r["uri"]): r["split"] for r in splits_table.to_pylist()}
    copies = [e for e in expected.values() if e.duplicate_of]
    check = DuplicateCheck(planted=len(copies), mixed_clusters=[])
    check.with_original = sum(clusters.get(c.path) == clusters.get(c.duplicate_of or "") for c in copies)
    check.same_split = sum(splits.get(c.path) == splits.get(c.duplicate_of or "") for c in copies)
    kinds: dict[str, set] = {}
    for path, cluster in clusters.items():
        if expected[path].kind:
            kinds.setdefault(cluster, set()).add(expected[path].kind)
    check.mixed_clusters = sorted(c for c, k in kinds.items() if len(k) > 1)
    copy_paths, originals = {c.path for c in copies}, {c.duplicate_of for c in copies}

    def leak(uri: str, split: str) -> str:  # copies to val, their originals to train
        if rel(uri) in copy_paths:
            return "val"
        return "train" if rel(uri) in originals else split

    uris, splits_now = splits_table.column("uri").to_pylist(), splits_table.column("split").to_pylist()
    leaky = [leak(u, s) for u, s in zip(uris, splits_now)]
    leaky_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        splits_table.set_column(splits_table.column_names.index("split"), "split", pa.array(leaky)),
        leaky_dir / "splits.parquet",
    )
    leaks, report = run_audit(
        str(leaky_dir / "splits.parquet"),
        str(leaky_dir / "splits.parquet"),
        tags=str(tags_dir),
        embedding_threshold=DEMO_EMBEDDING_THRESHOLD,
    )
    found = {rel(u) for u in leaks.column("eval_uri").to_pylist()}
    check.leaks_planted = len(copy_paths)
    check.leaks_found = len(copy_paths & found)
    check.audit_text = report.text()
    return check


class DemoSettings(SettingsModel):
    """What `tagpipe demo` takes (its options come from these fields)."""

    workdir: Annotated[
        Path, Field(description="where the demo model, corpus and outputs go"), Setting(KeyRole.NONE)
    ] = Path("tagpipe-demo")
    images_per_kind: Annotated[
        int, Field(ge=1, description="synthetic images per kind (12 kinds)"), Setting(KeyRole.NONE)
    ] = 3
