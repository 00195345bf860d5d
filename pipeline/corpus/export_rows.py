"""The rows an export writes, read from its input a piece at a time (a tag table's part, a
Parquet row group): never the whole table at once, and never a column the format does
not use (a table's embeddings are most of its bytes).

A first pass over uri and error alone (two narrow columns of every row, cheap) gives what
needs the whole corpus: which rows have no error, their uris (the caption files' common
folder, collisions, files already there) and each row's place in uri order. The rows
themselves are then read piece by piece, made Python rows a slice at a time.

JSONL and Dart files list rows in uri order, as a sort of the whole table did. When each
piece holds one run of that order (a table's first run cuts its parts from the sorted
listing), the pieces are read in the order of their runs and each is sorted. Otherwise
(parts of later runs interleave with earlier ones; an unsorted Parquet file) each
piece's lines go to temporary bucket files by their place in the order, and each bucket
is sorted in turn: memory holds a piece and a bucket, disk the lines once more (in the
system's temporary folder; TMPDIR moves it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.table.reading import Pieces

SLICE_ROWS = 4096  # rows made Python objects at once
BUCKET_ROWS = 65536  # lines sorted at once when pieces interleave (at least)
MAX_BUCKETS = 256  # bucket files open at once (more rows: larger buckets)
LINE_SCHEMA = pa.schema([("position", pa.int64()), ("line", pa.large_string())])

Render = Callable[[list[dict]], list[str]]


@dataclass
class GoodRows:
    """The rows without errors, from the uri pass: per piece a mask, and their uris."""

    masks: list[np.ndarray]  # per piece: its rows without an error
    starts: np.ndarray  # per piece, and one past the last: its first good row's index among all
    uris: pa.ChunkedArray  # the good rows' uris, piece after piece
    errors: int  # rows with an error

    @classmethod
    def read(cls, source: Pieces) -> GoodRows:
        pieces = source.read_all(["uri", "error"])
        masks = [pc.is_null(p.column("error")).to_numpy(zero_copy_only=False) for p in pieces]
        counts = [int(m.sum()) for m in masks]
        uris = [p.column("uri").filter(pa.array(m)).cast(pa.string()) for p, m in zip(pieces, masks)]
        chunks = [c for u in uris for c in u.chunks]
        return cls(
            masks=masks,
            starts=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]),
            uris=pa.chunked_array(chunks, pa.string()) if chunks else pa.chunked_array([], pa.string()),
            errors=sum(len(m) for m in masks) - sum(counts),
        )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def order(self) -> np.ndarray:
        """Indices of the good rows sorted by uri (stable: ties keep their read order)."""
        return pc.sort_indices(self.uris).to_numpy()

    def positions(self) -> list[np.ndarray]:
        """Per piece, each good row's place in uri order."""
        place = np.empty(len(self), np.int64)
        place[self.order()] = np.arange(len(self))
        return [place[a:b] for a, b in zip(self.starts[:-1], self.starts[1:])]


def good_pieces(
    source: Pieces, good: GoodRows, columns: list[str], indices: list[int] | None = None
) -> Iterator[tuple[int, pa.Table]]:
    """(index, its good rows) for these pieces (default: all with any), read ahead."""
    chosen = [i for i, m in enumerate(good.masks) if m.any()] if indices is None else indices
    for index, piece in source.stream(columns, chosen):
        yield index, piece.filter(pa.array(good.masks[index]))


def slices(piece: pa.Table) -> Iterator[list[dict]]:
    """A piece's rows as Python dicts, SLICE_ROWS at a time."""
    for start in range(0, piece.num_rows, SLICE_ROWS):
        yield piece.slice(start, SLICE_ROWS).to_pylist()


def rows_by_piece(source: Pieces, good: GoodRows, columns: list[str]) -> Iterator[list[dict]]:
    """Every good row, in no particular order (captions: one file each)."""
    for _, piece in good_pieces(source, good, columns):
        yield from slices(piece)


def lines_in_uri_order(source: Pieces, good: GoodRows, columns: list[str], render: Render) -> Iterator[str]:
    """render(rows) of every good row, the lines in uri order."""
    places = good.positions()
    if all(len(p) == 0 or int(p.max() - p.min()) + 1 == len(p) for p in places):
        runs = [i for _, i in sorted((int(p.min()), i) for i, p in enumerate(places) if len(p))]
        for index, piece in good_pieces(source, good, columns, runs):
            for rows in slices(piece.take(pa.array(np.argsort(places[index])))):
                yield from render(rows)
        return
    yield from _bucketed(source, good, columns, render, places)


def _bucketed(
    source: Pieces, good: GoodRows, columns: list[str], render: Render, places: list[np.ndarray]
) -> Iterator[str]:
    """Interleaved pieces: lines spilled to bucket files by place, each bucket sorted."""
    size = max(BUCKET_ROWS, -(-len(good) // MAX_BUCKETS))
    with tempfile.TemporaryDirectory(prefix="tagpipe-export-") as tmp:
        writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        try:
            for index, piece in good_pieces(source, good, columns):
                done = 0
                for rows in slices(piece):
                    place = places[index][done : done + len(rows)]
                    done += len(rows)
                    _spill(writers, Path(tmp), size, place, render(rows))
        finally:
            for writer in writers.values():
                writer.close()
        for bucket in sorted(writers):
            with pa.ipc.open_stream(Path(tmp) / f"{bucket}.arrow") as reader:
                lines = reader.read_all()
            ordered = lines.column("line").take(pc.sort_indices(lines.column("position")))
            for start in range(0, len(ordered), SLICE_ROWS):
                yield from ordered.slice(start, SLICE_ROWS).to_pylist()


def _spill(writers: dict, tmp: Path, size: int, place: np.ndarray, lines: list[str]) -> None:
    bucket = place // size
    text = pa.array(lines, pa.large_string())
    for b in np.unique(bucket).tolist():
        if b not in writers:
            writers[b] = pa.ipc.new_stream(str(tmp / f"{b}.arrow"), LINE_SCHEMA)
        chosen = bucket == b
        writers[b].write_batch(
            pa.record_batch([pa.array(place[chosen]), text.filter(pa.array(chosen))], schema=LINE_SCHEMA)
        )
