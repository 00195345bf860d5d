"""The two sides of an audit, read from any input tagpipe accepts.

A side is a tag table, a split output (its train rows, or its val/test rows, with phash
flags joined from the tag table given with --tags), or a Parquet/CSV file with sha256,
phash (uint64 or 16 hex digits) and optionally embedding columns. Its narrow signals are
read whole; its embeddings stay where they are and are read part by part (`Side.batches`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from pipeline.core.errors import TagpipeError
from pipeline.corpus.audit_vectors import Batches, column_batches, part_batches
from pipeline.storage.filesystem import filesystem_for
from pipeline.table.reading import Pieces, read_parquet
from pipeline.table.tag_table import is_tag_table

SIGNAL_COLUMNS = ["uri", "sha256", "phash", "phash_hex", "phash_degenerate", "embedding", "split", "error"]


@dataclass
class Side:
    """One side of an audit: its rows' narrow signals, and where their embeddings are read
    (part by part) when the table does not carry them in memory."""

    table: pa.Table  # uri, sha256, phash, phash_unreliable (and embedding, when in memory)
    parts: Pieces | None = None

    def batches(self) -> Batches | None:
        if "embedding" in self.table.column_names:
            return column_batches(self.table)
        if self.parts is not None:
            return part_batches(self.parts, self.table.column("uri").combine_chunks())
        return None


def read_side(
    uri: str, storage_options: dict | None = None, role: str = "train", tags: str | None = None
) -> Side:
    """read_signals without the embedding column: the side's embeddings stay in their parts
    (the tag table given with a split output, else the input's own), read one at a time."""
    table = read_signals(uri, storage_options, role, tags, with_embedding=False)
    source = tags if tags and _is_split(uri, storage_options) else uri
    parts = None
    if not source.endswith(".csv"):
        candidate = Pieces(source, storage_options)
        parts = candidate if "embedding" in candidate.names else None
    return Side(table, parts)


def _is_split(uri: str, storage_options: dict | None) -> bool:
    fs, path = filesystem_for(uri, storage_options)
    if path.endswith("splits.parquet"):
        return True
    return (
        fs.isdir(path)
        and fs.isfile(path.rstrip("/") + "/splits.parquet")
        and not is_tag_table(uri, storage_options)
    )


def read_signals(
    uri: str,
    storage_options: dict | None = None,
    role: str = "train",
    tags: str | None = None,
    with_embedding: bool = True,
) -> pa.Table:
    """uri, sha256, phash (uint64, null where unknown), phash_unreliable, embedding (or
    null) from any supported input; a split output's train or eval rows, with hashes
    (and embeddings) joined from tags when given."""
    fs, path = filesystem_for(uri, storage_options)
    if fs.isdir(path) and fs.isfile(
        path.rstrip("/") + "/splits.parquet"
    ):  # a split output folder (it may hold audits)
        uri, path = uri.rstrip("/") + "/splits.parquet", path.rstrip("/") + "/splits.parquet"
    if path.endswith(".csv"):
        with fs.open(path, "rb") as handle:
            table = pcsv.read_csv(handle)
        if "embedding" in table.column_names:
            raise TagpipeError(
                f"{uri}: a CSV cannot hold embedding vectors; give Parquet with a list column, "
                "or drop the embedding column"
            )
    else:
        wanted = SIGNAL_COLUMNS if with_embedding else [c for c in SIGNAL_COLUMNS if c != "embedding"]
        table = read_parquet(uri, storage_options, wanted, only_present=True)
    names = set(table.column_names)
    if not names & {"sha256", "phash", "phash_hex", "embedding"}:
        raise TagpipeError(f"{uri}: needs sha256, phash or embedding columns (has {sorted(names)})")
    if "split" in names:
        split = table.column("split")
        keep = (
            pc.equal(split, "train")
            if role == "train"
            else pc.invert(pc.is_in(split, pa.array(["train", "held_out"])))
        )
        table = table.filter(keep)
        if tags:
            table = _join_tags(table, tags, storage_options, with_embedding)
    elif "error" in names:
        table = table.filter(pc.is_null(table.column("error")))
    return _normalised(table, uri)


def _join_tags(table: pa.Table, tags: str, storage_options: dict | None, with_embedding: bool) -> pa.Table:
    """A split's rows with the tag table's phash flag (and embedding), by uri."""
    wanted = ["uri", "phash_degenerate", "embedding"] if with_embedding else ["uri", "phash_degenerate"]
    extra = read_parquet(tags, storage_options, wanted, only_present=True)
    take = pc.index_in(table.column("uri"), extra.column("uri"))  # null: not tagged
    for name in extra.column_names:
        if name != "uri":  # Arrow joins do not carry fixed-size lists: taken by position
            column = extra.column(name).take(take)
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, column)
            else:
                table = table.append_column(name, column)
    return table


def _normalised(table: pa.Table, uri: str) -> pa.Table:
    names = set(table.column_names)
    n = table.num_rows
    if "phash" in names and pa.types.is_integer(table.schema.field("phash").type):
        phash = table.column("phash").cast(pa.uint64())
    elif "phash" in names or "phash_hex" in names:
        text = table.column("phash" if "phash" in names else "phash_hex").to_pylist()
        phash = pa.array([int(h, 16) if h else None for h in text], pa.uint64())
    else:
        phash = pa.nulls(n, pa.uint64())
    flagged = (
        table.column("phash_degenerate").fill_null(False)
        if "phash_degenerate" in names
        else pa.array([False] * n)
    )
    columns = {
        "uri": table.column("uri")
        if "uri" in names
        else pa.array([f"{uri}#{i}" for i in range(n)], pa.string()),
        "sha256": table.column("sha256").cast(pa.string()) if "sha256" in names else pa.nulls(n, pa.string()),
        "phash": phash,
        "phash_unreliable": flagged,
    }
    if "embedding" in names:
        columns["embedding"] = table.column("embedding")
    return pa.table(columns)
