"""`tagpipe compare-tags`: source (human) tags checked against the model's probabilities."""

from __future__ import annotations

import typer

from pipeline.cli.common import (
    LogFormatOption,
    Quiet,
    StorageOptions,
    Verbose,
    _emit,
    _interruptible,
    _setup,
    _storage_options,
    app,
    settings_options,
)
from pipeline.core.logs import LogFormat
from pipeline.corpus.label_settings import LabelCheckSettings


@app.command("compare-tags", short_help="Source (human) tags against the model: likely missing and wrong.")
@settings_options(LabelCheckSettings)
def compare_tags(
    tags: str = typer.Option(..., "--tags", help="A tag output directory (local or s3://)."),
    model: str = typer.Option(
        ..., "--model", "-m", help="The bundle that made it (its vocabulary, calibration)."
    ),
    source_tags: str = typer.Option(
        ...,
        "--source-tags",
        help="Parquet or CSV: a uri column and a tags column (a list or a separated string).",
    ),
    aliases: str | None = typer.Option(
        None,
        "--aliases",
        help="Tag aliases: CSV antecedent_name,consequent_name (Danbooru's export) or JSON.",
    ),
    storage_options: StorageOptions = None,
    ray_address: str | None = typer.Option(None, help="'auto' or an address; default a local Ray."),
    run_id: str | None = typer.Option(None, help="Name of this run (default: time-stamped)."),
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
    given: dict | None = None,
) -> None:
    """Join source (human) tags to every row of the current version by uri and add, per row,
    the tags the model is confident the humans missed, the human tags it is confident are
    wrong, and a label-quality score (README, "Source tags"); commits one new version."""
    from pipeline.core.progress import ProgressSettings
    from pipeline.core.settings import build
    from pipeline.job.label_check import run_compare_tags

    _setup(verbose, quiet, log_format)
    settings = build(LabelCheckSettings, dict(given or {}))
    summary = _interruptible(
        run_compare_tags,
        tags,
        model,
        source_tags,
        aliases,
        settings,
        _storage_options(storage_options),
        ray_address,
        run_id,
        ProgressSettings(enabled=not quiet),
    )
    _emit(summary)
