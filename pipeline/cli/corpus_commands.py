"""The commands over a tagged corpus: dedup, split, report, audit, export (and its supplement mode).

Each command's options come from its settings' fields (pipeline/corpus/*_settings.py,
pipeline/corpus/drift.py): the command builds the settings and hands them to its stage.
"""

from __future__ import annotations

import typer

from pipeline.cli.common import (
    LogFormatOption,
    Quiet,
    StorageOptions,
    Verbose,
    _emit,
    _setup,
    _storage_options,
    app,
    settings_options,
)
from pipeline.core.logs import LogFormat
from pipeline.core.settings import build
from pipeline.core.words import counted
from pipeline.corpus.audit_settings import AuditSettings
from pipeline.corpus.dedup_settings import DedupSettings
from pipeline.corpus.drift import DriftSettings
from pipeline.corpus.export_settings import ExportSettings
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

    _setup(verbose, quiet, log_format)
    summary = run_dedup(build(DedupSettings, given or {}))
    _emit(summary)
    for giant in summary.giant_clusters:
        typer.echo(
            f"warning: giant cluster {giant['cluster_id'][:16]}: {counted(giant['size'], 'images')}, "
            f"{giant['diameter_hops']} hops across, ends {giant['spread_bits']} bits apart"
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

    _setup(verbose, quiet, log_format)
    report = run_split(build(SplitSettings, given or {}))
    _emit(report)
    for bridge in report.bridges:
        typer.echo(
            f"bridge: cluster {bridge['cluster_id'][:16]} "
            f"joins previous {'+'.join(bridge['previous_splits'])}: "
            f"{bridge['held_out']} new image(s) held out"
        )


@app.command(short_help="One self-contained HTML report.")
@settings_options(DriftSettings)
def report(
    tags: str = typer.Option(..., "--tags", help="A tag output (tag table or Parquet)."),
    output: str = typer.Option(
        "report.html", "--output", "-o", help="The HTML file to write (local path or s3://...)."
    ),
    dedup: str | None = typer.Option(
        None, "--dedup", help="A dedup output directory: the largest duplicate clusters."
    ),
    split: str | None = typer.Option(
        None, "--split", help="A split output directory: sizes and per-tag balance."
    ),
    title: str | None = typer.Option(None, help="Page title; default names the tag output."),
    compare_version: int | None = typer.Option(
        None,
        "--compare-version",
        help="Drift from this version of the table to the current one (default: the version before it).",
    ),
    storage_options: StorageOptions = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
    given: dict | None = None,
) -> None:
    """One self-contained HTML report: summary, drift from the previous version (or
    --compare-version), tag frequency, scores, OOD, duplicates, splits, errors."""
    from pipeline.corpus.report import build_report

    _setup(verbose, quiet, log_format)
    settings = build(DriftSettings, given or {})
    options = _storage_options(storage_options)
    _emit(build_report(tags, output, dedup, split, options, title, compare_version, settings))


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

    _setup(verbose, quiet, log_format)
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
    _emit(report)
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

    _setup(verbose, quiet, log_format)
    _emit(run_export(build(ExportSettings, given or {})))
