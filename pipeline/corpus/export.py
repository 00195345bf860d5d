"""`tagpipe export`: tag outputs as the files training tools read.

  captions  one .txt per image, comma-separated tags (kohya sd-scripts reads these),
            at the image's path relative to a root, under the output directory
  jsonl     one JSON object per image: uri, tags by category, scores, rating, size
  dart      one Dart v2 prompt per image (JSONL with uri and prompt):
            <|bos|><copyright>..</copyright><character>..</character>
            <|rating:R|><|aspect_ratio:A|><|length:L|><general>..<|identity:none|><|input_end|>

Supplement mode (pipeline/corpus/supplement.py) writes the human tags merged with the
model's: captions get the merged list, JSONL rows each tag's provenance (source, model,
both), applying a reviewer's decisions from `tagpipe review` queue files.

Rows with errors are skipped (and counted). Tag text options: underscores or spaces,
escaped parentheses (for prompt syntaxes where "(" means emphasis), an exclude list.
Tags keep the stored order (by score).

Captions also take the options kohya sd-scripts' tag_images_by_wd14_tagger.py users
rely on (CaptionOptions): the file extension, the separator, tags always first (trigger
words), character tags first, the rating tag first, last or left out, tag replacements,
character tags expanded (`name_(series)` -> `name, series`), and appending to existing
captions without repeating a tag.

Each format is one writer class (CaptionWriter, JsonlWriter, DartWriter: what it reads,
where its files go, how it writes), chosen once from WRITERS by the format asked for.
`run_export` takes the settings (ExportSettings, pipeline/corpus/export_settings.py). A row's
text: pipeline/corpus/export_text.py. The input is read a piece at a time (a
tag table's part), only the columns the format needs: pipeline/corpus/export_rows.py.
Memory holds a piece, a slice of rows as Python objects, and the uris of every row
(for the checks that need them all: collisions, files already there, uri order).

Why this module is long: each format's writer class and the checks every writer shares
(caption paths that collide, files already there) sit together, so a new format is one
class here and nothing elsewhere.
"""

from __future__ import annotations

import enum
import os
import posixpath
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import TagpipeError
from pipeline.core.words import counted
from pipeline.corpus.export_rows import GoodRows, lines_in_uri_order, rows_by_piece
from pipeline.corpus.export_settings import ExportSettings
from pipeline.corpus.export_text import (
    MAX_NAME_BYTES,
    CaptionOptions,
    ExistingFiles,
    ExportFormat,
    TextOptions,
    aspect_bucket,
    caption_path,
    caption_tags,
    caption_text,
    dart_prompt,
    length_bucket,
    merge_caption,
    row_line,
)
from pipeline.corpus.supplement import (
    NEEDED_COLUMNS,
    Decisions,
    SupplementCounts,
    check_supplement,
    merge_rows,
    unmatched_decisions,
)
from pipeline.storage.filesystem import atomic_output, filesystem_for, is_local, write_atomic
from pipeline.storage.outputs import mark_file, mark_output
from pipeline.storage.writable import FILE, FOLDER, check_writable
from pipeline.table.input_kinds import expect, require_tag_columns
from pipeline.table.reading import Pieces

__all__ = [  # the row-text helpers live in export_text; importable from here as before
    "MAX_NAME_BYTES",
    "CaptionOptions",
    "ExportSettings",
    "ExportSummary",
    "TextOptions",
    "aspect_bucket",
    "caption_path",
    "caption_tags",
    "dart_prompt",
    "export_tags",
    "length_bucket",
    "merge_caption",
    "run_export",
]

# caption files written at once: a local write waits on its fsync, a store's on a round trip
WRITE_THREADS = 8


@dataclass
class ExportSummary:
    written: int = 0  # files written
    skipped_existing: int = 0  # files already there, left as they were (--skip-existing)
    skipped_errors: int = 0  # error rows: nothing to write for them
    files: list = field(default_factory=list)
    supplement: SupplementCounts | None = None  # supplement mode's counts

    def text(self) -> str:
        kept = f", {self.skipped_existing} existing files left as they were" if self.skipped_existing else ""
        written, skipped = counted(self.written, "files"), counted(self.skipped_errors, "error rows")
        line = f"export: {written} written{kept}, {skipped} skipped"
        return line + (self.supplement.text() if self.supplement else "")


