"""The commands over a tagged corpus: dedup, split, report, audit, export (and its supplement mode)."""

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
from pipeline.core.errors import TagpipeError
from pipeline.core.logs import LogFormat
from pipeline.corpus.drift import DriftSettings


@app.command(short_help="Exact and near-duplicate clusters.")
def dedup(
    tags: str = typer.Option(..., "--tags", help="A tag output directory (uri, sha256, phash)."),
    output: str = typer.Option(
        ..., "--output", "-o", help="Directory for clusters.parquet and _summary.json."
    ),
    max_distance: int = typer.Option(
        6, help="Near duplicates: phash Hamming distance <= this (see docs/decisions.md)."
    ),
    embedding_threshold: str = typer.Option(
        "auto",
        help="Near duplicates by the tagger's embedding: cosine >= this; 'auto' chooses it per corpus "
        "(at most 1 expected false edge per 10,000 rows over the pairs the search compares, then as far "
        "from it towards the known copies as recall allows); 'off'.",
    ),
    full: bool = typer.Option(
        False,
        "--full",
        help="Rebuild the index in OUTPUT/_index from scratch (default: update it with the rows that "
        "changed since its last version).",
    ),
    partitions: int = typer.Option(
        1,
        min=1,
        help="Search the index as this many partitions, each a Ray actor on the node that holds it "
        "(a full build cuts its vectors into this many segments); 1: in this process, no Ray.",
    ),
    storage_options: StorageOptions = None,
    ray_address: str | None = typer.Option(
        None, help="The Ray cluster the partitions run on (default: a local Ray; only with --partitions > 1)."
    ),
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
) -> None:
    """Exact (sha256), near (phash) and embedding duplicate clusters, with a stable cluster_id."""
    from pipeline.corpus.dedup import parse_embedding_threshold, run_dedup

    _setup(verbose, quiet, log_format)
    threshold = parse_embedding_threshold(embedding_threshold)
    summary = run_dedup(
        tags,
        output,
        max_distance,
        _storage_options(storage_options),
        ray_address,
        threshold,
        full,
        partitions,
    )
    _emit(summary)
    for giant in summary.giant_clusters:
        typer.echo(
            f"warning: giant cluster {giant['cluster_id'][:16]}: {giant['size']} images, "
            f"{giant['diameter_hops']} hops across, ends {giant['spread_bits']} bits apart"
        )


@app.command(short_help="Leakage-free train/val/test splits by cluster.")
def split(
    tags: str = typer.Option(..., "--tags", help="A tag output directory."),
    dedup: str = typer.Option(..., "--dedup", help="A dedup output directory (clusters.parquet)."),
    output: str = typer.Option(..., "--output", "-o", help="Directory for splits.parquet and _report.json."),
    ratios: str = typer.Option(
        "train=0.9,val=0.05,test=0.05", help="Shares by name; must include train and sum to 1."
    ),
    seed: int = typer.Option(0, help="Changes which clusters go where; the same seed gives the same split."),
    previous: str | None = typer.Option(
        None, help="A previous splits.parquet (or its directory): assigned images keep their split."
    ),
    exclude: list[str] = typer.Option(
        None, help="An existing training set (tagpipe output or Parquet/CSV with sha256/phash); repeatable."
    ),
    max_distance: int = typer.Option(6, help="Radius for --exclude matches (use the dedup radius)."),
    min_count: int = typer.Option(
        5, help="Report tags with at least this many positives overall and none in a split."
    ),
    stratify: bool = typer.Option(
        False,
        "--stratify",
        help="Iterative multi-label stratification at cluster level (else a hash per cluster).",
    ),
    min_val_positives: int = typer.Option(
        0,
        help="With --stratify: each tag frequent enough gets at least this many val positives "
        "(JoyTag used 5).",
    ),
    group_column: str | None = typer.Option(
        None,
        help="Images sharing this --metadata column's value (a post, parent, artist) never cross splits.",
    ),
    metadata: str | None = typer.Option(None, help="Parquet or CSV with uri and the --group-column column."),
    storage_options: StorageOptions = None,
) -> None:
    """Assign whole duplicate clusters (and metadata groups) to train/val/test, stable across nightly runs."""
    from pipeline.corpus.split import parse_ratios, run_split

    _setup()
    prev = (
        previous
        if previous is None or previous.endswith(".parquet")
        else previous.rstrip("/") + "/splits.parquet"
    )
    report = run_split(
        tags,
        dedup,
        output,
        parse_ratios(ratios),
        seed,
        prev,
        list(exclude or []),
        max_distance,
        min_count,
        _storage_options(storage_options),
        stratify,
        min_val_positives,
        group_column,
        metadata,
    )
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
    from pipeline.core.settings import build
    from pipeline.corpus.report import build_report

    _setup(verbose, quiet, log_format)
    settings = build(DriftSettings, given or {})
    options = _storage_options(storage_options)
    _emit(build_report(tags, output, dedup, split, options, title, compare_version, settings))


