"""`tagpipe review`: a ranked queue of the images most worth a human look, and its page."""

from __future__ import annotations

from pipeline.cli.common import (
    LogFormatOption,
    Quiet,
    Verbose,
    app,
    configure_output,
    emit_result,
    settings_options,
)
from pipeline.core.errors import TagpipeError
from pipeline.core.logs import LogFormat
from pipeline.core.settings import build
from pipeline.corpus.review import ReviewSettings


@app.command(short_help="A ranked review queue (JSONL/CSV) and its HTML page.")
@settings_options(ReviewSettings)
def review(
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
    given: dict | None = None,
) -> None:
    """Rank the images most worth a human look (likely-wrong or likely-missing human tags,
    uncertain tags, out-of-distribution images) into a queue file with an empty `decision`
    field per row, and a self-contained HTML page of thumbnails beside it (same name, .html)."""
    from pipeline.corpus.review import run_review

    configure_output(verbose, quiet, log_format)
    given = dict(given or {})
    for name in ("tags", "kind", "out"):
        if name not in given:
            raise TagpipeError(f"--{name} is required (tagpipe review -h)")
    emit_result(run_review(build(ReviewSettings, given)))