@dataclass
class _Job:
    """One export: its input, its good rows' uris, where it writes and how."""

    source: Pieces
    good: GoodRows
    columns: list[str]
    fs: Any
    out_path: str
    text: TextOptions
    caption: CaptionOptions
    existing: ExistingFiles
    storage_options: dict | None
    summary: ExportSummary
    merge: Callable[[list[dict]], list[dict]] | None = None

    def rows(self):
        """The good rows, a slice at a time, merged in supplement mode (in no order)."""
        for rows in rows_by_piece(self.source, self.good, self.columns):
            yield self.merge(rows) if self.merge else rows


def run_export(settings: ExportSettings) -> ExportSummary:
    """`tagpipe export`: the settings' files (supplement mode reads the decisions first)."""
    options = settings.storage_options
    merge = Decisions.read(list(settings.decisions), options) if settings.supplement else None
    return export_tags(
        settings.tags,
        settings.output,
        settings.format,
        settings.text_options(),
        settings.relative_to,
        options,
        settings.caption_options(),
        settings.existing_files(),
        merge,
    )


def export_tags(
    tags: str,
    output: str,
    fmt: ExportFormat | str,
    text: TextOptions = TextOptions(),
    relative_to: str | None = None,
    storage_options: dict | None = None,
    caption: CaptionOptions = CaptionOptions(),
    existing: ExistingFiles | str = ExistingFiles.REFUSE,
    supplement: Decisions | None = None,
) -> ExportSummary:
    """Check every output file before writing any (two images meeting in one caption file,
    files already there unless told to overwrite, skip or append to them), then write:
    captions each atomically, JSONL and Dart into one file that appears only whole.
    supplement: merge the source tags with the model's, with these reviewer decisions."""
    writer = WRITERS[_member(ExportFormat, fmt, "export format")]
    existing = _member(ExistingFiles, existing, "existing")
    expect(tags, "table", "--tags", storage_options)
    writer.check_output(output)
    source = Pieces(tags, storage_options)
    if supplement is not None:
        writer.check_supplement()
        check_supplement(source.names, tags)
    columns = _columns(tags, source.names, writer, supplement is not None)
    good = GoodRows.read(source)
    out_fs, out_path = filesystem_for(output, storage_options)
    summary = ExportSummary(skipped_errors=good.errors)
    job = _Job(source, good, columns, out_fs, out_path, text, caption, existing, storage_options, summary)
    if supplement is not None:
        counts = summary.supplement = SupplementCounts(
            decisions_unmatched=unmatched_decisions(supplement, good.uris)
        )
        job.merge = lambda rows: merge_rows(rows, supplement, counts)
    writer.write(job, relative_to)
    return summary


E = typing.TypeVar("E", bound=enum.StrEnum)


def _member(kind: type[E], value: E | str, what: str) -> E:
    """A format or policy given by its name (export_tags' callers may pass strings)."""
    try:
        return kind(value)
    except ValueError:
        raise TagpipeError(f"unknown {what} {value!r}; choose one of {', '.join(kind)}") from None


class ExportWriter:
    """One export format: what it reads of a row, where its files go, and how it writes
    them. WRITERS maps each ExportFormat to its writer, chosen once in export_tags."""

    format: ExportFormat
    columns: tuple[str, ...] = ()  # what it reads of a row (of those the input has)
    required: tuple[str, ...] = ()  # columns without which the input is not a tag table for it
    present_hint = ""  # another way out when files are already there

    def check_output(self, output: str) -> None:
        """The output writable as what it will be (a file when named .jsonl), before any work."""
        check_writable(output, "--output", FILE if _single_file(output) else FOLDER)

    def check_supplement(self) -> None:
        """Supplement mode writes this format (else a one-line refusal)."""

    def more_columns(self, names: list[str]) -> set[str]:
        """Columns it reads beyond `columns`, by the input's names."""
        return set()

    def write(self, job: _Job, relative_to: str | None) -> None:
        raise NotImplementedError


class CaptionWriter(ExportWriter):
    """One caption file per image, at its path under a root (kohya sd-scripts' layout)."""

    format = ExportFormat.CAPTIONS
    columns = ("tags", "tags_character", "rating", "quality")
    required = ("tags",)
    present_hint = ", or --append to merge captions"

    def check_output(self, output: str) -> None:
        if _single_file(output):
            raise TagpipeError(
                f"--output {output}: captions are one .txt per image under a folder; give a folder "
                "(a .jsonl output is for --format jsonl or dart)"
            )
        super().check_output(output)

    def write(self, job: _Job, relative_to: str | None) -> None:
        _export_captions(job, relative_to, self)


class LinesWriter(ExportWriter):
    """One JSON line per image, in uri order, into one file (`file_name` in a folder)."""

    file_name = ""

    def write(self, job: _Job, relative_to: str | None) -> None:
        _export_lines(job, self)


