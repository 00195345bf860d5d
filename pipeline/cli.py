"""The `tagpipe` command line (typer). Each command is a thin shell over a Python API.

Help is rendered without rich markup (rich_markup_mode=None), so every bracket in a
help text shows as written; defaults typer prints itself are not repeated in the text.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated

import typer

from pipeline import __version__
from pipeline.core.errors import TagpipeError
from pipeline.core.logs import LogFormat, Verbosity

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=CONTEXT,
    help="Label image corpora with ONNX taggers on Ray.",
)
model_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=CONTEXT,
    help="Model bundles: pull from the Hub, inspect, build the demo, expose the embedding.",
)
app.add_typer(model_app, name="model")

# Options several commands share, defined once (tag and rethreshold take the same rules).
StorageOptions = Annotated[str | None, typer.Option(help="fsspec storage options as JSON.")]
Threshold = Annotated[float | None, typer.Option(help="Global tag threshold; default the profile's.")]
CategoryThreshold = Annotated[
    list[str] | None,
    typer.Option(
        "--category-thresholds",
        "--category-threshold",
        help="CATEGORY=VALUE, e.g. character=0.85; repeatable.",
    ),
]
PerTagThresholds = Annotated[
    bool | None,
    typer.Option("--per-tag-thresholds/--no-per-tag-thresholds", help="Use the bundle's best_thr per tag."),
]
Mcut = Annotated[
    list[str] | None,
    typer.Option(
        "--mcut-categories", "--mcut", help="Threshold this category by MCut (largest score gap); repeatable."
    ),
]
MaxTags = Annotated[
    int | None, typer.Option(help="At most this many threshold-selected tags per image (by score).")
]
ExcludeTags = Annotated[list[str] | None, typer.Option("--exclude", help="A tag never to emit; repeatable.")]
Calibrate = Annotated[
    bool | None,
    typer.Option(
        "--calibrate/--no-calibrate", help="Apply the bundle's calibration table (on when present)."
    ),
]
OodCut = Annotated[
    float | None,
    typer.Option(help="Flag ood above this Mahalanobis distance (default: the reference's p95)."),
]
# How a command talks (pipeline/core/logs.py).
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Also Ray's and the libraries' INFO lines.")]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="Only warnings, errors and the result; no progress.")
]
LogFormatOption = Annotated[
    LogFormat,
    typer.Option("--log-format", help="text, or json: one JSON object per log line and for the result."),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tagpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Label image corpora with ONNX taggers on Ray."""


def _storage_options(text: str | None) -> dict | None:
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError as exc:
        raise TagpipeError(f"--storage-options is not valid JSON: {exc}") from None


def _setup(verbose: bool = False, quiet: bool = False, log_format: LogFormat = LogFormat.TEXT) -> None:
    from pipeline.core import logs

    if verbose and quiet:
        raise TagpipeError("--verbose and --quiet contradict each other: give one")
    logs.configure(
        Verbosity.VERBOSE if verbose else Verbosity.QUIET if quiet else Verbosity.NORMAL, log_format
    )
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # tagpipe draws its own
    except ImportError:  # pragma: no cover
        pass


def _emit(result) -> None:
    """A command's result: its text line, or with --log-format json one JSON object."""
    from pipeline.core import logs
    from pipeline.table.tag_table import json_value

    if logs.json_output():
        payload = asdict(result) if is_dataclass(result) else {"text": result.text()}
        typer.echo(json.dumps({"result": type(result).__name__, **payload}, default=json_value))
    else:
        typer.echo(result.text())


