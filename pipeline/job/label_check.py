"""Source (human) tags checked against the model over a version's parts, as Ray tasks.

check_labels is the step a tag run given source tags takes before its commit, and what
`tagpipe compare-tags` runs on a table's current version before committing one. Two
passes over the parts, reading only uri, error and the stored logits (the rules are
pipeline/corpus/label_quality.py's):
1. the data rule only: per part, per-tag sums (TagStatistics), added up on the driver
   into the per-tag thresholds (they depend on every row);
2. per part, a labels file of the table's label sidecar (pipeline/table/labels.py): the
   part's rows' six label columns (LABEL_FIELDS) by uri. Its name is a digest of the part,
   the resolved rules (thresholds included), the settings and the source tags of that
   part's rows only, so a rerun finds it done, and a source file with one row changed
   writes one new labels file under the calibrated rule (every file under the data rule,
   whose thresholds move). No part is rewritten, no file overwritten. The source tags
   travel once through Ray's object store.
check_labels never commits: run_compare_tags commits one version (the same parts, new
labels files), as does the tag run.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import TagpipeError
from pipeline.core.progress import ProgressSettings
from pipeline.core.ray_session import results_in_order
from pipeline.core.schemas import LABEL_COLUMNS
from pipeline.core.words import counted
from pipeline.corpus.label_quality import (
    LabelRules,
    PartLabelCounts,
    SourceTagCounts,
    TagStatistics,
    index_source_tags,
    join_source,
    judged_mask,
    label_table,
    part_statistics,
)
from pipeline.corpus.label_settings import LabelCheckSettings, LabelRule
from pipeline.corpus.source_match import check_source_match
from pipeline.corpus.source_tags import read_source_tags
from pipeline.model.bundle import ModelBundle, load_bundle
from pipeline.model.postprocess import Postprocessor
from pipeline.model.rules import RuleSettings
from pipeline.table.labels import labels_file
from pipeline.table.tag_table import READ_THREADS, TagTable, commit_version
from pipeline.table.version_fields import LabelCheckCounts, VersionCounts


@dataclass(frozen=True)
class LabelCheckSummary:
    """A label check's report, built once its parts are checked (the committed version
    added by compare-tags)."""

    rule: str = ""  # calibrated | data
    parts: int = 0
    parts_skipped: int = 0  # labels file written before (an earlier attempt, or the same labels)
    counts: PartLabelCounts = field(default_factory=PartLabelCounts)
    source: SourceTagCounts = field(default_factory=SourceTagCounts)
    source_unmatched: int = 0  # source rows whose uri no table row has
    version: int = 0  # the committed version (compare-tags)
    labels_written: int = 0  # labels files written (the others were written before: unchanged)
    seconds: float = 0.0

    def text(self) -> str:
        c, s = self.counts, self.source
        unknown = ", ".join(f"{tag} ({n})" for tag, n in s.unknown_examples[:3])
        return (
            f"compare-tags ({self.rule} rule): {c.with_source} of {counted(c.rows, 'rows')} have source tags "
            f"({c.judged} judged, {self.source_unmatched} source rows match no image); "
            f"{c.likely_missing} likely missing and {c.likely_wrong} likely wrong tags on {c.flagged_rows} "
            f"rows; {s.unknown} source tags ({s.unknown_tags} distinct) not in the model's vocabulary"
            + (f": {unknown}" if unknown else "")
            + f"; {self.labels_written} of {counted(self.parts, 'label files')} new"
            + (f", version {self.version}" if self.version else "")
            + f", {self.seconds:.1f} s"
        )

    def record(self) -> LabelCheckCounts:
        """What a version's counts keep of the check."""
        return LabelCheckCounts(
            rule=self.rule,
            **asdict(self.counts),
            unknown_source_tags=self.source.unknown,
            label_files_written=self.labels_written,
        )


@dataclass(frozen=True)
class _Context:
    """What every task needs, put in the object store once."""

    post: Postprocessor
    source: pa.Table  # uri, source_tags, source_index (label_quality.INDEXED_SCHEMA)
    judged: object  # [T] bool
    rules: LabelRules | None = None


