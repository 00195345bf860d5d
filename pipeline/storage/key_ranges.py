"""A prefix of millions of keys, listed in parallel by key ranges.

An object store lists a prefix as a chain of pages (1,000 keys on S3), each request
waiting for the previous one's last key: 10M keys is 10,000 round trips in a row, most
of an hour at 0.3 s a page, on one driver thread. A range (after, upto] of keys can be
listed from its own start (S3's StartAfter), so ranges go in parallel.

Nothing is known beforehand of how the keys spread, so the listing learns it. A range
still going after `pages_per_range` pages is cut after its last key: at every character
position from where the range's keys part from its upper bound down to where the keys it
listed start to differ, by the characters seen in them (a prefix of hex names fans out by
its first character, numbered names by each digit from the most significant that
varies). The pieces are listed in parallel and cut again where still dense. The pieces
partition the key line, so every key is listed exactly once whatever its characters; a
cut that guesses badly costs requests (measured in benchmarks/listing_scale.py), never
keys. Keys are listed without a delimiter: nested folders are just keys with "/".
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

from pipeline.core.errors import TagpipeError
from pipeline.storage.filesystem import retry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyRangeSettings:
    concurrency: int = 32  # ranges listed at once (threads: listing waits on the network)
    pages_per_range: int = 10  # pages a range lists before it is cut and fanned out
    page_keys: int = 1000  # keys per request (S3's maximum)


@dataclass
class Page:
    """One listing request's answer, as columns; `truncated`: more keys follow."""

    keys: list[str]
    sizes: list[int]
    etags: list[str | None]
    mtimes: list[float | None]
    truncated: bool


class KeyPages(Protocol):
    """A store that lists keys under a key prefix in order, from after a given key."""

    def list_page(self, prefix: str, start_after: str, max_keys: int) -> Page: ...


class S3KeyPages:
    """list_objects_v2 through s3fs's own client (credentials, endpoint, retries)."""

    def __init__(self, fs, bucket: str):
        self.fs, self.bucket = fs, bucket

    def list_page(self, prefix: str, start_after: str, max_keys: int) -> Page:
        request = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max_keys}
        if start_after:
            request["StartAfter"] = start_after
        answer = retry(lambda: self.fs.call_s3("list_objects_v2", **request), what=f"{self.bucket}/{prefix}")
        contents = answer.get("Contents", [])
        return Page(
            [c["Key"] for c in contents],
            [int(c.get("Size", 0)) for c in contents],
            [str(c["ETag"]).strip('"') if c.get("ETag") else None for c in contents],
            [c["LastModified"].timestamp() if c.get("LastModified") else None for c in contents],
            bool(answer.get("IsTruncated")),
        )