@app.command(short_help="Tag images into a versioned Parquet table.")
def tag(
    input: list[str] = typer.Option(
        None,
        "--inputs",
        "--input",
        "-i",
        help="Prefix, image file or manifest (.parquet/.csv/.txt); repeatable.",
    ),
    output: str | None = typer.Option(
        None, "--output", "-o", help="Output directory (local path or s3://...)."
    ),
    model: str | None = typer.Option(None, "--model", "-m", help="Model bundle directory."),
    profile: str | None = typer.Option(
        None, help="Profile name or .toml file; default: detected from the bundle."
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="TOML config file with a [tag] table (see configs/); options given here win.",
    ),
    batch_size: int | None = typer.Option(None, help="Images per model call (default 32)."),
    tagger_actors: int | None = typer.Option(
        None, "--tagger-actors", "--actors", help="Tagger actors, one ONNX session each (default 1)."
    ),
    gpus_per_actor: float | None = typer.Option(
        None, help="GPUs per tagger actor (default 1); CPU fallback without GPUs."
    ),
    tagger_cpus: float | None = typer.Option(
        None, help="CPUs per tagger actor, its threads on CPU (default 1)."
    ),
    batches_in_flight: int | None = typer.Option(
        None,
        help="Batches one tagger actor works on at once, so its CPU work overlaps the model's (default 2 on GPU, 1 on CPU).",
    ),
    decode_cpus: float | None = typer.Option(None, help="CPUs per decode task (default 1)."),
    decode_batch_size: int | None = typer.Option(None, help="Images per decode call (default 16)."),
    max_file_bytes: int | None = typer.Option(
        None, help="Files larger than this are error rows (too_large), never read whole (default 536870912)."
    ),
    decode_timeout: float | None = typer.Option(
        None, help="Seconds one image may take to decode, then it is an error row; 0: no limit (default 60)."
    ),
    batch_timeout: float | None = typer.Option(
        None,
        help="Seconds one model call may take, then its rows are error rows (retried by the next run); 0: no limit (default 600).",
    ),
    rows_per_part: int | None = typer.Option(
        None, help="Rows per output part file, the commit unit (default 4096)."
    ),
    ray_address: str | None = typer.Option(
        None, help="Ray cluster address or 'auto'; default a local Ray (or RAY_ADDRESS)."
    ),
    storage_options: StorageOptions = None,
    exact_decode: bool | None = typer.Option(
        None,
        "--exact-decode/--fast-decode",
        help="Full-size decode, or DCT-scaled JPEG decode (default fast).",
    ),
    max_pixels: int | None = typer.Option(
        None,
        help="Refuse images declaring more pixels than this, in any frame, tile or sub-image (default 120000000).",
    ),
    max_decode_memory: int | None = typer.Option(
        None,
        help="Bytes one image's decode may add to its worker, then it is a too_large row; 0: no limit (default 2 GiB).",
    ),
    extension: list[str] | None = typer.Option(
        None,
        "--extensions",
        "--extension",
        help="List only files with this extension under a prefix (e.g. jpg); repeatable (default: every file).",
    ),
    list_sidecars: bool | None = typer.Option(
        None,
        "--list-sidecars/--skip-sidecars",
        help="List caption and metadata files beside the images (.txt .caption .json .npz .toml .yaml) as inputs (default: skip them).",
    ),
    draft_ratio: float | None = typer.Option(
        None, help="Fast decode keeps at least this times the model's resolution; 1 is fastest (default 2)."
    ),
    normalise_in_graph: bool | None = typer.Option(
        None,
        "--normalise-in-graph/--normalise-in-numpy",
        help="Feed the model uint8 through prepended Cast/scale nodes (default in graph).",
    ),
    provider: str | None = typer.Option(None, help="auto, cpu, cuda or tensorrt (default auto)."),
    threshold: Threshold = None,
    logit_floor: float | None = typer.Option(
        None, help="Store logits of tags with probability >= this (default 0.01)."
    ),
    dense_logits: bool | None = typer.Option(
        None,
        "--dense-logits/--sparse-logits",
        help="Store every logit, so every tag's probability is in every row (default: when the model has at most --dense-logits-max-tags tags).",
    ),
    dense_logits_max_tags: int | None = typer.Option(
        None, help="Vocabularies this small store every logit unless --sparse-logits (default 4096)."
    ),
    run_id: str | None = typer.Option(None, help="Run id; default a timestamp."),
    max_delete_fraction: float | None = typer.Option(
        None, help="Refuse to drop more than this share of the table's rows, a lost input? (default 0.2)."
    ),
    category_threshold: CategoryThreshold = None,
    per_tag_thresholds: PerTagThresholds = None,
    mcut: Mcut = None,
    max_tags: MaxTags = None,
    exclude: ExcludeTags = None,
    calibrate: Calibrate = None,
    ood_cut: OodCut = None,
    progress: bool | None = typer.Option(
        None,
        "--progress/--no-progress",
        help="A bar on a terminal, else a line every --progress-interval seconds (default on).",
    ),
    progress_interval: float | None = typer.Option(
        None, help="Seconds between progress lines off a terminal (default 30)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List and compare with the table, print the plan; tag and write nothing."
    ),
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
) -> None:
    """Tag every image under the inputs into a versioned Parquet table, one row per image.

    Against an existing table only new, changed and transiently failed images are
    tagged, deleted ones are dropped, and a new version is committed at the end; a
    new model (or decode settings) re-tags everything, new thresholds rethreshold."""
    from pipeline.job.settings import load_config_file, make_tag_config
    from pipeline.job.tag_job import run_tag_job

    _setup(verbose, quiet, log_format)
    file_values = load_config_file(config) if config else {}
    cfg = make_tag_config(
        file_values,
        inputs=input or None,
        output=output,
        model=model,
        profile=profile,
        batch_size=batch_size,
        tagger_actors=tagger_actors,
        gpus_per_actor=gpus_per_actor,
        tagger_cpus=tagger_cpus,
        batches_in_flight=batches_in_flight,
        decode_cpus=decode_cpus,
        decode_batch_size=decode_batch_size,
        max_file_bytes=max_file_bytes,
        decode_timeout=decode_timeout,
        batch_timeout=batch_timeout,
        rows_per_part=rows_per_part,
        ray_address=ray_address,
        storage_options=storage_options,
        exact_decode=exact_decode,
        max_pixels=max_pixels,
        max_decode_memory=max_decode_memory,
        extensions=list(extension) if extension else None,
        list_sidecars=list_sidecars,
        draft_ratio=draft_ratio,
        normalise_in_graph=normalise_in_graph,
        provider=provider,
        threshold=threshold,
        logit_floor=logit_floor,
        dense_logits=dense_logits,
        dense_logits_max_tags=dense_logits_max_tags,
        run_id=run_id,
        max_delete_fraction=max_delete_fraction,
        progress=False if quiet else progress,
        progress_interval=progress_interval,
        **_rule_options(category_threshold, per_tag_thresholds, mcut, max_tags, exclude, calibrate, ood_cut),
    )
    _emit(_interruptible(run_tag_job, cfg, dry_run=dry_run))


