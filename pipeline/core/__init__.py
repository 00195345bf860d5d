"""The base layer: what every other layer may use and nothing here imports from them.

The one ErrorKind enum and the project's exceptions (errors), the declared Arrow schema of
every table that crosses a boundary (schemas), logging and progress reporting, and the Ray
session (joining a cluster or starting a local one). Nothing in core knows about images,
models or tables.
"""
