"""The `tagpipe` command line (typer): the top layer. Each command is a thin shell over a
Python API of the layers below; a command's module registers it on the shared app.

common: the apps, shared options, setup, result printing, one-line failures.
table_commands: tag, rethreshold, nightly, vacuum. corpus_commands: dedup, split,
report, audit, export. label_commands: compare-tags. review_commands: review.
model_commands: `tagpipe model ...` and `tagpipe demo`. docs: the README's options
tables and the example configs, generated from the settings models
(`python -m pipeline.cli.docs --write`).
"""

# Commands are listed in --help in the order their modules register them.
# isort: off
from pipeline.cli import table_commands  # noqa: F401
from pipeline.cli import corpus_commands  # noqa: F401
from pipeline.cli import label_commands  # noqa: F401
from pipeline.cli import review_commands  # noqa: F401
from pipeline.cli import model_commands  # noqa: F401

# isort: on
from pipeline.cli.common import app, main

__all__ = ["app", "main"]
