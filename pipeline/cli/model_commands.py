"""The `tagpipe model ...` commands (bundles: pull, inspect, profile, demo, expose the
embedding, fit OOD) and `tagpipe demo`.

Each command's arguments and options come from its settings' fields, defined beside the
work they drive (pipeline/model/describe.py, hub.py, profile_import.py, onnx_tools.py,
pipeline/corpus/ood.py, pipeline/demo/end_to_end.py and model.py).
"""

from __future__ import annotations

import typer

from pipeline.cli.common import (
    Quiet,
    Verbose,
    app,
    configure_output,
    emit_result,
    model_app,
    settings_options,
)
from pipeline.core.settings import build
from pipeline.corpus.ood import FitOodSettings
from pipeline.demo.end_to_end import DemoSettings
from pipeline.demo.model import DemoBundleSettings
from pipeline.model.describe import InspectSettings
from pipeline.model.hub import PullSettings
from pipeline.model.onnx_tools import ExposeEmbeddingSettings
from pipeline.model.profile_import import ProfileImportSettings


@app.command(short_help="Demo model and corpus, tagged and checked.")
@settings_options(DemoSettings)
def demo(verbose: Verbose = False, quiet: Quiet = False, given: dict | None = None) -> None:
    """Build the demo model and corpus, tag them on a local Ray, and check the tags."""
    from pipeline.demo.end_to_end import run_demo

    configure_output(verbose, quiet)
    settings = build(DemoSettings, given or {})
    result = run_demo(settings.workdir, images_per_kind=settings.images_per_kind)
    typer.echo(result.summary.text())
    typer.echo(f"model:   {result.model_dir}")
    typer.echo(f"corpus:  {result.corpus_dir / 'images'}")
    typer.echo(
        f"tags:    {result.tags_dir}  (a versioned Parquet table: pipeline.table.read_current, "
        "or DuckDB via _current.json; see README)"
    )
    typer.echo(
        f"check:   {result.correct}/{result.checked} rows match the corpus's known tags "
        "(broken files as error rows)"
    )
    typer.echo(
        f"report:  {result.report}  (open it in a browser; duplicate clusters in {result.workdir / 'dedup'}, "
        f"splits in {result.workdir / 'splits'})"
    )
    for rel, tags, error in result.wrong[:10]:
        typer.echo(f"  mismatch {rel}: tags={tags} error={error}")
    if result.duplicates is not None:
        typer.echo(f"check:   {result.duplicates.text()}")
        for cluster in (result.duplicates.mixed_clusters or [])[:5]:
            typer.echo(f"  cluster {cluster[:16]} holds images of two kinds")
    if result.correct != result.checked or (result.duplicates is not None and not result.duplicates.ok):
        raise typer.Exit(1)


@model_app.command("inspect", short_help="What a bundle holds.")
@settings_options(InspectSettings)
def model_inspect(given: dict | None = None) -> None:
    """Inputs/outputs, tag counts per category, optional files, profile and fingerprint."""
    from pipeline.model.describe import describe_bundle

    configure_output()
    settings = build(InspectSettings, given or {})
    typer.echo(describe_bundle(settings.directory, settings.profile))


@model_app.command("profile", short_help="Write a profile from a timm or Hugging Face config.")
@settings_options(ProfileImportSettings, required=True)
def model_profile(given: dict | None = None) -> None:
    """Read the model's own preprocessing config and write a tagpipe profile for it.

    The ONNX file beside the config gives the input name, layout and output; every
    config setting that would change pixels and has no profile field stops the import by
    name. `tag` and `model inspect` import such a folder by themselves when it has no
    profile; this command writes the profile down so it can be read and edited."""
    from pipeline.model.profile_import import write_profile

    configure_output()
    settings = build(ProfileImportSettings, given or {})
    written = write_profile(
        settings.source, settings.output, overwrite=settings.overwrite, **settings.import_options()
    )
    if written is not None:
        typer.echo(f"profile written to {written}", err=True)


@model_app.command("pull", short_help="Download a supported tagger from the Hub.")
@settings_options(PullSettings)
def model_pull(given: dict | None = None) -> None:
    """Download a supported tagger (WD v3, JoyTag, CL Tagger, JTP-1) into a bundle folder.

    Honours HF_ENDPOINT and HF_TOKEN; records the repository, commit and file hashes
    in tagpipe_source.json. The bundle is checked before it is moved into place."""
    from pipeline.model.hub import pull_model

    configure_output()
    settings = build(PullSettings, given or {})
    emit_result(pull_model(settings.repo_id, settings.directory, settings.revision, settings.subfolder))


@model_app.command("demo", short_help="Write the demo tagger bundle.")
@settings_options(DemoBundleSettings)
def model_demo(given: dict | None = None) -> None:
    """Write the demo tagger (CL Tagger v2 contract): the model, its external weights and four side files."""
    from pipeline.demo.model import write_demo_bundle
    from pipeline.storage.filesystem import staged_folder

    directory = build(DemoBundleSettings, given or {}).directory
    with staged_folder(directory) as staging:  # a failure leaves nothing; an existing folder is refused
        write_demo_bundle(staging)
    typer.echo(f"demo bundle written to {directory}")


@model_app.command("expose-embedding", short_help="Copy a model with an embedding output.")
@settings_options(ExposeEmbeddingSettings)
def model_expose_embedding(given: dict | None = None) -> None:
    """Copy a model with an extra `embedding` output: the pooled vector feeding the head."""
    from pipeline.model.onnx_tools import expose_embedding

    settings = build(ExposeEmbeddingSettings, given or {})
    path = expose_embedding(settings.src, settings.dst, tensor=settings.tensor, profile=settings.profile)
    typer.echo(f"wrote {path} with output 'embedding'")


@model_app.command("fit-ood", short_help="Fit an OOD reference from tagged rows.")
@settings_options(FitOodSettings, required=True)
def model_fit_ood(given: dict | None = None) -> None:
    """Fit an OOD reference (mean, Ledoit-Wolf covariance inverse, p50, p95) from tagged rows."""
    from pipeline.corpus.ood import fit_ood

    configure_output()
    settings = build(FitOodSettings, given or {})
    model_sha256 = None
    if settings.model:
        from pipeline.model.bundle import load_bundle

        model_sha256 = load_bundle(settings.model).fingerprint.model_sha256  # a bad bundle stops here
    reference = fit_ood(settings.tags, settings.output, settings.storage_options, model_sha256)
    typer.echo(
        f"wrote {settings.output}: {reference['mu'].shape[0]}-d reference, "
        f"p50 {float(reference['p50']):.3f}, p95 {float(reference['p95']):.3f}"
    )
