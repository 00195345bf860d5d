"""The `tagpipe model ...` commands (bundles: pull, inspect, profile, demo, expose the
embedding, fit OOD) and `tagpipe demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import (
    Quiet,
    StorageOptions,
    Verbose,
    _emit,
    _setup,
    _storage_options,
    app,
    model_app,
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
        help="A bundle folder, or its config: timm's config.json (pretrained_cfg) "
        "or preprocessor_config.json.",
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Where to write the profile; '-' prints it (default: tagpipe_profile.toml in the folder).",
    ),
    activation: str | None = typer.Option(
        None,
        help="What the model outputs: sigmoid, softmax, sigmoid_probabilities or softmax_probabilities "
        "(default: from the graph or config).",
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
        help="Profile name or .toml file naming the model and its logits; default: detected, "
        "or a bare folder's only .onnx.",
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
        f"wrote {output}: {reference['mu'].shape[0]}-d reference, p50 {float(reference['p50']):.3f}, "
        f"p95 {float(reference['p95']):.3f}"
    )