def _interruptible(run, *args, **kwargs):
    """Run a job; on Ctrl-C print what was kept and how to resume, and exit 130."""
    from pipeline.job.tag_job import RunInterrupted

    try:
        return run(*args, **kwargs)
    except KeyboardInterrupt:  # before tagging began, or after (dedup, split, audit)
        from pipeline.core import logs

        text = "interrupted: nothing more was committed; the table is at its last completed version. Run the same command again to go on."
        typer.echo(json.dumps({"level": "error", "message": text}) if logs.json_output() else text, err=True)
        raise typer.Exit(130) from None
    except RunInterrupted as stopped:
        from pipeline.core import logs

        line = (
            json.dumps({"level": "error", "message": f"interrupted: {stopped}"})
            if logs.json_output()
            else f"interrupted: {stopped}"
        )
        typer.echo(line, err=True)
        raise typer.Exit(130) from None


def _rule_options(
    category_threshold, per_tag_thresholds, mcut, max_tags, exclude, calibrate, ood_cut
) -> dict:
    """CLI threshold options as config fields (None: not given)."""
    categories = None
    if category_threshold:
        categories = {}
        for item in category_threshold:
            name, sep, value = item.partition("=")
            try:
                categories[name.strip().lower()] = float(value)
            except ValueError:
                raise TagpipeError(
                    f"--category-threshold {item!r}: expected CATEGORY=VALUE, e.g. character=0.85"
                ) from None
            if not sep or not name.strip():
                raise TagpipeError(
                    f"--category-threshold {item!r}: expected CATEGORY=VALUE, e.g. character=0.85"
                )
    return dict(
        category_thresholds=categories,
        per_tag_thresholds=per_tag_thresholds,
        mcut_categories=[m.lower() for m in mcut] if mcut else None,
        max_tags=max_tags,
        exclude=list(exclude) if exclude else None,
        calibrate=calibrate,
        ood_cut=ood_cut,
    )


