"""Can this process read the inputs and write the output? Asked with a few requests
before a run's work: one object found under each input (one listing page), one byte of
it read, one probe object created and deleted under the output.

The tag job asks it twice (pipeline/job/preflight.py): in the driver, and in one Ray task
on every node, because the workers' environment (credentials, role, endpoint) is the
nodes' own, not the driver's. What failed comes back as a `ProbeFailure` (plain strings,
so it crosses from a Ray task to the driver); the driver words it. No credential value
is ever in it: only the exception's type and first line, which botocore words without keys.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from pipeline.storage.filesystem import cause_of, filesystem_for, is_local, read_bytes, retry
from pipeline.storage.key_ranges import key_pages_for

READ, WRITE = "read", "write"


@dataclass(frozen=True)
class ProbeFailure:
    """One step of the probe that failed: `step` READ or WRITE, the uri it touched,
    `cause` what a store's refusal means (filesystem.cause_of; None: another error) and
    `detail`, the exception's type and first line."""

    step: str
    uri: str
    cause: str | None
    detail: str


def first_object(uri: str, storage_options: dict | None = None) -> str:
    """One object the input names: itself when it is an object (a file, a manifest, an
    inventory report); under a prefix, the first key of one listing page (one request:
    MaxKeys 1), or the first file of a folder walk on other stores. A prefix that holds
    nothing gives the prefix itself; a missing input raises FileNotFoundError."""
    fs, path = filesystem_for(uri, storage_options)
    if not retry(lambda: fs.exists(path), what=uri):
        raise FileNotFoundError(uri)
    if not retry(lambda: fs.isdir(path), what=uri):
        return uri
    pages = None if is_local(fs) else key_pages_for(fs, path)
    if pages is not None:
        store, bucket, prefix = pages
        keys = retry(lambda: store.list_page(prefix, "", 1).keys, what=uri)
        return _named_like(uri, fs, f"{bucket}/{keys[0]}") if keys else uri
    for root, _dirs, files in fs.walk(path):
        if files:
            return _named_like(uri, fs, posixpath.join(root, sorted(files)[0]))
    return uri


def _named_like(uri: str, fs, path: str) -> str:
    """A path the store listed, with the input's protocol (local paths stay plain)."""
    if is_local(fs):
        return path
    protocol = uri.split("://", 1)[0]
    return f"{protocol}://{path.lstrip('/')}"


def probe_place(output: str, name: str) -> str:
    """Where the probe object goes: under the output; for a local output that does not
    exist yet, in its nearest existing folder (the probe creates no folder)."""
    if "://" in output and not output.startswith("file://"):
        return output.rstrip("/") + "/" + name
    folder = os.path.abspath(os.path.expanduser(output.removeprefix("file://")))
    while not os.path.isdir(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    return os.path.join(folder, name)


def probe_storage(reads: list[str], probe: str, storage_options: dict | None = None) -> ProbeFailure | None:
    """Read one byte of each of `reads`, then create and delete the object `probe`;
    the first failure, or None. Transient errors are retried as a run's reads are."""
    for uri in reads:
        try:
            read_bytes(uri, storage_options, max_bytes=1)
        except Exception as exc:
            return _failure(READ, uri, exc)
    fs, path = filesystem_for(probe, storage_options)
    try:
        retry(lambda: fs.pipe_file(path, b"tagpipe preflight probe\n"), what=probe)
        retry(lambda: fs.rm_file(path), what=probe)
    except Exception as exc:
        return _failure(WRITE, probe, exc)
    return None


def _failure(step: str, uri: str, exc: BaseException) -> ProbeFailure:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return ProbeFailure(step, uri, cause_of(exc), f"{type(exc).__name__}: {first}".rstrip(": "))
