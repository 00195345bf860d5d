"""Object storage access through fsspec, with retries on transient errors only.

s3fs reads the standard AWS variables itself (keys, region, profile, and
AWS_ENDPOINT_URL for MinIO/R2-style stores), so no flag is needed for them.
"""

from __future__ import annotations

import json
import logging
import random
import time
from functools import lru_cache

import fsspec

log = logging.getLogger(__name__)

# Errors worth another try: the network and the store's own "slow down" answers.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
TRANSIENT_WORDS = (
    "slowdown", "slow down", "503", "500 ", "internal error", "service unavailable", "timeout", "timed out", "reset by peer", "throttl",
    # a connection dropped mid-answer, as aiohttp/botocore word it (seen in tests/test_reliability.py)
    "bad status line", "server disconnected", "connection closed", "connection aborted", "connection reset",
)  # fmt: skip


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in TRANSIENT_WORDS)


def retry(call, *, attempts: int = 5, base_delay: float = 0.2, max_delay: float = 5.0, what: str = ""):
    """Run call(); on a transient error wait with jittered exponential backoff and retry."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.debug("transient error on %s (attempt %d/%d): %s", what, attempt, attempts, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")


@lru_cache(maxsize=16)
def _filesystem(protocol: str, options_json: str):
    return fsspec.filesystem(protocol, **json.loads(options_json))


def filesystem_for(uri: str, storage_options: dict | None = None):
    """(filesystem, path) for a URI; one filesystem object per protocol and options."""
    protocol, path = fsspec.core.split_protocol(uri)
    protocol = protocol or "file"
    fs = _filesystem(protocol, json.dumps(storage_options or {}, sort_keys=True))
    return fs, fs._strip_protocol(uri) if protocol != "file" else path


def read_parquet(uri: str, storage_options: dict | None = None, columns: list[str] | None = None, only_present: bool = False):
    """A Parquet file, a tag table (its current version: pipeline/table.py), or a
    directory of Parquet files (`_`-prefixed paths skipped), as one pyarrow Table.
    only_present: read those of `columns` the data has (others are not an error)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from pipeline.table import TagTable, is_tag_table

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
    dataset = pads.dataset(path, format="parquet", filesystem=fs)
    if only_present and columns:
        columns = [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=columns)


def write_atomic(uri: str, data: bytes | None = None, table=None, storage_options: dict | None = None) -> None:
    """Replace a file in one step, so a reader (or the next run, reading it as its
    previous state) never sees half of it: temp file + rename locally, one PUT on
    object stores. Give bytes, or a pyarrow table to write as zstd Parquet."""
    import os
    import uuid

    import pyarrow.parquet as pq

    fs, path = filesystem_for(uri, storage_options)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"  # pipeline/table.py's vacuum knows this mark
        try:
            if table is not None:
                pq.write_table(table, tmp, compression="zstd")
            else:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())  # small files (commit points): durable before the rename
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return

    def put():
        with fs.open(path, "wb") as handle:
            if table is not None:
                pq.write_table(table, handle, compression="zstd")
            else:
                handle.write(data)

    retry(put, what=uri)


def read_bytes(uri: str, storage_options: dict | None = None, attempts: int = 5, max_bytes: int | None = None) -> bytes:
    """A file's bytes; with max_bytes, at most that many (one ranged read)."""
    fs, path = filesystem_for(uri, storage_options)
    if max_bytes is not None and is_local(fs) and retry(lambda: fs.size(path), attempts=attempts, what=uri) < max_bytes:
        max_bytes = None  # a local ranged read allocates the whole range up front, however small the file

    def read():
        if max_bytes is None:
            return fs.cat_file(path)
        try:
            return fs.cat_file(path, start=0, end=max_bytes)
        except OSError as exc:  # S3 answers a range on an empty object with 416 InvalidRange
            if "range" not in str(exc).lower() and "416" not in str(exc):
                raise
            return fs.cat_file(path)

    return retry(read, attempts=attempts, what=uri)


def is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols
