"""Any input a later stage accepts, as one Arrow table.

A Parquet file, a folder of Parquet files, or a tag table (its current version). The
storage layer below reads bytes and knows nothing of tag tables; this is where the two
meet, so dedup, split, audit, export and OOD fitting take any of the three.
"""

from __future__ import annotations

from pipeline.core.errors import TagpipeError
from pipeline.storage.filesystem import filesystem_for
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
    import pyarrow as pa

    try:
        return _read_parquet(uri, storage_options, columns, only_present)
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
            names = table.read_part_metadata(snapshot.files[0]).schema.to_arrow_schema().names
            columns = [c for c in columns if c in names]
        return table.read(snapshot, columns)
    if fs.isfile(path):
        with fs.open(path, "rb") as handle:
            if only_present and columns:
                names = pq.read_schema(handle).names
                columns = [c for c in columns if c in names]
                handle.seek(0)
            return pq.read_table(handle, columns=columns)
    if not fs.isdir(path):
        raise FileNotFoundError(path)
    # only Parquet files: a folder also holds summaries (audit/audit.json, _summary.json)
    files = sorted(
        f
        for f in fs.find(path)
        if f.endswith(".parquet")
        and not any(part.startswith(("_", ".")) for part in f[len(path) :].split("/"))
    )
    if not files:
        raise FileNotFoundError(f"{path}: no Parquet files")
    dataset = pads.dataset(files, format="parquet", filesystem=fs)
    if only_present and columns:
        columns = [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=columns)


class Parts:
    """Any input a later stage accepts, as a list of Parquet parts read one at a time:
    a tag table's current parts, a folder's Parquet files, or one file. Stages that must
    not hold a corpus's wide columns (embeddings) read those part by part."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        self.storage_options = storage_options
        self.fs, path = filesystem_for(uri, storage_options)
        self.snapshot = None
        if is_tag_table(uri, storage_options):
            table = TagTable(uri, storage_options)
            self.snapshot = table.snapshot()
            self.paths = table.paths(self.snapshot)
        elif self.fs.isfile(path):
            self.paths = [path]
        elif self.fs.isdir(path):
            self.paths = sorted(
                f
                for f in self.fs.find(path)
                if f.endswith(".parquet")
                and not any(part.startswith(("_", ".")) for part in f[len(path) :].split("/"))
            )
            if not self.paths:
                raise TagpipeError(f"{uri}: no Parquet files")
        else:
            raise TagpipeError(f"{uri}: no such file or folder")

    def names(self) -> list[str]:
        """The columns the parts have (the first part's schema)."""
        import pyarrow.parquet as pq

        with self.fs.open(self.paths[0], "rb") as handle:
            return pq.read_schema(handle).names

    def read(self, index: int, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        from pipeline.storage.filesystem import retry

        def one():
            with self.fs.open(self.paths[index], "rb") as handle:
                return pq.read_table(handle, columns=columns)

        return retry(one, what=self.paths[index])

    def read_all(self, columns: list[str]):
        """These columns of every part, in part order, with `_part` (the part's index)."""
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow as pa

        def one(index: int):
            table = self.read(index, columns)
            return table.append_column("_part", pa.array([index] * table.num_rows, pa.int32()))

        with ThreadPoolExecutor(16) as pool:
            tables = list(pool.map(one, range(len(self.paths))))
        return pa.concat_tables(tables, promote_options="default")