def check_labels(
    table: TagTable,
    files: list[str] | tuple[str, ...],
    bundle: ModelBundle,
    rules: RuleSettings,
    settings: LabelCheckSettings,
    source_tags: str | pa.Table,
    aliases: str | None = None,
    progress: ProgressSettings | None = None,
    ray_address: str | None = None,
) -> tuple[dict[str, str], LabelCheckSummary]:
    """Each of the parts `files` (relative to `table`) with its labels file, written (part
    -> labels file, as Snapshot.labels), and what was found. source_tags: a file (Parquet
    or CSV, pipeline/corpus/source_tags.py) or a table read already (uri, source_tags).
    Every check of the settings and the file comes before Ray is joined (or started, when
    none runs: ray_address as ensure_ray takes it). Nothing is committed, no part written."""
    import ray

    from pipeline.core.ray_session import ensure_ray

    started = time.monotonic()
    post = Postprocessor.for_bundle(bundle, rules)
    judged = judged_mask(post, settings.label_categories)
    rule = LabelRules.resolve(post, settings, TagStatistics.empty(len(judged))).rule  # a bad rule stops here
    if isinstance(source_tags, str):
        source_tags = read_source_file(source_tags, table.storage_options, aliases, settings)
    indexed, source_counts = index_source_tags(source_tags, post, judged)
    ensure_ray(ray_address)
    statistics = None
    if rule is LabelRule.DATA:
        statistics = _statistics(table, files, _Context(post, indexed, judged), progress)
    resolved = LabelRules.resolve(post, settings, statistics)
    key = _labels_key(resolved, bundle, rules, settings)
    ref = ray.put(_Context(post, indexed, judged, resolved))
    task = ray.remote(num_cpus=1, max_retries=3)(_label_part)
    pending = [task.remote(table.uri, table.storage_options, f, key, ref) for f in files]
    labels, total, skipped = {}, PartLabelCounts(), 0
    for file, (written, counts, done) in zip(files, results_in_order(pending, "label check", progress)):
        labels[file] = written
        total += counts
        skipped += done
    summary = LabelCheckSummary(
        rule=rule.value,
        parts=len(files),
        parts_skipped=skipped,
        counts=total,
        source=source_counts,
        source_unmatched=indexed.num_rows - total.with_source,
        labels_written=len(files) - skipped,
        seconds=round(time.monotonic() - started, 3),
    )
    return labels, summary


def _statistics(
    table: TagTable, files, context: _Context, progress: ProgressSettings | None
) -> TagStatistics:
    """Pass 1: every part's TagStatistics, summed."""
    import ray

    ref = ray.put(context)
    task = ray.remote(num_cpus=1, max_retries=3)(_part_statistics)
    pending = [task.remote(table.uri, table.storage_options, f, ref) for f in files]
    total = TagStatistics.empty(len(context.post.tags))
    for partial in results_in_order(pending, "label statistics", progress):
        total += partial
    return total


def _labels_key(rules: LabelRules, bundle: ModelBundle, tag_rules: RuleSettings, settings) -> str:
    """What decides every part's label columns but its rows' source tags: the resolved
    rules (thresholds included), the model and its calibration, and the settings."""
    digest = hashlib.sha256(rules.key().encode())
    digest.update(bundle.fingerprint.model_sha256.encode())
    digest.update(bundle.fingerprint.calibration_sha256.encode())
    digest.update(repr(sorted(tag_rules.record().items())).encode())
    digest.update(settings.model_dump_json().encode())
    return digest.hexdigest()


def _part_labels_file(key: str, file: str, uris: pa.ChunkedArray, source: pa.Table) -> str:
    """A part's labels file: named from the labels key, the part (immutable: its name
    says its rows) and its rows' source tags (as indexed), in row order, so only a part
    whose rows' source tags changed (or whose thresholds moved) gets a new file."""
    where = join_source(uris, source)
    digest = hashlib.sha256(f"{key}\0{file}\0".encode())
    digest.update(np.packbits(where >= 0).tobytes())
    matched = pa.array(where[where >= 0], pa.int64())
    for name in ("source_tags", "source_index"):
        lists = pc.take(source.column(name), matched)
        digest.update(np.asarray(pc.fill_null(pc.list_value_length(lists), -1), np.int64).tobytes())
        flat = pc.list_flatten(lists)
        if pa.types.is_string(flat.type):
            digest.update("\x1f".join(flat.to_pylist()).encode())
        else:
            digest.update(np.asarray(flat.to_numpy(zero_copy_only=False), np.int64).tobytes())
    return labels_file(digest.hexdigest())


def _part_statistics(uri: str, storage_options: dict, file: str, context: _Context) -> TagStatistics:
    part = TagTable(uri, storage_options).read_part(file, ["uri", "error", "logit_indices", "logit_values"])
    return part_statistics(part, context.source, context.post, context.judged)  # type: ignore[arg-type]