class JsonlWriter(LinesWriter):
    """Tags by category, scores, rating and size (supplement mode: each tag's provenance)."""

    format = ExportFormat.JSONL
    columns = ("tags", "scores", "rating", "quality", "width", "height")
    required = ("tags", "scores", "width", "height")
    file_name = "tags.jsonl"

    def more_columns(self, names: list[str]) -> set[str]:
        return {n for n in names if n.startswith("tags_")}  # a record lists every category


class DartWriter(LinesWriter):
    """Dart v2 prompts: the model's categories in Dart's slots."""

    format = ExportFormat.DART
    columns = ("tags_general", "tags_copyright", "tags_character", "rating", "width", "height")
    required = ("width", "height")
    file_name = "dart_prompts.jsonl"

    def check_supplement(self) -> None:
        raise TagpipeError("--supplement writes captions or jsonl; Dart prompts take the model's categories")


WRITERS: dict[ExportFormat, ExportWriter] = {
    writer.format: writer for writer in (CaptionWriter(), JsonlWriter(), DartWriter())
}


def _single_file(output: str) -> bool:
    """An output named like a file (out/x.jsonl) is that file, not a folder of that name."""
    return output.rstrip("/").lower().endswith(".jsonl")


def _columns(tags: str, names: list[str], writer: ExportWriter, supplement: bool) -> list[str]:
    """The columns to read, in the input's order (a JSONL record lists its tags_ columns so)."""
    require_tag_columns(tags, names, "--tags")
    missing = [c for c in ("uri", "error", *writer.required) if c not in names]
    if missing:
        raise TagpipeError(
            f"{tags}: no {missing[0]!r} column, which a {writer.format} export needs: not a tag table?"
        )
    wanted = {"uri", "error", *writer.columns}
    if supplement:
        wanted |= {"tags", "scores", *NEEDED_COLUMNS}
    else:
        wanted |= writer.more_columns(names)
    return [n for n in names if n in wanted]


def _export_lines(job: _Job, writer: LinesWriter) -> None:
    """JSONL or Dart: one file, its lines in uri order, streamed into place: the output
    itself when it is named .jsonl, else a file of the format's name inside it."""
    if _single_file(job.out_path):
        target = job.out_path
        present = pa.array([target] if job.fs.exists(target) else [], pa.string())
    else:
        target = posixpath.join(job.out_path, writer.file_name)
        present = _present(job.fs, job.out_path, pa.chunked_array([[target]], pa.string()))
    _refuse_present(job, writer, present, 1)
    if len(present) and job.existing == ExistingFiles.SKIP:
        job.summary.skipped_existing += 1
        for _ in job.rows() if job.merge else ():
            pass  # the supplement counts a written file would have given
        return

    def render(rows: list[dict]) -> list[str]:
        return [row_line(row, writer.format, job.text) for row in (job.merge(rows) if job.merge else rows)]

    mark_file(_uri(job.fs, target), f"{writer.format} export", job.storage_options)
    with atomic_output(_uri(job.fs, target), job.storage_options) as out:
        lines = 0
        for line in lines_in_uri_order(job.source, job.good, job.columns, render):
            out.write(line.encode() + b"\n")
            lines += 1
        if not lines:
            out.write(b"\n")
    job.summary.files.append(target)
    job.summary.written += 1


def _export_captions(job: _Job, relative_to: str | None, writer: CaptionWriter) -> None:
    """One caption file per good row, a slice of rows at a time, after every check."""
    if relative_to and "://" not in relative_to:
        relative_to = os.path.abspath(relative_to)  # image URIs of local inputs are absolute
    root = (relative_to or _common_root(job.good.uris)).rstrip("/")
    targets = _caption_targets(job.good, root, job.out_path, job.caption.extension)
    present = _present(job.fs, job.out_path, targets)
    if not job.caption.append:
        _refuse_present(job, writer, present, len(targets))
    elif len(present):
        _check_text(job.fs, present.to_pylist())  # every caption to merge into is read before any write
    # caption files, often beside the images: only files of the caption extension are tagpipe's
    extension = (job.caption.extension,)
    mark_output(
        _uri(job.fs, job.out_path), "captions export", job.storage_options, names=(), extensions=extension
    )
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        for rows in job.rows():
            files = [
                posixpath.join(job.out_path, caption_path(row["uri"][len(root) + 1 :], job.caption.extension))
                for row in rows
            ]
            there = pc.is_in(pa.array(files, pa.string()), value_set=present).to_numpy(zero_copy_only=False)
            skip = job.existing == ExistingFiles.SKIP
            work = [(f, r, t) for f, r, t in zip(files, rows, there) if not (t and skip)]
            job.summary.skipped_existing += len(rows) - len(work)
            for written in pool.map(lambda w: _write_caption(job, *w), work):
                job.summary.files.append(written)
                job.summary.written += 1


