"""`tagpipe compare-tags`: source (human) tags checked against the model's probabilities."""

from __future__ import annotations

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
from pipeline.corpus.label_settings import CompareTagsSettings


@app.command("compare-tags", short_help="Source (human) tags against the model: likely missing and wrong.")
@settings_options(CompareTagsSettings, required=True)
def compare_tags(
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

    configure_output(verbose, quiet, log_format)
    settings = build(CompareTagsSettings, dict(given or {}))
    summary = run_interruptible(
        run_compare_tags,
        settings.tags,
        settings.model,
        settings.source_tags,
        settings.aliases,
        settings.label_check(),
        settings.storage_options,
        settings.ray_address,
        settings.run_id,
        ProgressSettings(enabled=not quiet),
    )
    emit_result(summary)