def key_pages_for(fs, path: str) -> tuple[KeyPages, str, str] | None:
    """(pages, bucket or root, key prefix) when the store lists by key ranges; None when it
    does not (local disks and other stores keep the folder walk)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if hasattr(fs, "list_page"):
        bucket, _, key = path.strip("/").partition("/")
        return fs, bucket, key.rstrip("/") + "/" if key else ""
    if "s3" in protocols and hasattr(fs, "call_s3"):  # s3fs: its own split knows access-point ARNs
        bucket, key, _version = fs.split_path(path)
        return S3KeyPages(fs, bucket), bucket, key.rstrip("/") + "/" if key else ""
    return None


@dataclass(frozen=True)
class KeyRange:
    after: str  # keys strictly after this one ("": from the first)
    upto: str | None  # up to and including this key (None: to the last)


@dataclass
class RangeListing:
    """What listing one range found; resume_after: where it stopped, still dense."""

    pages: list[Page]
    requests: int
    resume_after: str | None


def list_range(pages: KeyPages, prefix: str, span: KeyRange, settings: KeyRangeSettings) -> RangeListing:
    """Up to pages_per_range pages of `span`, in order."""
    found: list[Page] = []
    start = span.after
    for request in range(1, settings.pages_per_range + 1):
        page = pages.list_page(prefix, start, settings.page_keys)
        _check_order(page, start)
        if span.upto is not None and page.keys and page.keys[-1] > span.upto:
            found.append(_cut(page, span.upto))
            return RangeListing(found, request, None)
        found.append(page)
        if not page.truncated or not page.keys:
            return RangeListing(found, request, None)
        start = page.keys[-1]
    return RangeListing(found, settings.pages_per_range, start)


class UnorderedListing(TagpipeError):
    """The store ignored StartAfter or listed keys out of order (some S3-compatible
    servers, S3 Express directory buckets): key ranges cannot be trusted there."""


def _check_order(page: Page, start: str) -> None:
    if page.truncated and not page.keys:
        raise UnorderedListing("the store said more keys follow but sent none")
    if page.keys and start and page.keys[0] <= start:
        raise UnorderedListing(f"asked for keys after {start!r}, the store sent {page.keys[0]!r}")
    if any(a >= b for a, b in zip(page.keys, page.keys[1:])):
        raise UnorderedListing("the store listed keys out of order")


def _cut(page: Page, upto: str) -> Page:
    n = sum(1 for key in page.keys if key <= upto)  # keys are in order
    return Page(page.keys[:n], page.sizes[:n], page.etags[:n], page.mtimes[:n], False)


def split_range(span: KeyRange, first_key: str, last_key: str, prefix: str, seen: str) -> list[KeyRange]:
    """(last_key, upto] cut at every position from where last_key parts from upto down to
    where the listed keys (first_key..last_key) differ, by the characters `seen` in them."""
    top = len(prefix) if span.upto is None else len(os.path.commonprefix([last_key, span.upto]))
    deepest = max(top, len(os.path.commonprefix([first_key, last_key])))
    alphabet = sorted(set(seen))
    bounds: list[str] = []
    for position in range(min(deepest, len(last_key) - 1), top - 1, -1):  # deepest first: ascending
        stem = last_key[:position]
        bounds += [
            stem + c
            for c in alphabet
            if c > last_key[position] and (span.upto is None or stem + c < span.upto)
        ]
    edges = [last_key, *bounds]
    return [KeyRange(a, b) for a, b in zip(edges, [*bounds, span.upto], strict=True)]


@dataclass
class KeyListing:
    """Every key under a prefix, as columns (in no particular order), and what it cost."""

    table: pa.Table  # key, size, etag, mtime; or what `transform` made of them
    requests: int
    ranges: int
    keys: int  # keys listed, before any transform


KEY_LISTING_SCHEMA = pa.schema(
    [("key", pa.string()), ("size", pa.int64()), ("etag", pa.string()), ("mtime", pa.float64())]
)


def list_keys(
    pages: KeyPages,
    prefix: str,
    settings: KeyRangeSettings = KeyRangeSettings(),
    on_keys=None,
    transform=None,
) -> KeyListing:
    """All keys under `prefix`, listed by ranges in parallel. on_keys(n): progress;
    transform(table): applied to each range's keys as they arrive (so a caller's rows are
    built one range at a time, never all keys twice)."""
    tables: list[pa.Table] = []
    requests = ranges = keys_listed = 0
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(settings.concurrency, "list-range") as pool:
        pending = {pool.submit(list_range, pages, prefix, KeyRange("", None), settings): KeyRange("", None)}
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                span = pending.pop(future)
                listed = future.result()
                requests += listed.requests
                ranges += 1
                if listed.resume_after is not None:
                    keys = [key for page in listed.pages for key in page.keys]
                    seen = "".join(key[len(prefix) :] for key in keys)
                    for piece in split_range(span, keys[0], keys[-1], prefix, seen):
                        pending[pool.submit(list_range, pages, prefix, piece, settings)] = piece
                found = _as_table(listed.pages)
                keys_listed += found.num_rows
                if on_keys is not None:
                    on_keys(found.num_rows)
                tables.append(transform(found) if transform is not None else found)
    if tables:
        table = pa.concat_tables(tables)
    else:
        empty = KEY_LISTING_SCHEMA.empty_table()
        table = transform(empty) if transform is not None else empty
    log.debug(
        "listed %d keys under %r: %d requests, %d ranges, %.1f s",
        keys_listed, prefix, requests, ranges, time.monotonic() - started,
    )  # fmt: skip
    return KeyListing(table, requests, ranges, keys_listed)


def _as_table(pages: list[Page]) -> pa.Table:
    return pa.table(
        {
            "key": pa.array([k for p in pages for k in p.keys], pa.string()),
            "size": pa.array([s for p in pages for s in p.sizes], pa.int64()),
            "etag": pa.array([e for p in pages for e in p.etags], pa.string()),
            "mtime": pa.array([m for p in pages for m in p.mtimes], pa.float64()),
        },
        schema=KEY_LISTING_SCHEMA,
    )
