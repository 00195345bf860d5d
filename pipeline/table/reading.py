"""Any input a later stage accepts, as one Arrow table (read_parquet) or a piece at a
time (Pieces).

A Parquet file, a folder of Parquet files, or a tag table (its current version, with
its label sidecar's columns joined by uri: pipeline/table/labels.py). The storage layer
below reads bytes and knows nothing of tag tables; this is where the two meet, so dedup,
split, audit, export and OOD fitting take any of the three.
"""

from __future__ import annotations

import contextlib
import posixpath

from pipeline.core.errors import TagpipeError
from pipeline.storage.filesystem import filesystem_for, retry
from pipeline.table.tag_table import TagTable, is_tag_table


def read_parquet(
    uri: str,
    storage_options: dict | None = None,
    columns: list[str] | None = None,
    only_present: bool = False,
):
    """A Parquet file, a tag table (its current version: pipeline/table/tag_table.py), or a
    directory of Parquet files (`_`-prefixed paths skipped), as one pyarrow Table.
    only_present: read those of `columns` the data has (others are not an error).
    A missing path or a file that is not Parquet is a one-line TagpipeError."""
    with _input_errors(uri):
        return _read_parquet(uri, storage_options, columns, only_present)


@contextlib.contextmanager
def _input_errors(uri: str):
    """A missing input, or one that is not Parquet, as a one-line TagpipeError."""
    import pyarrow as pa

    try:
        yield
    except FileNotFoundError:
        raise TagpipeError(f"{uri}: no such file or folder") from None
    except pa.ArrowInvalid as exc:
        if "magic bytes" not in str(exc) and "file size is 0" not in str(exc):
            raise  # a missing column and the like: the caller names it
        raise TagpipeError(f"{uri}: not a Parquet file, a tag table or a folder of Parquet files") from None


def _read_parquet(uri: str, storage_options: dict | None, columns: list[str] | None, only_present: bool):
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    fs, path = filesystem_for(uri, storage_options)
    if is_tag_table(uri, storage_options):
        table = TagTable(uri, storage_options)
        snapshot = table.snapshot()
        if only_present and columns and snapshot.files:
            names = table.column_names(snapshot)
            columns = [c for c in columns if c in names]
        return table.read(snapshot, columns)
    if fs.isfile(path):
        with fs.open(path, "rb") as handle:
            if only_present and columns:
                names = pq.read_schema(handle).names
                columns = [c for c in columns if c in names]
                handle.seek(0)
            return pq.read_table(handle, columns=columns)
    files = _parquet_files(uri, storage_options)
    dataset = pads.dataset(files, format="parquet", filesystem=fs)
    if only_present and columns:
        columns = [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=columns)


