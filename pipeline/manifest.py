"""Inputs -> a manifest table (uri, size, etag, mtime), listed in parallel by prefix.

An input is a prefix on any fsspec filesystem, one image file, or a manifest file
(.parquet, .csv with a uri column, or .txt/.lst with one URI per line). Prefixes are
split at their first level and each part is listed by its own Ray task, so no single
driver-side call walks millions of keys.
"""

from __future__ import annotations

import logging
import posixpath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.storage import filesystem_for, retry

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    "jpg jpeg jpe jfif png webp gif bmp dib tif tiff avif heic heif jxl apng ppm pgm pbm tga ico".split()
)
MANIFEST_EXTENSIONS = frozenset({"parquet", "csv", "txt", "lst"})
MANIFEST_SCHEMA = pa.schema([("uri", pa.string()), ("source_size", pa.int64()), ("etag", pa.string()), ("mtime", pa.float64())])


def _extension(path: str) -> str:
    return posixpath.splitext(path)[1].lower().lstrip(".")


def _join(protocol: str, path: str) -> str:
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _protocol(fs) -> str:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "file" if proto in ("file", "local") else proto


def _row(fs, info: dict) -> dict:
    mtime = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    etag = info.get("ETag", info.get("etag"))
    return {
        "uri": _join(_protocol(fs), info["name"]),
        "source_size": int(info.get("size") or 0),
        "etag": str(etag).strip('"') if etag else None,
        "mtime": float(mtime) if mtime is not None else None,
    }


def list_prefix(uri: str, storage_options: dict | None, extensions: frozenset[str]) -> pa.Table:
    """Every file under one prefix, recursively (one Ray task's share of a listing)."""
    fs, path = filesystem_for(uri, storage_options)
    fs.invalidate_cache(path)  # a listing is tonight's truth, never a cached one
    found = retry(lambda: fs.find(path, detail=True, withdirs=False), what=uri)
    rows = [_row(fs, info) for info in found.values() if info.get("type") != "directory" and _extension(info["name"]) in extensions]
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _read_manifest_file(uri: str, storage_options: dict | None) -> pa.Table:
    fs, path = filesystem_for(uri, storage_options)
    ext = _extension(path)
    with fs.open(path, "rb") as handle:
        if ext == "parquet":
            table = pq.read_table(handle)
        elif ext == "csv":
            table = pacsv.read_csv(handle)
        else:
            lines = [line.strip() for line in handle.read().decode("utf-8").splitlines()]
            table = pa.table({"uri": [line for line in lines if line and not line.startswith("#")]})
    if "uri" not in table.column_names:
        raise ConfigError(f"manifest {uri}: no 'uri' column (columns: {table.column_names})")
    out = {"uri": table.column("uri").cast(pa.string())}
    for name in ("source_size", "etag", "mtime"):
        out[name] = table.column(name).cast(MANIFEST_SCHEMA.field(name).type) if name in table.column_names else pa.nulls(len(table), MANIFEST_SCHEMA.field(name).type)
    return pa.table(out, schema=MANIFEST_SCHEMA)


def build_manifest(inputs: list[str], storage_options: dict | None = None, extensions: frozenset[str] = IMAGE_EXTENSIONS, parallel: bool = True) -> pa.Table:
    """All inputs as one manifest, sorted by uri, without duplicates."""
    tables, prefixes = [], []
    for uri in inputs:
        fs, path = filesystem_for(uri, storage_options)
        if not retry(lambda: fs.exists(path), what=uri):
            raise ConfigError(f"input not found: {uri}")
        if retry(lambda: fs.isdir(path), what=uri):
            prefixes.append((fs, path))
        elif _extension(path) in MANIFEST_EXTENSIONS:
            tables.append(_read_manifest_file(uri, storage_options))
        else:
            tables.append(pa.Table.from_pylist([_row(fs, fs.info(path))], schema=MANIFEST_SCHEMA))
    for fs, path in prefixes:
        tables.extend(_list_in_parallel(fs, path, storage_options, extensions, parallel))
    manifest = pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()
    manifest = manifest.sort_by("uri")
    if manifest.num_rows:  # drop repeats (overlapping inputs)
        uris = manifest.column("uri").to_pylist()
        keep = [i for i in range(len(uris)) if i == 0 or uris[i] != uris[i - 1]]
        manifest = manifest.take(keep)
    return manifest


def _list_in_parallel(fs, path: str, storage_options, extensions, parallel: bool) -> list[pa.Table]:
    protocol = _protocol(fs)
    fs.invalidate_cache(path)
    top = retry(lambda: fs.ls(path, detail=True), what=path)
    files = [info for info in top if info.get("type") != "directory" and _extension(info["name"]) in extensions]
    subdirs = [_join(protocol, info["name"]) for info in top if info.get("type") == "directory"]
    tables = [pa.Table.from_pylist([_row(fs, info) for info in files], schema=MANIFEST_SCHEMA)]
    if not subdirs:
        return tables
    import ray

    if parallel and ray.is_initialized() and len(subdirs) > 1:
        task = ray.remote(num_cpus=0.25, max_retries=3)(list_prefix)
        tables.extend(ray.get([task.remote(sub, storage_options, extensions) for sub in subdirs]))
    else:
        tables.extend(list_prefix(sub, storage_options, extensions) for sub in subdirs)
    log.info("listed %s: %d sub-prefixes", path, len(subdirs))
    return tables