@app.command(short_help="Eval images that copy or nearly copy train images.")
def audit(
    train: str = typer.Option(
        ...,
        "--train",
        help="Training set: a tagpipe output, or Parquet/CSV with sha256, phash and/or embedding.",
    ),
    eval: str = typer.Option(
        ..., "--eval", help="Evaluation set, same forms (a split output: its val/test rows)."
    ),
    tags: str | None = typer.Option(
        None, "--tags", help="The tag table a split output came from: its phash flags and embeddings."
    ),
    max_distance: int = typer.Option(
        6, help="A leak by phash: within this many bits of a train image (reliable hashes only)."
    ),
    embedding_threshold: str = typer.Option(
        "auto",
        help="A leak by embedding: cosine >= this; 'auto' chooses it from the data; 'off'. "
        "Use dedup's value to audit what dedup kept together.",
    ),
    output: str | None = typer.Option(
        None, "--output", "-o", help="Also write leaks.parquet and audit.json here."
    ),
    dedup: str | None = typer.Option(
        None,
        "--dedup",
        help="The dedup output the split was made from: embeddings are searched in its index (with a "
        "cosine threshold), and with --output only what changed since the last audit written there.",
    ),
    storage_options: StorageOptions = None,
    show: int = typer.Option(20, help="Leaks to list on the terminal."),
) -> None:
    """List eval images that are copies or near-duplicates of train images, by sha256,
    phash and embedding, and what could not be checked; exit status 1 on leaks."""
    from pipeline.corpus.audit import run_audit
    from pipeline.corpus.dedup import parse_embedding_threshold

    _setup()
    threshold = parse_embedding_threshold(embedding_threshold)
    leaks, report = run_audit(
        train, eval, max_distance, output, _storage_options(storage_options), tags, threshold, dedup
    )
    for row in leaks.slice(0, show).to_pylist():
        if row["signal"] == "sha256":
            how = "same bytes"
        elif row["signal"] == "phash":
            how = f"phash {row['distance']} bits"
        else:
            how = f"cosine {row['cosine']:.4f}"
        typer.echo(f"leak ({how}): {row['eval_uri']} ~ {row['train_uri']}")
    _emit(report)
    if report.leaks:
        raise typer.Exit(1)


@app.command(short_help="Captions, JSONL or Dart v2 prompts from a table.")
def export(
    tags: str = typer.Option(..., "--tags", help="A tag output directory (local or s3://)."),
    output: str = typer.Option(..., "--output", "-o", help="Where the files go."),
    format: str = typer.Option(
        "captions", "--format", "-f", help="captions (one .txt per image) | jsonl | dart (Dart v2 prompts)."
    ),
    relative_to: str | None = typer.Option(
        None, help="Captions: image paths are taken relative to this (default: their common folder)."
    ),
    spaces: bool = typer.Option(False, "--spaces/--underscores", help="Tag text with spaces or underscores."),
    escape_parentheses: bool = typer.Option(
        False, "--escape-parentheses", help="Write ( ) as \\( \\) (prompt emphasis syntax)."
    ),
    exclude: list[str] = typer.Option(
        None, "--exclude", "--undesired", help="A tag to leave out; repeatable."
    ),
    with_rating: bool = typer.Option(
        True, "--with-rating/--without-rating", help="Captions keep the rating/quality tags."
    ),
    caption_extension: str = typer.Option(".txt", help="Captions: the caption file's extension."),
    separator: str = typer.Option(", ", help="Captions: what goes between tags."),
    always_first: list[str] = typer.Option(
        None, help="Captions: a tag (trigger word) put first when present; repeatable, in order."
    ),
    character_first: bool = typer.Option(
        False, "--character-first", help="Captions: character tags before the others."
    ),
    rating: str = typer.Option(
        "inline", help="Captions: the rating tag inline (by score), first, last, or omit."
    ),
    replace: list[str] = typer.Option(None, help="Captions: OLD=NEW, write tag OLD as NEW; repeatable."),
    character_expand: bool = typer.Option(
        False, "--character-expand", help="Captions: name_(series) becomes two tags, name and series."
    ),
    append: bool = typer.Option(
        False, "--append", help="Captions: merge into existing caption files, no tag twice."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace files that already exist (else the export refuses)."
    ),
    skip_existing: bool = typer.Option(
        False, "--skip-existing", help="Leave files that already exist as they are."
    ),
    supplement: bool = typer.Option(
        False,
        "--supplement",
        help="The human tags (source_tags) merged with the model's, with provenance per tag in JSONL; "
        "tags the label check doubts (likely_wrong) left out unless a reviewer accepted them.",
    ),
    decisions: list[str] = typer.Option(
        None,
        "--decisions",
        help="With --supplement: a `tagpipe review` queue file with its decision field filled; repeatable.",
    ),
    storage_options: StorageOptions = None,
) -> None:
    """Write caption sidecars, JSONL, or Dart v2 prompts from a tag output."""
    from pipeline.corpus.export import CaptionOptions, TextOptions, export_tags
    from pipeline.corpus.supplement import Decisions

    _setup()
    text = TextOptions(
        spaces=spaces,
        escape_parentheses=escape_parentheses,
        exclude=frozenset(exclude or ()),
        with_rating=with_rating,
    )
    pairs = []
    for item in replace or []:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise TagpipeError(f"--replace {item!r}: expected OLD=NEW, e.g. 1girl=girl")
        pairs.append((old, new))
    caption = CaptionOptions(
        extension=caption_extension,
        separator=separator,
        always_first=tuple(always_first or ()),
        character_first=character_first,
        rating=rating,
        replace=tuple(pairs),
        character_expand=character_expand,
        append=append,
    )
    if not with_rating and rating != "inline":
        raise TagpipeError(f"--without-rating leaves the rating out: it cannot also go --rating {rating}")
    if sum((append, overwrite, skip_existing)) > 1:
        raise TagpipeError("--append, --overwrite and --skip-existing exclude each other: give one")
    if decisions and not supplement:
        raise TagpipeError("--decisions applies to --supplement exports: add --supplement")
    options = _storage_options(storage_options)
    merge = Decisions.read(list(decisions or []), options) if supplement else None
    existing = "refuse"
    if overwrite:
        existing = "overwrite"
    elif skip_existing:
        existing = "skip"
    _emit(export_tags(tags, output, format, text, relative_to, options, caption, existing, merge))
