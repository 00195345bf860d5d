"""Source (human) tags checked against the model over a version's parts, as Ray tasks.

check_labels is the step a tag run given source tags takes before its commit, and what
`tagpipe compare-tags` runs on a table's current version before committing one. Two
passes over the parts (the rules are pipeline/corpus/label_quality.py's):
1. the data rule only: per part, per-tag sums (TagStatistics), added up on the driver
   into the per-tag thresholds (they depend on every row);
2. per part, a NEW part: the rows with the six label columns (LABEL_FIELDS) set. Its name
   comes from the source part and a digest of the source tags, the rules and the
   thresholds (data/<key>-L<digest>/part-*.parquet), so a rerun finds it done; no part is
   ever overwritten. The source tags travel once through Ray's object store.
check_labels never commits: run_compare_tags commits one version, as rethreshold does.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from pipeline.core.errors import TagpipeError
from pipeline.core.progress import ProgressSettings
from pipeline.core.ray_session import results_in_order
from pipeline.core.schemas import LABEL_COLUMNS
from pipeline.corpus.label_quality import (
    LabelRules,
    PartLabelCounts,
    SourceTagCounts,
    TagStatistics,
    index_source_tags,
    judged_mask,
    label_table,
    part_statistics,
)
from pipeline.corpus.label_settings import LabelCheckSettings, LabelRule
from pipeline.corpus.source_tags import read_source_tags
from pipeline.model.bundle import ModelBundle, load_bundle
from pipeline.model.postprocess import Postprocessor
from pipeline.model.rules import RuleSettings
from pipeline.table.rewrite import rewrite_name
from pipeline.table.tag_table import TagTable, commit_version

LABELLED_DIR = re.compile(r"-L[0-9a-f]{8}$")  # the suffix a labelled part's folder carries


@dataclass
class LabelCheckSummary:
    rule: str = ""  # calibrated | data
    parts: int = 0
    parts_skipped: int = 0  # written by an earlier attempt
    counts: PartLabelCounts = field(default_factory=PartLabelCounts)
    source: SourceTagCounts = field(default_factory=SourceTagCounts)
    source_unmatched: int = 0  # source rows whose uri no table row has
    version: int = 0  # the committed version (compare-tags)
    seconds: float = 0.0

    def text(self) -> str:
        c, s = self.counts, self.source
        unknown = ", ".join(f"{tag} ({n})" for tag, n in s.unknown_examples[:3])
        return (
            f"compare-tags ({self.rule} rule): {c.with_source} of {c.rows} rows have source tags "
            f"({c.judged} judged, {self.source_unmatched} source rows match no image); "
            f"{c.likely_missing} likely missing and {c.likely_wrong} likely wrong tags on {c.flagged_rows} "
            f"rows; {s.unknown} source tags ({s.unknown_tags} distinct) not in the model's vocabulary"
            + (f": {unknown}" if unknown else "")
            + (f"; version {self.version}" if self.version else "")
            + f", {self.seconds:.1f} s"
        )

    def record(self) -> dict:
        """What a version's counts keep of the check."""
        return {"rule": self.rule, **asdict(self.counts), "unknown_source_tags": self.source.unknown}


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
) -> tuple[list[str], LabelCheckSummary]:
    """The parts `files` (relative to `table`) rewritten with the label columns: the new
    files in the same order, and what was found. source_tags: a file (Parquet or CSV,
    pipeline/corpus/source_tags.py) or a table read already (uri, source_tags). Every
    check of the settings and the file comes before Ray is joined (or started, when none
    runs: ray_address as ensure_ray takes it). Nothing is committed; rows keep their
    run_id (their tags are unchanged)."""
    import ray

    from pipeline.core.ray_session import ensure_ray

    started = time.monotonic()
    post = Postprocessor.for_bundle(bundle, rules)
    judged = judged_mask(post, settings.label_categories)
    rule = LabelRules.resolve(post, settings, TagStatistics.empty(len(judged))).rule  # a bad rule stops here
    if isinstance(source_tags, str):
        source_tags = read_source_file(source_tags, table.storage_options, aliases, settings)
    indexed, source_counts = index_source_tags(source_tags, post, judged)
    summary = LabelCheckSummary(rule=rule.value, parts=len(files), source=source_counts)
    ensure_ray(ray_address)
    statistics = None
    if rule is LabelRule.DATA:
        statistics = _statistics(table, files, _Context(post, indexed, judged), progress)
    resolved = LabelRules.resolve(post, settings, statistics)
    key = _labels_key(resolved, indexed, bundle, rules, settings)
    ref = ray.put(_Context(post, indexed, judged, resolved))
    task = ray.remote(num_cpus=1, max_retries=3)(_label_part)
    pending = [task.remote(table.uri, table.storage_options, f, _labelled_name(f, key), ref) for f in files]
    new_files, matched = [], 0
    for file, counts, done, uris_matched in results_in_order(pending, "label check", progress):
        new_files.append(file)
        summary.counts += counts
        summary.parts_skipped += done
        matched += uris_matched
    summary.source_unmatched = indexed.num_rows - matched
    summary.seconds = round(time.monotonic() - started, 3)
    return new_files, summary


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


