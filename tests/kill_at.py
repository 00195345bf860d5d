"""Run the tagpipe CLI and SIGKILL this process at a named point (tests only):

    python tests/kill_at.py POINT tag -i ... -o ...

listing         after the input prefix is listed, before the listing is written
tagging         right after the run's first new part is written, before any commit
commit-version  after _versions/<N>.json is written, before _current.json
commit-rename   local stores: _current.json's temp file written and synced, not renamed
"""

import os
import signal
import sys

import pipeline.job.slices
import pipeline.storage.manifest
import pipeline.table.tag_table


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def after(module, name):
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        die()
        return result

    setattr(module, name, wrapped)


def after_a_part(name):
    """Die as soon as a SliceWriter method reports a part written (inline or by a task)."""
    original = getattr(pipeline.job.slices.SliceWriter, name)

    def wrapped(*args, **kwargs):
        parts = original(*args, **kwargs)
        if parts:
            die()
        return parts

    setattr(pipeline.job.slices.SliceWriter, name, wrapped)


point, args = sys.argv[1], sys.argv[2:]
if point == "listing":
    after(pipeline.storage.manifest, "_list_in_parallel")
elif point == "tagging":
    after_a_part("_write")
    after_a_part("_collect")
elif point == "commit-version":
    write = pipeline.table.tag_table.TagTable._write_bytes

    def write_or_die(self, relative, data):
        if relative == pipeline.table.tag_table.CURRENT:
            die()
        return write(self, relative, data)

    pipeline.table.tag_table.TagTable._write_bytes = write_or_die
elif point == "commit-rename":
    replace = os.replace

    def replace_or_die(src, dst, *a, **k):
        if str(dst).endswith(pipeline.table.tag_table.CURRENT):
            die()
        return replace(src, dst, *a, **k)

    os.replace = replace_or_die  # the os module write_atomic uses
else:
    raise SystemExit(f"unknown point {point}")

from pipeline.cli import app  # noqa: E402

app(args, prog_name="tagpipe")
