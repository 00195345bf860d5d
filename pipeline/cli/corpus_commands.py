"""The commands over a tagged corpus: dedup, split, report, audit, export (and its supplement mode).

Each command's options come from its settings' fields (pipeline/corpus/*_settings.py,
ReportSettings in pipeline/corpus/report.py): the command builds the settings and hands them to its stage.
"""

from __future__ import annotations

import typer

from pipeline.cli.common import (
    LogFormatOption,
    Quiet,
    Verbose,
    app,
    configure_output,
    emit_result,
    settings_options,
)
from pipeline.core.logs import LogFormat
from pipeline.core.settings import build
from pipeline.core.words import counted
from pipeline.corpus.audit_settings import AuditSettings
from pipeline.corpus.dedup_settings import DedupSettings
from pipeline.corpus.export_settings import ExportSettings
from pipeline.corpus.report import ReportSettings
from pipeline.corpus.split_settings import SplitSettings


@app.command(short_help="Exact and near-duplicate clusters.")
@settings_options(DedupSettings, required=True)
def dedup(
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
    given: dict | None = None,
) -> None:
    """Exact (sha256), near (phash) and embedding duplicate clusters, with a stable cluster_id."""
    from pipeline.corpus.dedup import run_dedup

    configure_output(verbose, quiet, log_format)
    summary = run_dedup(build(DedupSettings, given or {}))
    emit_result(summary)
    for giant in summary.giant_clusters:
        typer.echo(
            f"warning: giant cluster {giant.cluster_id[:16]}: {counted(giant.size, 'images')}, "
            f"{giant.diameter_hops} hops across, ends {giant.spread_bits} bits apart"
        )


@app.command(short_help="Leakage-free train/val/test splits by cluster.")
@settings_options(SplitSettings, required=True)
def split(
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
    given: dict | None = None,
) -> None:
    """Assign whole duplicate clusters (and metadata groups) to train/val/test, stable across nightly runs."""
    from pipeline.corpus.split import run_split

    configure_output(verbose, quiet, log_format)
    report = run_split(build(SplitSettings, given or {}))
    emit_result(report)
    for bridge in report.bridges:
        typer.echo(
            f"bridge: cluster {bridge.cluster_id[:16]} "
            f"joins previous {'+'.join(bridge.previous_splits)}: "
            f"{bridge.held_out} new image(s) held out"
        )


@app.command(short_help="One self-contained HTML report.")
@settings_options(ReportSettings, required=True)
def report(
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
    given: dict | None = None,
) -> None:
    """One self-contained HTML report: summary, drift from the previous version (or
    --compare-version), tag frequency, scores, OOD, duplicates, splits, errors."""
    configure_output(verbose, quiet, log_format)
    emit_result(build(ReportSettings, given or {}).build())


@app.command(short_help="Eval images that copy or nearly copy train images.")
@settings_options(AuditSettings, required=True)
def audit(
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
    given: dict | None = None,
) -> None:
    """List eval images that are copies or near-duplicates of train images, by sha256,
    phash and embedding, and what could not be checked; exit status 1 on leaks, 4 when
    some eval image went unchecked by a signal the run was asked to use (README, "Exit statuses")."""
    from pipeline.corpus.audit import run_audit

    configure_output(verbose, quiet, log_format)
    settings = build(AuditSettings, given or {})
    leaks, report = run_audit(settings)
    for row in leaks.slice(0, settings.show).to_pylist():
        if row["signal"] == "sha256":
            how = "same bytes"
        elif row["signal"] == "phash":
            how = f"phash {row['distance']} bits"
        else:
            how = f"cosine {row['cosine']:.4f}"
        typer.echo(f"leak ({how}): {row['eval_uri']} ~ {row['train_uri']}")
    emit_result(report)
    if report.exit_status():
        raise typer.Exit(report.exit_status())


@app.command(short_help="Captions, JSONL or Dart v2 prompts from a table.")
@settings_options(ExportSettings, required=True)
def export(
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
    given: dict | None = None,
) -> None:
    """Write caption sidecars, JSONL, or Dart v2 prompts from a tag output."""
    from pipeline.corpus.export import run_export

    configure_output(verbose, quiet, log_format)
    emit_result(run_export(build(ExportSettings, given or {})))
