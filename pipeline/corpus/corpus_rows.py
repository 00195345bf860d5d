"""A corpus's rows as the corpus stages need them: narrow columns for all, vectors on demand.

The uri, sha256, phash and size columns of ten million rows take a few hundred MB as
Arrow and numpy arrays; their embeddings take 23 GB. So the narrow columns are read
once for every row (sorted by uri), and embeddings only for the rows a stage asks for,
one part at a time (`embeddings`), never as a whole-corpus column.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import TagpipeError
from pipeline.table.input_kinds import require_tag_columns
from pipeline.table.reading import Pieces

NARROW = ["uri", "sha256", "phash", "phash_degenerate", "width", "height", "size", "error"]
BLOCK_ROWS = 20_000  # embeddings widened to float32 at a time (92 MB at 1152-d)


@dataclass
class CorpusRows:
    """One table's rows, sorted by uri: Arrow strings and numpy columns, no per-row objects."""

    parts: Pieces  # a tag table's parts, or a Parquet input's row groups
    uri: pa.Array
    sha256: pa.Array
    phash: np.ndarray  # uint64, 0 where missing
    has_hash: np.ndarray
    degenerate: np.ndarray  # the row's own low-detail flag
    pixels: np.ndarray  # width x height
    size: np.ndarray
    ok: np.ndarray  # no error
    part: np.ndarray  # int32: which part holds the row
    has_embedding: bool

    @property
    def count(self) -> int:
        return len(self.uri)

    @classmethod
    def read(cls, uri: str, storage_options: dict | None = None) -> CorpusRows:
        parts = Pieces(uri, storage_options)
        names = parts.names
        require_tag_columns(uri, names)
        pieces = parts.read_all([c for c in NARROW if c in names])
        table = pa.concat_tables(
            [
                p.append_column("_part", pa.array(np.full(p.num_rows, i, np.int32)))
                for i, p in enumerate(pieces)
            ]
        )
        table = table.take(pc.sort_indices(table, [("uri", "ascending")]))
        uris = table.column("uri").combine_chunks()
        if len(uris) and pc.count_distinct(uris).as_py() != len(uris):
            raise TagpipeError(
                f"{uri}: a uri appears more than once (mixed model runs?); dedup one model's output"
            )

        def column(name, fill, dtype):
            if name not in table.column_names:
                return np.full(table.num_rows, fill, dtype)
            return table.column(name).fill_null(fill).to_numpy().astype(dtype)

        has_hash = (
            table.column("phash").is_valid().to_numpy(zero_copy_only=False)
            if "phash" in table.column_names
            else np.zeros(table.num_rows, bool)
        )
        sha = (
            table.column("sha256").combine_chunks() if "sha256" in names else pa.nulls(len(uris), pa.string())
        )
        error = table.column("error") if "error" in table.column_names else None
        return cls(
            parts=parts,
            uri=uris,
            sha256=sha.cast(pa.string()),
            phash=column("phash", 0, np.uint64),
            has_hash=has_hash,
            degenerate=column("phash_degenerate", False, bool),
            pixels=column("width", 0, np.int64) * column("height", 0, np.int64),
            size=column("size", 0, np.int64),
            ok=np.ones(len(uris), bool) if error is None else error.is_null().to_numpy(zero_copy_only=False),
            part=table.column("_part").to_numpy(),
            has_embedding="embedding" in names,
        )

    def embeddings(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(row positions, their embeddings [m, d] float32, valid mask), one part at a time,
        for the given row positions (sorted ascending). Rows without an embedding are
        yielded with valid False."""
        if not self.has_embedding or not len(rows):
            return
        wanted_parts = np.unique(self.part[rows])
        for part in wanted_parts.tolist():
            mine = rows[self.part[rows] == part]
            table = self.parts.read(part, ["uri", "embedding"])
            at = pc.index_in(self.uri.take(pa.array(mine)), table.column("uri")).to_numpy(
                zero_copy_only=False
            )
            embedding = table.column("embedding")
            for start in range(0, len(mine), BLOCK_ROWS):  # float32 blocks, not a whole part
                column = embedding.take(pa.array(at[start : start + BLOCK_ROWS])).combine_chunks()
                valid = column.is_valid().to_numpy(zero_copy_only=False)
                yield mine[start : start + BLOCK_ROWS], matrix_of(column, valid), valid
            del table, embedding


def matrix_of(column: pa.Array, valid: np.ndarray) -> np.ndarray:
    """A list column as [rows, width] float32 (zeros where null)."""
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        values = column.flatten().to_numpy(zero_copy_only=False)  # null slots are skipped
        out = np.zeros((len(column), width), np.float32)
        out[valid] = values.reshape(-1, width)
        return out
    lists = column.to_pylist()
    width = max((len(v) for v in lists if v is not None), default=0)
    out = np.zeros((len(column), width), np.float32)
    for i, v in enumerate(lists):
        if v is not None and len(v) == width:
            out[i] = v
    return out