def _labels_key(
    rules: LabelRules, indexed: pa.Table, bundle: ModelBundle, tag_rules: RuleSettings, settings
) -> str:
    """What decides the label columns: the source tags (as indexed), the resolved rules
    (thresholds included), the calibration and the settings."""
    digest = hashlib.sha256(rules.key().encode())
    digest.update(bundle.fingerprint.calibration_sha256.encode())
    digest.update(repr(sorted(tag_rules.record().items())).encode())
    digest.update(settings.model_dump_json().encode())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, indexed.schema) as writer:
        writer.write_table(indexed)
    digest.update(sink.getvalue())
    return digest.hexdigest()


def _labelled_name(file: str, key: str) -> str:
    """data/<the source part's key>-L<labels digest>/part-<digest>.parquet (a part labelled
    before keeps its original key: labels are replaced, not stacked). A part labelled with
    these very labels already is its own answer, so a repeated check changes nothing."""
    folder = posixpath.basename(posixpath.dirname(file))
    if folder.endswith(f"-L{key[:8]}"):
        return file
    return rewrite_name(file, f"{LABELLED_DIR.sub('', folder)}-L{key[:8]}", ())


def _part_statistics(uri: str, storage_options: dict, file: str, context: _Context) -> TagStatistics:
    part = TagTable(uri, storage_options).read_part(file, ["uri", "error", "logit_indices", "logit_values"])
    return part_statistics(part, context.source, context.post, context.judged)  # type: ignore[arg-type]


def _label_part(
    uri: str, storage_options: dict, file: str, target: str, context: _Context
) -> tuple[str, PartLabelCounts, bool, int]:
    """(new file, counts, already written, rows whose uri the source has)."""
    table = TagTable(uri, storage_options)
    assert context.rules is not None
    if table.exists(target):
        done = table.read_part(target, ["uri", "error", *LABEL_COLUMNS])
        counts = _counts_of(done)
        return target, counts, True, counts.with_source
    labelled, counts = label_table(table.read_part(file), context.source, context.post, context.rules)
    table.write_part(target, labelled)
    return target, counts, False, counts.with_source


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
    as a new version of the same table (no new version when nothing changed)."""
    from pipeline.core.ray_session import new_run_id

    settings = settings or LabelCheckSettings.model_validate({})
    bundle = load_bundle(model_dir)
    table = TagTable(tags, storage_options)
    base = table.sync_current()
    if base is None:
        raise TagpipeError(
            f"{tags}: no committed table (_current.json missing): has a tag run finished here?"
        )
    if base.model_sha256 != bundle.fingerprint.model_sha256:
        raise TagpipeError(
            f"{tags}: made by model {base.model_sha256}, not by {model_dir} "
            f"({bundle.fingerprint.model_sha256}); compare-tags needs the same model"
        )
    # The rules the version was tagged with: the floor and whether calibration applies.
    rules = RuleSettings.model_validate(
        {
            "calibrate": bool(base.rules.get("calibrate", True)),
            "logit_floor": base.rules.get("logit_floor", 0.01),
        }
    )
    run_id = run_id or new_run_id()
    files, summary = check_labels(
        table, base.files, bundle, rules, settings, source_tags, aliases, progress, ray_address
    )
    if tuple(sorted(files)) == base.files:  # a repeat of a finished check
        summary.version = base.version
        return summary
    snapshot = commit_version(
        table,
        base,
        files,
        model_sha256=base.model_sha256,
        inference_key=base.inference_key,
        rules_key=base.rules_key,
        run_id=run_id,
        model_name=base.model_name,
        rules=base.rules,
        counts={"label_check": summary.record(), "source_version": base.version},
        rows=base.rows,
    )
    summary.version = snapshot.version
    return summary


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
