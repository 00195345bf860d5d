"""The base layer: what every other layer may use and nothing here imports from them.

errors: the one ErrorKind enum, the exit statuses and the project's exceptions. schemas:
the declared Arrow schema of every table that crosses a boundary. settings: typed
settings as pydantic models, from which the CLI options, README tables and example
configs derive. logs and progress: how a run talks (levels, text or JSON lines; a bar or a
log line). ray_session: joining a cluster or starting a local Ray, and a run's id.
arrays: set operations on integer id arrays. words: counts in the words a user reads.
Nothing in core knows about images, models or tables.
"""
