"""The commands that write tag tables: tag, rethreshold, nightly, vacuum."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import (
    LogFormatOption,
    Quiet,
    Verbose,
    app,
    configure_output,
    emit_result,
    run_interruptible,
    settings_options,
)
from pipeline.core.logs import LogFormat
from pipeline.core.settings import build
from pipeline.core.words import counted
from pipeline.job.settings import RethresholdSettings, TagJobConfig
from pipeline.table.tag_table import VacuumSettings


@app.command(short_help="Tag images into a versioned Parquet table.")
@settings_options(TagJobConfig, elsewhere="here or in --config")
def tag(
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="TOML config file with a `[tag]` table; its keys are these options' long names in snake_case "
        "(`--tagger-actors` is `tagger_actors`), all but the command's own (`--config`, `--dry-run`, `-v`, "
        "`-q`, `--log-format`); an option given on the command line wins. Relative paths in the file are "
        "relative to the file",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="list and compare with the table, print the plan (new, changed, deleted, to retry, to re-tag, "
        "parts to rewrite, the version it would commit); tag and write nothing",
    ),
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
    given: dict | None = None,
) -> None:
    """Tag every image under the inputs into a versioned Parquet table, one row per image.

    Against an existing table only new, changed and transiently failed images are
    tagged, deleted ones are dropped, and a new version is committed at the end; a
    new model (or decode settings) re-tags everything, new thresholds rethreshold.
    Several --model: one table each under the output, tagged in one pass."""
    from pipeline.job.settings import load_config_file, make_tag_config
    from pipeline.job.tag_job import run_tag_pass

    configure_output(verbose, quiet, log_format)
    given = dict(given or {})
    if quiet:
        given["progress"] = False
    cfg = make_tag_config(load_config_file(config) if config else {}, **given)
    emit_result(run_interruptible(run_tag_pass, cfg, dry_run=dry_run))


@app.command(short_help="Re-tag stored rows with new thresholds (no model run).")
@settings_options(RethresholdSettings, required=True)
def rethreshold(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML config with a [tag] table: its threshold settings apply."
    ),
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
    given: dict | None = None,
) -> None:
    """Re-tag stored rows from their sparse logits with new thresholds: no model run."""
    from pipeline.job.rethreshold import run_rethreshold
    from pipeline.job.settings import make_rethreshold_settings

    configure_output(verbose, quiet, log_format)
    settings = make_rethreshold_settings(config, given or {})
    emit_result(
        run_rethreshold(
            settings.tags,
            settings.model,
            settings.output,
            settings.rules,
            settings.storage_options,
            settings.ray_address,
        )
    )


@app.command(short_help="Tag what changed, then dedup, split and audit.")
@settings_options(TagJobConfig, only=("run_id", "ray_address", "max_delete_fraction", "progress"))
def nightly(
    config: Path = typer.Option(
        ...,
        "--config",
        "-c",
        help="TOML file with [tag] and [nightly] tables (configs/nightly.example.toml).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the tag step's plan; tag, dedup, split and write nothing."
    ),
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
    given: dict | None = None,
) -> None:
    """Tag what is new or changed, drop what is gone, then refresh dedup, splits
    (stable: --previous) and the leakage audit, and write the report with the drift from
    the version before. Exits 1 when the audit finds leaks, else 4 when it could not check
    every val/test image, else 3 on drift past the [nightly.drift] limits (README, "Exit statuses")."""
    from pipeline.job.nightly import nightly_exit_status, run_nightly
    from pipeline.job.settings import load_nightly_config
    from pipeline.job.tag_job import run_tag_job

    configure_output(verbose, quiet, log_format)
    given = dict(given or {})
    if quiet:
        given["progress"] = False
    cfg = load_nightly_config(config, **given)
    if dry_run:
        emit_result(run_interruptible(run_tag_job, cfg.tag, dry_run=True))
        return
    summary = run_interruptible(run_nightly, cfg)
    emit_result(summary)
    status = nightly_exit_status(summary, cfg)
    if status:
        raise typer.Exit(status)


@app.command(short_help="Delete parts (and label files) no kept version uses.")
@settings_options(VacuumSettings, required=True)
def vacuum(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be deleted."),
    given: dict | None = None,
) -> None:
    """Delete parts, label files and version records that no kept version of the table uses."""
    from pipeline.table.tag_table import TagTable

    configure_output()
    settings = build(VacuumSettings, given or {})
    table = TagTable(settings.tags, settings.storage_options)
    result = table.vacuum(settings.keep_versions, settings.grace_hours, dry_run)
    verb = "would delete" if dry_run else "deleted"
    typer.echo(
        f"vacuum: {verb} {counted(result['parts_deleted'], 'parts')}, "
        f"{counted(result['label_files_deleted'], 'label files')}, "
        f"versions {result['versions_deleted'] or 'none'}, "
        f"{counted(result['tmp_deleted'], 'temp files')}; kept versions {result['versions_kept']}"
    )
