"""The report's pass over a table: each part's figures, read once and kept.

A tag table's parts are immutable and uniquely named (pipeline/table/tag_table.py), so
what the report finds in a part (`PartFigures`, pipeline/corpus/report_figures.py) never
changes. The first report that reads a part keeps its figures beside the table, in
`_summaries/<the part's path without .parquet>.<key>.json.gz` (a few KiB to a few hundred,
where the part holds MiB); later reports add those up and read only the parts that have
none: a nightly that added 1% of the rows reads that 1%. The key covers what the
figures depend on besides the rows (the score threshold, the figures' format and
limits): another threshold, other summaries.

A summary is created exclusively (a link locally, a conditional PUT on S3): never
replaced, so two reports at once write the same name once and neither reads half a
file. A table the report cannot write to (read-only, a reader's credentials) is read
as before, with a debug line; a summary that does not parse is read around. A plain
Parquet file or dataset (not a tag table) is read directly, batch by batch, with no
summaries.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import TagpipeError
from pipeline.core.words import counted
from pipeline.corpus.drift import DriftScan
from pipeline.corpus.report_figures import (
    BORDERLINE,
    ERROR_CHARS,
    MAX_ERRORS,
    OOD_SKETCH_BITS,
    SCORE_BINS,
    TOP_OOD,
    Accumulator,
    Figures,
    PartFigures,
)
from pipeline.storage.filesystem import create_exclusive, filesystem_for, retry
from pipeline.table.input_kinds import require_tag_columns
from pipeline.table.tag_table import GUARD_FILE, READ_THREADS, TagTable, summary_record

log = logging.getLogger(__name__)

FORMAT = 1  # of a summary's record: a change here is a new key, so old summaries are not read
# the columns a part's figures come from (and the tags_<category> ones)
COLUMNS = ("uri", "error", "error_kind", "tags", "scores", "ood_distance", "ood")
CHUNK = 64  # summaries read at once


def summary_key(threshold: float) -> str:
    """What a part's figures depend on besides its rows, as a short digest."""
    settings = {
        "format": FORMAT,
        "threshold": float(threshold),
        "borderline": BORDERLINE,
        "score_bins": SCORE_BINS.tolist(),
        "max_errors": MAX_ERRORS,
        "error_chars": ERROR_CHARS,
        "top_ood": TOP_OOD,
        "ood_sketch_bits": OOD_SKETCH_BITS,
        "columns": COLUMNS,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ScanCounts:
    """What a report read: parts, and the summaries it reused and wrote."""

    parts: int = 0  # the version's parts
    parts_read: int = 0  # parts whose rows were read (the page's and the drift's)
    summaries_reused: int = 0
    summaries_written: int = 0
    cache: str = ""  # why no summaries were written, if none could be

    def text(self) -> str:
        kept = f"; summaries not kept ({self.cache})" if self.cache else ""
        return (
            f"report: {counted(self.parts_read, 'parts')} read, {self.summaries_reused} part "
            f"summaries reused, "
            f"{self.summaries_written} written{kept}"
        )


class PartSummaries:
    """The report's per-part summaries of one table under one key."""

    def __init__(self, table: TagTable, threshold: float):
        self.table = table
        self.key = summary_key(threshold)
        self.writable = True
        self.why_not = ""

    def _uri(self, file: str) -> str:
        return self.table.full_uri(summary_record(file, self.key))

    def load(self, file: str) -> PartFigures | None:
        path = self.table.join(summary_record(file, self.key))
        try:
            data = retry(lambda: self.table.fs.cat_file(path), what=path)
        except FileNotFoundError:
            return None
        except Exception as exc:  # an unreadable summary: the part is read instead
            log.debug("summary of %s not read: %s", file, exc)
            return None
        try:
            record = json.loads(gzip.decompress(data))
            if record.get("key") != self.key or record.get("part") != file:
                raise ValueError("another part's or key's summary")
            figures = PartFigures.from_record(record["figures"])
            if figures.drift is None:
                raise ValueError("a summary without the drift's counts")
            return figures
        except Exception as exc:
            log.debug("summary of %s does not parse (read the part instead): %s", file, exc)
            return None

    def load_many(self, files: list[str]) -> Iterator[tuple[str, PartFigures | None]]:
        """(file, its summary or None) in the files' order, CHUNK read at once."""
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for start in range(0, len(files), CHUNK):
                chunk = files[start : start + CHUNK]
                yield from zip(chunk, pool.map(self.load, chunk))

    def store(self, file: str, figures: PartFigures) -> bool:
        """Keep a part's figures; False when it could not be (and no more are tried)."""
        if not self.writable:
            return False
        record = {"format": FORMAT, "key": self.key, "part": file, "figures": figures.record()}
        data = gzip.compress(json.dumps(record, separators=(",", ":")).encode(), compresslevel=1, mtime=0)
        try:
            # False: another report wrote the same figures first
            return create_exclusive(self._uri(file), data, self.table.storage_options)
        except Exception as exc:  # a read-only table or a reader's credentials: read parts as before
            self.writable = False
            self.why_not = f"{type(exc).__name__}: {exc}"
            log.debug("%s: part summaries not kept (%s)", self.table.uri, self.why_not)
            return False


def read_part(table: TagTable, file: str) -> pa.Table:
    """The columns of a part its figures come from (those it has: its own schema)."""
    path = table.join(file)

    def read() -> pa.Table:
        with table.fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            return parquet.read(columns=[n for n in names if n in COLUMNS or n.startswith("tags_")])

    return retry(read, what=path)


def scan(
    uri: str,
    storage_options: dict | None,
    threshold: float,
    table: TagTable | None = None,
    snapshot=None,
    summaries: PartSummaries | None = None,
    drift: DriftScan | None = None,
) -> tuple[Figures, ScanCounts]:
    """The figures of the snapshot's parts (a tag table's), each from its summary when
    one is kept, else read (and its summary kept); or of a Parquet file or dataset, read
    batch by batch. drift: handed the counts of the parts it compares (pipeline/corpus/
    drift.py), the earlier version's own parts' from their summaries where kept."""
    acc, counts = Accumulator(), ScanCounts()
    if snapshot is None:
        for batch in _plain_batches(uri, storage_options, acc):
            acc.add(PartFigures.of_part(batch, threshold, drift=False))
        return acc.result(), counts
    assert table is not None
    files = list(snapshot.files)
    counts.parts = len(files)
    sides = drift.side if drift is not None else {}
    counted: dict[str, list[str]] = {}  # the drift's side -> its parts counted here
    kept = summaries.load_many(files) if summaries else ((f, None) for f in files)
    for file, figures in kept:
        if figures is not None:
            counts.summaries_reused += 1
        else:
            figures = PartFigures.of_part(read_part(table, file), threshold)
            counts.parts_read += 1
            if summaries is not None and summaries.store(file, figures):
                counts.summaries_written += 1
        acc.add(figures, sides.get(file))
        if file in sides:
            counted.setdefault(sides[file], []).append(file)
    if drift is not None:
        before = [f for f in drift.pending() if sides[f] == "before"]
        for file, figures in summaries.load_many(before) if summaries else ():
            if figures is not None and figures.drift is not None:
                acc.add(figures, "before", page=False)
                counted.setdefault("before", []).append(file)
                counts.summaries_reused += 1
        for side, parts in counted.items():
            drift.take_counts(parts, acc.drift_counts(side))
        counts.parts_read += len(drift.pending())  # read by drift.finish
    if summaries is not None:
        counts.cache = summaries.why_not
    return acc.result(), counts


def _plain_batches(uri: str, storage_options: dict | None, acc: Accumulator) -> Iterator[pa.Table]:
    """A Parquet file's or dataset's batches, a few columns at a time."""
    import pyarrow.dataset as pads

    fs, path = filesystem_for(uri, storage_options)
    if fs.isdir(path) and any(f.endswith(GUARD_FILE) for f in fs.find(path)):
        raise TagpipeError(
            f"{uri}: holds tag tables' parts (every version's), not one table: give a table's own folder "
            "(the one with _current.json), e.g. OUTPUT/<model name> after a run of several models"
        )
    dataset = pads.dataset(path, format="parquet", filesystem=fs, exclude_invalid_files=True)
    names = dataset.schema.names
    if not names:  # a folder of captions or pages: read as a table it gave an empty page
        raise TagpipeError(f"--tags {uri}: no Parquet data here: not a tag output")
    require_tag_columns(uri, names, "--tags")
    categories = sorted(n.removeprefix("tags_") for n in names if n.startswith("tags_"))
    acc.categories.update(categories)
    columns = [n for n in names if n in COLUMNS or n.startswith("tags_")]
    for batch in dataset.to_batches(columns=columns, batch_size=65536):
        yield pa.Table.from_batches([batch])