@app.command(short_help="Re-tag stored rows with new thresholds (no model run).")
def rethreshold(
    tags: str = typer.Option(..., "--tags", help="A tag output directory (local or s3://)."),
    model: str = typer.Option(
        ..., "--model", "-m", help="The bundle that made it (its calibration/OOD files may be new)."
    ),
    output: str | None = typer.Option(
        None, "--output", "-o", help="A new table for the result; default: a new version of --tags itself."
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML config with a [tag] table: its threshold settings apply."
    ),
    threshold: Threshold = None,
    logit_floor: float | None = typer.Option(
        None, help="Only tags stored at or above this probability are candidates (default 0.01)."
    ),
    category_threshold: CategoryThreshold = None,
    per_tag_thresholds: PerTagThresholds = None,
    mcut: Mcut = None,
    max_tags: MaxTags = None,
    exclude: ExcludeTags = None,
    calibrate: Calibrate = None,
    ood_cut: OodCut = None,
    storage_options: StorageOptions = None,
    ray_address: str | None = typer.Option(None, help="Ray cluster address or 'auto'; default a local Ray."),
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
) -> None:
    """Re-tag stored rows from their sparse logits with new thresholds: no model run."""
    from pipeline.job.rethreshold import run_rethreshold
    from pipeline.job.settings import load_config_file, make_tag_config, tag_rules

    _setup(verbose, quiet, log_format)
    file_values = load_config_file(config) if config else {}
    cfg = make_tag_config(
        file_values,
        inputs=[tags],
        output=output or tags,
        model=model,
        threshold=threshold,
        logit_floor=logit_floor,
        storage_options=storage_options,
        ray_address=ray_address,
        **_rule_options(category_threshold, per_tag_thresholds, mcut, max_tags, exclude, calibrate, ood_cut),
    )
    _emit(run_rethreshold(tags, model, output, tag_rules(cfg), cfg.storage_options, cfg.ray_address))


@app.command(short_help="Tag what changed, then dedup, split and audit.")
def nightly(
    config: Path = typer.Option(
        ...,
        "--config",
        "-c",
        help="TOML file with [tag] and [nightly] tables (configs/nightly.example.toml).",
    ),
    run_id: str | None = typer.Option(None, help="Run id; default a timestamp."),
    ray_address: str | None = typer.Option(
        None, help="Ray cluster address or 'auto'; default a local Ray (or RAY_ADDRESS)."
    ),
    max_delete_fraction: float | None = typer.Option(
        None, help="Override [tag] max_delete_fraction for this run (1 accepts any deletion)."
    ),
    progress: bool | None = typer.Option(
        None,
        "--progress/--no-progress",
        help="A bar on a terminal, else a line every progress_interval seconds (default on).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the tag step's plan; tag, dedup, split and write nothing."
    ),
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
) -> None:
    """Tag what is new or changed, drop what is gone, then refresh dedup, splits
    (stable: --previous) and the leakage audit. Exits 1 when the audit finds leaks."""
    from pipeline.job.nightly import run_nightly
    from pipeline.job.settings import load_nightly_config
    from pipeline.job.tag_job import run_tag_job

    _setup(verbose, quiet, log_format)
    overrides = dict(run_id=run_id, ray_address=ray_address, max_delete_fraction=max_delete_fraction)
    cfg = load_nightly_config(config, progress=False if quiet else progress, **overrides)
    if dry_run:
        _emit(_interruptible(run_tag_job, cfg.tag, dry_run=True))
        return
    summary = _interruptible(run_nightly, cfg)
    _emit(summary)
    if summary.leaks and cfg.fail_on_leaks:
        raise typer.Exit(1)


