"""`python -m pipeline.cli`: the tagpipe command."""

from pipeline.cli import main

main()