def _label_part(
    uri: str, storage_options: dict, file: str, key: str, context: _Context
) -> tuple[str, PartLabelCounts, bool]:
    """(the part's labels file, counts, written before). Only the labels file is written."""
    table = TagTable(uri, storage_options)
    assert context.rules is not None
    target = _part_labels_file(key, file, table.read_part(file, ["uri"]).column("uri"), context.source)
    if table.exists(target):
        return target, _counts_of(table.read_part(target, list(LABEL_COLUMNS))), True
    part = table.read_part(file, ["uri", "error", "logit_indices", "logit_values"])
    labels, counts = label_table(part, context.source, context.post, context.rules)
    table.write_part(target, labels)
    return target, counts, False


def _counts_of(part: pa.Table) -> PartLabelCounts:
    """The counts of a part labelled by an earlier attempt, from its columns."""
    import pyarrow.compute as pc

    missing = pc.fill_null(pc.list_value_length(part.column("likely_missing")), 0)
    wrong = pc.fill_null(pc.list_value_length(part.column("likely_wrong")), 0)
    return PartLabelCounts(
        rows=part.num_rows,
        with_source=part.num_rows - part.column("source_tags").null_count,
        judged=part.num_rows - part.column("label_quality").null_count,
        likely_missing=pc.sum(missing).as_py() or 0,
        likely_wrong=pc.sum(wrong).as_py() or 0,
        flagged_rows=pc.sum(pc.greater(pc.add(missing, wrong), 0)).as_py() or 0,
    )


def run_compare_tags(
    tags: str,
    model_dir: str,
    source_tags: str,
    aliases: str | None = None,
    settings: LabelCheckSettings | None = None,
    storage_options: dict | None = None,
    ray_address: str | None = None,
    run_id: str | None = None,
    progress: ProgressSettings | None = None,
) -> LabelCheckSummary:
    """`tagpipe compare-tags`: the current version checked against source tags, committed
    as a new version of the same table: the same parts, new labels files (no new version
    when nothing changed)."""
    from pipeline.core.ray_session import new_run_id

    settings = settings or LabelCheckSettings.model_validate({})
    bundle = load_bundle(model_dir)
    table = TagTable(tags, storage_options)
    base = table.sync_current()
    if base is None:
        raise table.not_a_table()
    if base.model_sha256 != bundle.fingerprint.model_sha256:
        raise TagpipeError(
            f"{tags}: made by model {base.model_sha256}, not by {model_dir} "
            f"({bundle.fingerprint.model_sha256}); compare-tags needs the same model"
        )
    # The rules the version was tagged with: the floor and whether calibration applies.
    rules = RuleSettings.model_validate({"calibrate": base.rules.calibrates, "logit_floor": base.rules.floor})
    run_id = run_id or new_run_id()
    source = read_source_file(source_tags, storage_options, aliases, settings)
    check_source_match(
        source_tags, source.column("uri"), _table_uris(table, base.files), settings.source_match
    )
    labels, summary = check_labels(
        table, base.files, bundle, rules, settings, source, aliases, progress, ray_address
    )
    if labels == base.labels:  # a repeat of a finished check
        return replace(summary, version=base.version)
    snapshot = commit_version(
        table,
        base,
        base.files,
        model_sha256=base.model_sha256,
        inference_key=base.inference_key,
        rules_key=base.rules_key,
        run_id=run_id,
        model_name=base.model_name,
        rules=base.rules,
        counts=VersionCounts(label_check=summary.record(), source_version=base.version),
        rows=base.rows,
        labels=labels,
    )
    return replace(summary, version=snapshot.version)


def _table_uris(table: TagTable, files: tuple[str, ...]):
    """The uri column of each part, READ_THREADS parts at a time (one part's uris held)."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(files), READ_THREADS):
            chunk = files[start : start + READ_THREADS]
            yield from (t.column("uri").combine_chunks() for t in pool.map(_uri_column(table), chunk))


def _uri_column(table: TagTable):
    return lambda file: table.read_part(file, ["uri"])


def read_source_file(
    path: str, storage_options: dict | None, aliases: str | None, settings: LabelCheckSettings
) -> pa.Table:
    """A source tags file read as the settings say (its columns, its separator)."""
    return read_source_tags(
        path,
        storage_options,
        aliases,
        settings.source_uri_column,
        settings.source_tags_column,
        settings.tag_separator,
    )


def configured_source_tags(cfg) -> pa.Table | None:
    """A tag run's --source-tags, read and normalised once for every model (None
    without); a bad file stops the run here, before any image. cfg: a TagJobConfig."""
    if not cfg.source_tags:
        return None
    return read_source_file(cfg.source_tags, cfg.storage_options, cfg.tag_aliases, cfg.labels)