@app.command(short_help="Delete parts no kept version uses.")
def vacuum(
    tags: str = typer.Option(..., "--tags", help="A tag table (local or s3://)."),
    keep_versions: int = typer.Option(
        2, help="Keep the parts of this many newest versions (the current one always)."
    ),
    grace_hours: float = typer.Option(
        24.0, help="Never delete unnamed parts younger than this: a running job may still commit them."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be deleted."),
    storage_options: StorageOptions = None,
) -> None:
    """Delete parts (and version records) that no kept version of the table uses."""
    from pipeline.table.tag_table import TagTable

    _setup()
    result = TagTable(tags, _storage_options(storage_options)).vacuum(keep_versions, grace_hours, dry_run)
    verb = "would delete" if dry_run else "deleted"
    typer.echo(
        f"vacuum: {verb} {result['parts_deleted']} parts, versions {result['versions_deleted'] or 'none'}, {result['tmp_deleted']} temp files; kept versions {result['versions_kept']}"
    )


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
        help="Near duplicates by the tagger's embedding: cosine >= this; 'auto' chooses it from the data (a 1e-6 false-match rate on random pairs); 'off'.",
    ),
    storage_options: StorageOptions = None,
    ray_address: str | None = typer.Option(
        None, help="Ray for large inputs (>= 1M rows): 'auto' or an address; default a local Ray."
    ),
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
) -> None:
    """Exact (sha256), near (phash) and embedding duplicate clusters, with a stable cluster_id."""
    from pipeline.corpus.dedup import parse_embedding_threshold, run_dedup

    _setup(verbose, quiet, log_format)
    threshold = parse_embedding_threshold(embedding_threshold)
    summary = run_dedup(tags, output, max_distance, _storage_options(storage_options), ray_address, threshold)
    _emit(summary)
    for giant in summary.giant_clusters:
        typer.echo(
            f"warning: giant cluster {giant['cluster_id'][:16]}: {giant['size']} images, {giant['diameter_hops']} hops across, ends {giant['spread_bits']} bits apart"
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
        help="With --stratify: each tag frequent enough gets at least this many val positives (JoyTag used 5).",
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
            f"bridge: cluster {bridge['cluster_id'][:16]} joins previous {'+'.join(bridge['previous_splits'])}: {bridge['held_out']} new image(s) held out"
        )


@app.command(short_help="One self-contained HTML report.")
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
    storage_options: StorageOptions = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormatOption = LogFormat.TEXT,
) -> None:
    """One self-contained HTML report: summary, tag frequency, scores, OOD, duplicates, splits, errors."""
    from pipeline.corpus.report import build_report

    _setup(verbose, quiet, log_format)
    _emit(build_report(tags, output, dedup, split, _storage_options(storage_options), title))


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
        help="A leak by embedding: cosine >= this; 'auto' chooses it from the data; 'off'. Use dedup's value to audit what dedup kept together.",
    ),
    output: str | None = typer.Option(
        None, "--output", "-o", help="Also write leaks.parquet and audit.json here."
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
        train, eval, max_distance, output, _storage_options(storage_options), tags, threshold
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
    storage_options: StorageOptions = None,
) -> None:
    """Write caption sidecars, JSONL, or Dart v2 prompts from a tag output."""
    from pipeline.corpus.export import CaptionOptions, TextOptions, export_tags

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
    existing = "overwrite" if overwrite else "skip" if skip_existing else "refuse"
    _emit(
        export_tags(
            tags, output, format, text, relative_to, _storage_options(storage_options), caption, existing
        )
    )


