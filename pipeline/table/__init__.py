"""The versioned tag table: immutable Parquet parts, numbered versions, one exclusive commit.

tag_table: TagTable, Snapshot and the commit protocol every writer shares. version_fields:
what a version records besides its parts (its rules, its writer's counts), typed. labels: the
label sidecar (the source-tag check's columns, one file per part, keyed by uri) and its
join, which every read of a table goes through. rewrite: copies of parts without dropped
rows (and, given a function, transformed), as Ray tasks, named so a rerun finds them done.
reading: any input a later stage accepts (a Parquet file, a folder of parts, or a tag
table's current version) as one Arrow table, or a piece (a part, a row group) at a time;
input_kinds tells what a path given as an input holds, so the wrong kind of folder is one
line naming it.
lease: the advisory lease a run holds on a table while it works, so that another run
starting on it warns (the commit still decides).

Readers of a table need only `from pipeline.table import read_current, current_files`.
"""

from pipeline.table.tag_table import current_files, read_current

__all__ = ["current_files", "read_current"]
