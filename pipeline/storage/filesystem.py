"""Object storage access through fsspec, with retries on transient errors only.

s3fs reads the standard AWS variables itself (keys, region, profile, and
AWS_ENDPOINT_URL for MinIO/R2-style stores), so no flag is needed for them.

Why this module is long: every way tagpipe touches a store (retries, atomic and exclusive
writes, bounded reads) and the one wording of a store's refusals (cause_of, whose,
storage_error_text) live together, so each caller gets the same behaviour and words.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from functools import lru_cache

import fsspec

from pipeline.core.errors import TagpipeError

log = logging.getLogger(__name__)

# Virtual objects for listing at scale (benchmarks/listing_scale.py); by name, imported on use.
fsspec.register_implementation("simstore", "pipeline.storage.simulated.SimulatedStore", clobber=True)

# Errors worth another try: the network and the store's own "slow down" answers.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
TRANSIENT_WORDS = (
    "slowdown",
    "slow down",
    "503",
    "500 ",
    "internal error",
    "service unavailable",
    "timeout",
    "timed out",
    "reset by peer",
    "throttl",
    # a connection dropped mid-answer, as aiohttp/botocore word it (seen in tests/job/test_reliability.py)
    "bad status line",
    "server disconnected",
    "connection closed",
    "connection aborted",
    "connection reset",
)


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


def write_atomic(
    uri: str, data: bytes | None = None, table=None, storage_options: dict | None = None
) -> None:
    """Replace a file in one step, so a reader (or the next run, reading it as its
    previous state) never sees half of it: temp file + rename locally, one PUT on
    object stores. Give bytes, or a pyarrow table to write as zstd Parquet."""
    import os
    import uuid

    import pyarrow.parquet as pq

    fs, path = filesystem_for(uri, storage_options)
    if is_local(fs):  # object stores have no folders, and tagpipe never creates a bucket
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        # a short name beside the target (a key's own name may be at the length limit);
        # pipeline/table/tag_table.py's vacuum knows the mark
        tmp = os.path.join(os.path.dirname(path), f".tagpipe.tmp-{uuid.uuid4().hex}")
        try:
            if table is not None:
                pq.write_table(table, tmp, compression="zstd")
                with open(tmp, "rb+") as handle:  # durable before a commit can name it
                    os.fsync(handle.fileno())
            else:
                assert data is not None, "write_atomic needs data or a table"
                with open(tmp, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())  # small files (commit points): durable before the rename
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


@contextlib.contextmanager
def atomic_output(uri: str, storage_options: dict | None = None):
    """A binary file to write `uri` from a piece at a time, for files too large to hold
    (write_atomic takes the whole content). The file appears under its name only whole:
    locally a temp file beside it, fsynced and renamed; on an object store a local temp
    file uploaded once it is complete (a multipart upload shows nothing before it ends).
    An exception leaves nothing new under the name, and whatever was there as it was."""
    import os
    import tempfile
    import uuid

    fs, path = filesystem_for(uri, storage_options)
    if is_local(fs):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".tagpipe.tmp-{uuid.uuid4().hex}")
    else:
        handle, tmp = tempfile.mkstemp(prefix="tagpipe-upload-")
        os.close(handle)
    try:
        with open(tmp, "wb", buffering=1 << 20) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        if is_local(fs):
            os.replace(tmp, path)
        else:
            retry(lambda: fs.put_file(tmp, path), what=uri)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def create_exclusive(
    uri: str, data: bytes | None = None, storage_options: dict | None = None, table=None
) -> bool:
    """Write `data` (or a pyarrow `table`, as zstd Parquet) at `uri` only if nothing is
    there yet, in one step; False if something was, which is left as it was. The
    test-and-set of a commit, and how every part is written: locally a fsynced temp file
    hard-linked into place (link fails on an existing name: never a replace); on S3 a PUT
    with If-None-Match: * (s3fs's mode="create"), which the store refuses with 412 when
    the key exists."""
    import os
    import uuid

    fs, path = filesystem_for(uri, storage_options)
    if is_local(fs):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".tagpipe.tmp-{uuid.uuid4().hex}")
        try:
            _write_durably(tmp, data, table)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links (FAT, some FUSE and SMB mounts)
                with open(tmp, "rb") as written:
                    return _create_by_open(path, written.read())
            _fsync_dir(os.path.dirname(path))
            return True
        finally:
            os.remove(tmp)
    if table is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, compression="zstd")
        data = buffer.getvalue().to_pybytes()
    assert data is not None, "create_exclusive needs data or a table"
    _check_conditional_put(fs)
    attempts = {"count": 0}

    def put() -> bool:
        attempts["count"] += 1
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except Exception as exc:
            if "conditionalrequestconflict" in f"{type(exc).__name__} {exc}".lower() or " 409" in str(exc):
                # S3's answer to two conditional writes in flight at once: ask again
                raise TimeoutError(f"conditional write conflict on {uri}, retrying") from None
            if not _precondition_failed(exc):
                raise
        # a retried PUT may find the object its own first attempt wrote
        return attempts["count"] > 1 and fs.cat_file(path) == data

    return retry(put, what=uri)


def _write_durably(path: str, data: bytes | None, table) -> None:
    """A new local file with these bytes (or this table as zstd Parquet), fsynced."""
    import os

    import pyarrow.parquet as pq

    if table is not None:
        pq.write_table(table, path, compression="zstd")
    else:
        assert data is not None, "create_exclusive needs data or a table"
        with open(path, "wb") as handle:
            handle.write(data)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _create_by_open(path: str, data: bytes) -> bool:
    """O_CREAT|O_EXCL where links are not to be had: exclusive, though a reader may see
    the record before its bytes are all there (readers retry a record that does not parse)."""
    import os

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _check_conditional_put(fs) -> None:
    """s3fs drops keyword arguments its botocore call does not know, so an s3fs without
    exclusive writes would overwrite silently: refuse instead."""
    import inspect

    pipe = getattr(type(fs), "_pipe_file", None)
    if pipe is not None and "mode" not in inspect.signature(pipe).parameters:
        raise TagpipeError(
            f"{type(fs).__module__} cannot write exclusively (needs s3fs >= 2025.9): "
            "a commit could overwrite "
            "another run's; upgrade it"
        )


def _precondition_failed(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, FileExistsError) or "precondition" in text or "412" in text


def _fsync_dir(directory: str) -> None:
    import os

    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What an object store's refusal means, read from the words of the exception chain
# (botocore's, s3fs's): cause_of's answers.
CREDENTIALS, ENDPOINT, BUCKET, DENIED = "no credentials", "no endpoint", "no such bucket", "access denied"
DRIVER, WORKERS = "the driver", "the Ray workers"  # whose environment: every message says


def environment_of(who: str) -> str:
    """'the driver's environment', 'the Ray workers' environment'."""
    return who + ("' environment" if who.endswith("s") else "'s environment")


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _chain_text(exc: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}" for e in _chain(exc))


def cause_of(exc: BaseException) -> str | None:
    """What an object store's refusal means (CREDENTIALS, ENDPOINT, BUCKET, DENIED), read
    from the words of the exception and its causes; None for anything else."""
    text = _chain_text(exc)
    if "NoCredentialsError" in text or "Unable to locate credentials" in text:
        return CREDENTIALS
    if "EndpointConnectionError" in text or "Could not connect to the endpoint" in text:
        return ENDPOINT
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return BUCKET
    denied = ("AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "PermissionError")
    return DENIED if any(word in text for word in denied) else None


def whose(exc: BaseException) -> str:
    """DRIVER, or WORKERS when the failure came back from a Ray task or actor (Ray wraps
    it in a RayTaskError; Ray Data in a UserCodeException)."""
    names = " ".join(type(e).__name__ for e in _chain(exc)) + " " + _chain_text(exc)[:2000]
    return WORKERS if "RayTaskError" in names or "UserCodeException" in names else DRIVER


def storage_error_text(exc: BaseException, uris: list[str]) -> str | None:
    """One line for an object-store failure a user can fix (credentials, endpoint,
    permissions, a missing bucket), naming the endpoint, the buckets involved and whose
    environment (the driver's or the Ray workers') met it; None for anything else. Built
    from names only: no credential value is ever included."""
    import os
    import re

    text = _chain_text(exc)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    buckets = sorted(
        {u.split("://", 1)[1].split("/", 1)[0] for u in uris if "://" in u and not u.startswith("file://")}
    )
    where = f"{', '.join(f's3://{b}' for b in buckets) or 'the store'} at {endpoint}"
    cause, env = cause_of(exc), whose(exc)
    if cause == CREDENTIALS:
        return (
            f"no credentials for {where} in {environment_of(env)}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance or IRSA role"
            + ("" if env == DRIVER else " on every Ray node (or pass them with --storage-options)")
        )
    if cause == ENDPOINT:
        found = re.search(r"https?://[^/\s\"']+", text)
        return (
            f"cannot connect to the S3 endpoint {found.group(0) if found else endpoint} from {env}: "
            "is it running, and is AWS_ENDPOINT_URL right?"
        )
    if cause == BUCKET:
        return f"no such bucket: {where}, seen by {env} (check the name; tagpipe never creates buckets)"
    remote = buckets or any(
        word in text for word in ("botocore", "ClientError", "s3fs", "AccessDenied", "Forbidden")
    )
    if remote and cause == DENIED:
        return (
            f"access denied to {where}: the credentials in {environment_of(env)} may not read or write "
            "there (or the key is wrong)"
        )
    return None


def default_permissions(root) -> None:
    """Give files under root (or root itself) the modes a plain open() would: 0666 and
    0777 less the umask. Some writers (ONNX's external data) create files 0600, which
    another user, such as a container's non-root user reading a mounted volume, cannot read."""
    import os
    from pathlib import Path

    umask = os.umask(0)
    os.umask(umask)
    root = Path(root)
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def staged_folder(target):
    """Build a local folder under a temporary name beside `target`, then rename it into
    place: a failure leaves nothing, and nothing that was at `target` is overwritten
    (a non-empty `target` is refused before any work)."""
    import shutil
    import tempfile
    from pathlib import Path

    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise TagpipeError(f"{target} already exists: write to a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        default_permissions(staging)
        if target.exists():
            target.rmdir()  # empty, checked above
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_bytes(
    uri: str, storage_options: dict | None = None, attempts: int = 5, max_bytes: int | None = None
) -> bytes:
    """A file's bytes; with max_bytes, at most that many (one ranged read)."""
    fs, path = filesystem_for(uri, storage_options)
    if (
        max_bytes is not None
        and is_local(fs)
        and retry(lambda: fs.size(path), attempts=attempts, what=uri) < max_bytes
    ):
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