@app.command(short_help="Demo model and corpus, tagged and checked.")
def demo(
    workdir: Path = typer.Option(Path("tagpipe-demo"), help="Where the demo model, corpus and outputs go."),
    images_per_kind: int = typer.Option(3, help="Synthetic images per kind (12 kinds)."),
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Build the demo model and corpus, tag them on a local Ray, and check the tags."""
    from pipeline.demo.end_to_end import run_demo

    _setup(verbose, quiet)
    result = run_demo(workdir, images_per_kind=images_per_kind)
    typer.echo(result.summary.text())
    typer.echo(f"model:   {result.model_dir}")
    typer.echo(f"corpus:  {result.corpus_dir / 'images'}")
    typer.echo(
        f"tags:    {result.tags_dir}  (a versioned Parquet table: pipeline.table.tag_table.read_current, or DuckDB via _current.json; see README)"
    )
    typer.echo(
        f"check:   {result.correct}/{result.checked} rows match the corpus's known tags (broken files as error rows)"
    )
    typer.echo(
        f"report:  {result.report}  (open it in a browser; duplicate clusters in {result.workdir / 'dedup'}, splits in {result.workdir / 'splits'})"
    )
    for rel, tags, error in result.wrong[:10]:
        typer.echo(f"  mismatch {rel}: tags={tags} error={error}")
    if result.duplicates is not None:
        typer.echo(f"check:   {result.duplicates.text()}")
        for cluster in result.duplicates.mixed_clusters[:5]:
            typer.echo(f"  cluster {cluster[:16]} holds images of two kinds")
    if result.correct != result.checked or (result.duplicates is not None and not result.duplicates.ok):
        raise typer.Exit(1)


@model_app.command("inspect", short_help="What a bundle holds.")
def model_inspect(
    directory: Path = typer.Argument(..., help="Model bundle directory."),
    profile: str | None = typer.Option(None, help="Profile name or .toml file; default: detected."),
) -> None:
    """Inputs/outputs, tag counts per category, optional files, profile and fingerprint."""
    from pipeline.model.describe import describe_bundle

    _setup()
    typer.echo(describe_bundle(directory, profile))


@model_app.command("profile", short_help="Write a profile from a timm or Hugging Face config.")
def model_profile(
    source: Path = typer.Option(
        ...,
        "--from",
        help="A bundle folder, or its config: timm's config.json (pretrained_cfg) or preprocessor_config.json.",
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Where to write the profile; '-' prints it (default: tagpipe_profile.toml in the folder).",
    ),
    activation: str | None = typer.Option(
        None,
        help="What the model outputs: sigmoid, softmax, sigmoid_probabilities or softmax_probabilities (default: from the graph or config).",
    ),
    vocabulary: str | None = typer.Option(
        None, help="The class names file, relative to the folder (default: config.json's labels)."
    ),
    vocabulary_format: str | None = typer.Option(
        None, help="lines, wd_csv, cl_json, tag_index_json or config_labels."
    ),
    model_file: str | None = typer.Option(None, help="The .onnx file, when the folder holds several."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing profile file."),
) -> None:
    """Read the model's own preprocessing config and write a tagpipe profile for it.

    The ONNX file beside the config gives the input name, layout and output; every
    config setting that would change pixels and has no profile field stops the import by
    name. `tag` and `model inspect` import such a folder by themselves when it has no
    profile; this command writes the profile down so it can be read and edited."""
    from pipeline.model.profile_import import write_profile

    _setup()
    written = write_profile(
        source,
        output,
        activation=activation,
        vocabulary=vocabulary,
        vocabulary_format=vocabulary_format,
        model_file=model_file,
        overwrite=overwrite,
    )
    if written is not None:
        typer.echo(f"profile written to {written}", err=True)


@model_app.command("pull", short_help="Download a supported tagger from the Hub.")
def model_pull(
    repo_id: str = typer.Argument(
        ..., help="A Hugging Face model repository, e.g. SmilingWolf/wd-vit-tagger-v3."
    ),
    directory: Path = typer.Argument(..., help="A new folder for the bundle."),
    revision: str | None = typer.Option(None, help="A branch, tag or commit; default the main branch."),
    subfolder: str | None = typer.Option(None, help="The bundle's folder, for repositories holding several."),
) -> None:
    """Download a supported tagger (WD v3, JoyTag, CL Tagger, JTP-1) into a bundle folder.

    Honours HF_ENDPOINT and HF_TOKEN; records the repository, commit and file hashes
    in tagpipe_source.json. The bundle is checked before it is moved into place."""
    from pipeline.model.hub import pull_model

    _setup()
    _emit(pull_model(repo_id, directory, revision, subfolder))


@model_app.command("demo", short_help="Write the demo tagger bundle.")
def model_demo(directory: Path = typer.Argument(..., help="Where to write the demo bundle.")) -> None:
    """Write the demo tagger (CL Tagger v2 contract): the model, its external weights and four side files."""
    from pipeline.demo.model import write_demo_bundle
    from pipeline.storage.filesystem import staged_folder

    with staged_folder(directory) as staging:  # a failure leaves nothing; an existing folder is refused
        write_demo_bundle(staging)
    typer.echo(f"demo bundle written to {directory}")


@model_app.command("expose-embedding", short_help="Copy a model with an embedding output.")
def model_expose_embedding(
    src: Path = typer.Argument(..., help="Source model (.onnx) or bundle directory."),
    dst: Path = typer.Argument(..., help="Destination model file or bundle directory."),
    tensor: str | None = typer.Option(
        None, help="Name the tensor to expose instead of finding the head's input."
    ),
    profile: str | None = typer.Option(
        None,
        help="Profile name or .toml file naming the model and its logits; default: detected, or a bare folder's only .onnx.",
    ),
) -> None:
    """Copy a model with an extra `embedding` output: the pooled vector feeding the head."""
    from pipeline.model.onnx_tools import expose_embedding

    path = expose_embedding(src, dst, tensor=tensor, profile=profile)
    typer.echo(f"wrote {path} with output 'embedding'")


@model_app.command("fit-ood", short_help="Fit an OOD reference from tagged rows.")
def model_fit_ood(
    tags: str = typer.Option(..., "--tags", help="A tag output directory whose rows carry embeddings."),
    output: str = typer.Option(
        ..., "--output", "-o", help="The .npz to write (e.g. BUNDLE/model_ood_ref.npz)."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="The bundle the tags came from: checked against the rows."
    ),
    storage_options: StorageOptions = None,
) -> None:
    """Fit an OOD reference (mean, Ledoit-Wolf covariance inverse, p50, p95) from tagged rows."""
    from pipeline.corpus.ood import fit_ood

    _setup()
    model_sha256 = None
    if model:
        from pipeline.model.bundle import load_bundle

        model_sha256 = load_bundle(model).fingerprint.model_sha256  # a bad bundle stops here
    reference = fit_ood(tags, output, _storage_options(storage_options), model_sha256)
    typer.echo(
        f"wrote {output}: {reference['mu'].shape[0]}-d reference, p50 {float(reference['p50']):.3f}, p95 {float(reference['p95']):.3f}"
    )


def main() -> None:
    try:
        app(prog_name="tagpipe")
    except TagpipeError as exc:
        _fail(str(exc))
    except Exception as exc:  # an object store's failure becomes one line, others stay tracebacks
        from pipeline.storage.filesystem import storage_error_text

        text = storage_error_text(exc, [a for a in sys.argv[1:] if "://" in a] + _config_uris(sys.argv[1:]))
        if text is None:
            raise
        _fail(text)


def _fail(text: str) -> None:
    """One line on stderr, `error: ...` (a JSON object with --log-format json), exit 2."""
    from pipeline.core import logs

    if logs.json_output():
        typer.echo(json.dumps({"level": "error", "message": text}), err=True)
    else:
        typer.echo(f"error: {text}", err=True)
    sys.exit(2)


def _config_uris(args: list[str]) -> list[str]:
    """URIs named in a --config/-c file, so storage errors can name their buckets."""
    import re

    for flag, value in zip(args, args[1:]):
        if flag in ("--config", "-c"):
            try:
                return re.findall(r"[a-z0-9]+://[^\s\"',\]]+", Path(value).read_text(encoding="utf-8"))
            except OSError:
                return []
    return []


if __name__ == "__main__":
    main()