def _write_caption(job: _Job, target: str, row: dict, there: bool) -> str:
    earlier = _read_text(job.fs, target) if there and job.caption.append else None
    data = caption_text(row, job.text, job.caption, earlier)
    write_atomic(_uri(job.fs, target), data.encode(), storage_options=job.storage_options)
    return target


def _common_root(uris: pa.ChunkedArray) -> str:
    """The folder all uris share (os.path.commonprefix of all is that of the least and greatest)."""
    if not len(uris):
        return ""
    bounds = pc.min_max(uris)
    return posixpath.dirname(os.path.commonprefix([bounds["min"].as_py(), bounds["max"].as_py()]))


def _caption_targets(good: GoodRows, root: str, out_path: str, extension: str) -> pa.ChunkedArray:
    """Every good row's caption file, in uri order; refused (naming the first row in uri
    order, as a row-by-row plan would) when a uri is not under the root or two images
    would write one file."""
    uris = good.uris.take(pa.array(good.order()))
    outside = np.flatnonzero(~pc.starts_with(uris, root + "/").to_numpy(zero_copy_only=False))
    limit = int(outside[0]) if len(outside) else len(uris)
    chunks = []
    for start in range(0, limit, 65536):
        keys = uris.slice(start, min(65536, limit - start)).to_pylist()
        chunks.append([posixpath.join(out_path, caption_path(u[len(root) + 1 :], extension)) for u in keys])
    targets = pa.chunked_array(chunks, pa.string())
    clash = _first_clash(targets)
    if clash is not None:
        owner, later = clash
        raise TagpipeError(
            f"{uris[owner]} and {uris[later]} would write the same caption file {targets[later]}; "
            "nothing was written"
        )
    if limit < len(uris):
        raise TagpipeError(f"{uris[limit]} is not under --relative-to {root}; nothing was written")
    return targets


def _first_clash(targets: pa.ChunkedArray) -> tuple[int, int] | None:
    """(first, second) index of the earliest row whose file an earlier row writes too."""
    if len(targets) < 2:
        return None
    order = pc.sort_indices(targets).to_numpy()
    ordered = targets.take(pa.array(order))
    same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1)).to_numpy(zero_copy_only=False)
    if not same.any():
        return None
    later = int(order[1:][same].min())
    return pc.index(targets, targets[later]).as_py(), later


def _refuse_present(job: _Job, writer: ExportWriter, present: pa.Array, planned: int) -> None:
    if not len(present) or job.existing != ExistingFiles.REFUSE:
        return
    example = ", ".join(present.take(pc.sort_indices(present)).slice(0, 3).to_pylist())
    raise TagpipeError(
        f"{len(present)} of the {counted(planned, 'files')} to write "
        f"{'already exists' if len(present) == 1 else 'already exist'} (e.g. {example}); "
        "nothing was written: "
        f"pass --skip-existing to keep them, --overwrite to replace them{writer.present_hint}"
    )


def _present(fs, root: str, targets: pa.ChunkedArray) -> pa.Array:
    """The targets that exist (in their order), from one listing of the output (not a
    request per file)."""
    fs.invalidate_cache(root)
    found = fs.find(root, withdirs=False) if fs.exists(root) else []
    if not found:
        return pa.array([], pa.string())
    norm: Callable[[str], str] = os.path.abspath if is_local(fs) else (lambda p: p)
    listed = pa.array([norm(p) for p in found], pa.string())
    names = pa.chunked_array([[norm(t) for t in c.to_pylist()] for c in targets.chunks], pa.string())
    return targets.filter(pc.is_in(names, value_set=listed)).combine_chunks()


def _check_text(fs, paths: list[str]) -> None:
    """Every existing caption decodes (the first one that does not, in order, is named)."""
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        for start in range(0, len(paths), 4096):
            list(pool.map(lambda path: _read_text(fs, path), paths[start : start + 4096]))


def _read_text(fs, path: str) -> str:
    try:
        return fs.cat_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise TagpipeError(
            f"{path}: an existing caption that is not UTF-8 text; nothing was written"
        ) from None


def _uri(fs, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if is_local(fs) else f"{protocol}://{path}"