class Pieces:
    """An input read one piece at a time: a tag table's parts (its current version), or
    each row group of a Parquet file or of a folder's Parquet files. A whole read
    (read_parquet) of a large table holds every row; a stage that can work piece by piece
    holds one piece (a part is rows_per_part rows) and reads only the columns it needs.

    Each piece reads as that whole read would show it: the same column names and types,
    nulls where a piece lacks a column (a tag table's columns are its parts' union, a
    folder's those of its first file, as pyarrow.dataset takes them). Every footer is read
    once, here."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        import pyarrow as pa

        self.uri, self.storage_options = uri, storage_options
        with _input_errors(uri):
            self.table = TagTable(uri, storage_options) if is_tag_table(uri, storage_options) else None
            snapshot = self.table.snapshot() if self.table is not None else None
            self.snapshot = snapshot  # the version read (None: not a tag table)
            if self.table is not None and snapshot is not None:
                files = list(snapshot.files)
                footers = _map(lambda f: retry(lambda: self.table.read_part_metadata(f), what=f), files)
                self.keys: list = files
            else:
                files = _parquet_files(uri, storage_options)
                footers = _map(lambda path: _footer(self.fs, path), files)
                self.keys = [
                    (f, group) for f, meta in zip(files, footers) for group in range(meta.num_row_groups)
                ]
        schemas = {file: meta.schema.to_arrow_schema() for file, meta in zip(files, footers)}
        if self.table is not None and snapshot is not None:  # label columns from the sidecar
            schemas = {
                file: self.table.row_schema(snapshot, file, schema) for file, schema in schemas.items()
            }
        self.has = [set(schemas[key if self.table is not None else key[0]].names) for key in self.keys]
        if self.table is None:
            self.schema = schemas[files[0]]
        else:  # a whole read concatenates the parts, promoting their schemas
            self.schema = pa.unify_schemas(list(schemas.values())) if schemas else pa.schema([])

    @property
    def fs(self):
        return filesystem_for(self.uri, self.storage_options)[0]

    @property
    def names(self) -> list[str]:
        return self.schema.names

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, index: int, columns: list[str]):
        """Piece `index`, these columns (each one the input has), in this order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        key, present = self.keys[index], [c for c in columns if c in self.has[index]]
        if self.table is not None and self.snapshot is not None:
            piece = self.table.read_rows(self.snapshot, key, present)
        else:

            def read_group():
                with self.fs.open(key[0], "rb") as handle:
                    return pq.ParquetFile(handle).read_row_group(key[1], columns=present)

            piece = retry(read_group, what=key[0])
        fields = [self.schema.field(c) for c in columns]
        return pa.table(
            [
                piece.column(f.name).cast(f.type) if f.name in present else pa.nulls(piece.num_rows, f.type)
                for f in fields
            ],
            schema=pa.schema(fields),
        )

    def stream(self, columns: list[str], indices=None, ahead: int = 4):
        """(index, piece) for these pieces (default: all) in order, up to `ahead` read
        ahead on threads: reading (I/O, decompression) overlaps the caller's work on the
        piece before, and memory holds at most ahead + 1 pieces."""
        from concurrent.futures import ThreadPoolExecutor

        order = list(range(len(self)) if indices is None else indices)
        with ThreadPoolExecutor(ahead) as pool:
            pending = [pool.submit(self.read, i, columns) for i in order[:ahead]]
            for k, index in enumerate(order):
                piece = pending.pop(0).result()
                if k + ahead < len(order):
                    pending.append(pool.submit(self.read, order[k + ahead], columns))
                yield index, piece

    def read_all(self, columns: list[str]) -> list:
        """Every piece, in order, with these columns (read concurrently: object stores are
        latency-bound). For the few narrow columns a stage needs of every row."""
        return _map(lambda index: self.read(index, columns), range(len(self)))


def _map(call, items) -> list:
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.table.tag_table import READ_THREADS

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(call, items))


def _footer(fs, path: str):
    import pyarrow.parquet as pq

    def read():
        with fs.open(path, "rb") as handle:
            return pq.read_metadata(handle)

    return retry(read, what=path)


def _parquet_files(uri: str, storage_options: dict | None) -> list[str]:
    """A Parquet file, or a folder's Parquet files: only those, since a folder also holds
    summaries (audit/audit.json, _summary.json); `_`- and `.`-prefixed paths skipped."""
    fs, path = filesystem_for(uri, storage_options)
    if fs.isfile(path):
        return [path]
    if not fs.isdir(path):
        raise FileNotFoundError(path)
    found = fs.find(path)
    files = sorted(
        f
        for f in found
        if f.endswith(".parquet")
        and not any(part.startswith(("_", ".")) for part in f[len(path) :].split("/"))
    )
    if not files:
        raise TagpipeError(_no_parquet(uri, found))
    return files


def _no_parquet(uri: str, found: list[str]) -> str:
    """Why a folder without Parquet files is not an input: named by what it does hold."""
    from pipeline.table.input_kinds import IMAGE_EXTENSIONS

    if any(posixpath.splitext(f)[1].lower().lstrip(".") in IMAGE_EXTENSIONS for f in found):
        return f"{uri} is a folder of images, not a tag table: tag it first (tagpipe tag -i {uri} -o TABLE)"
    return f"{uri} holds no Parquet files: not a tag table, a Parquet file or a folder of them"
