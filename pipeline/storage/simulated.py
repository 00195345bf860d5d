"""An object store of N virtual objects with a set latency per listing page.

Listing and planning at 10M objects cannot be tried against a real bucket here, so this
fsspec filesystem serves a bucket's worth of virtual keys (no bytes behind them) and
sleeps `page_latency` seconds per page of up to 1,000 keys, as a store's LIST round trip
does. It lists both ways a store can: `ls` with a delimiter (one folder, paged, as the
folder walk uses it) and `list_page` by key range (pipeline/storage/key_ranges.py). It is
registered as `simstore://` (pipeline/storage/filesystem.py) so that the listing code
users run is what the benchmark (benchmarks/listing_scale.py) and the tests measure.

Options (storage_options): objects, layout ("flat": img00000000.jpg...; "nested":
1,000 keys per folder, d00000/img00000000.jpg...), names ("numbered" or "hashed": 16 hex
characters, as content-addressed stores name objects), page_latency (seconds).
"""

from __future__ import annotations

import hashlib
import threading
import time
from functools import lru_cache

import numpy as np
from fsspec import AbstractFileSystem

from pipeline.storage.key_ranges import Page

PAGE_KEYS = 1000
MTIME = 1_780_000_000.0  # every virtual object's modification time


@lru_cache(maxsize=4)
def virtual_keys(objects: int, layout: str, names: str) -> np.ndarray:
    """The store's keys, sorted, as a bytes array (1 byte a character)."""
    if names == "hashed":
        stems = [hashlib.blake2b(i.to_bytes(8, "little"), digest_size=8).hexdigest() for i in range(objects)]
    elif names == "numbered":
        stems = [f"img{i:08d}" for i in range(objects)]
    else:
        raise ValueError(f"simstore names: 'numbered' or 'hashed', not {names!r}")
    if layout == "nested":
        keys = [f"d{i // PAGE_KEYS:05d}/{stem}.jpg" for i, stem in enumerate(stems)]
    elif layout == "flat":
        keys = [f"{stem}.jpg" for stem in stems]
    else:
        raise ValueError(f"simstore layout: 'flat' or 'nested', not {layout!r}")
    return np.sort(np.array(keys, dtype=np.bytes_))


class SimulatedStore(AbstractFileSystem):
    """simstore://bucket/...: `objects` virtual keys under bucket/, listed with latency."""

    protocol = "simstore"
    root_marker = ""

    def __init__(
        self,
        objects: int = 1000,
        layout: str = "flat",
        names: str = "numbered",
        page_latency: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.objects, self.layout, self.names, self.page_latency = objects, layout, names, page_latency
        self.requests = 0
        self._lock = threading.Lock()

    @property
    def keys(self) -> np.ndarray:
        return virtual_keys(self.objects, self.layout, self.names)

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("simstore://") :] if path.startswith("simstore://") else path
        return path.rstrip("/")

    def _request(self) -> None:
        with self._lock:
            self.requests += 1
        if self.page_latency:
            time.sleep(self.page_latency)

    def _split(self, path: str) -> tuple[str, str]:
        bucket, _, key = self._strip_protocol(path).partition("/")
        return bucket, key

    def list_page(self, prefix: str, start_after: str, max_keys: int) -> Page:
        """Keys under `prefix` (relative to the bucket's root), after start_after, in order."""
        self._request()
        keys = self.keys
        low = np.searchsorted(keys, prefix.encode(), side="left")
        if start_after:
            low = max(low, np.searchsorted(keys, start_after.encode(), side="right"))
        chunk = [k.decode() for k in keys[low : low + max_keys + 1] if k.startswith(prefix.encode())]
        shown = chunk[:max_keys]
        return Page(
            shown, [1000] * len(shown), [None] * len(shown), [MTIME] * len(shown), len(chunk) > max_keys
        )

    def _file(self, bucket: str, key: str) -> dict:
        return {"name": f"{bucket}/{key}", "size": 1000, "type": "file", "mtime": MTIME}

    def ls(self, path, detail=True, **kwargs):
        """One folder, paged like a delimiter listing: a request per 1,000 entries."""
        bucket, key = self._split(path)
        prefix = (key + "/").encode() if key else b""
        keys = self.keys
        low, high = np.searchsorted(keys, prefix), np.searchsorted(keys, prefix + b"\xff")
        entries: dict[str, dict] = {}
        for raw in keys[low:high]:
            rest = raw[len(prefix) :].decode()
            head, slash, _ = rest.partition("/")
            if slash:
                name = f"{bucket}/{prefix.decode()}{head}"
                entries.setdefault(name, {"name": name, "size": 0, "type": "directory"})
            else:
                entries[f"{bucket}/{prefix.decode()}{rest}"] = self._file(bucket, prefix.decode() + rest)
        for _ in range(max(1, -(-len(entries) // PAGE_KEYS))):
            self._request()
        if not entries and key:
            raise FileNotFoundError(path)
        return list(entries.values()) if detail else list(entries)

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        bucket, key = self._split(path)
        prefix = (key + "/").encode() if key else b""
        keys = self.keys
        low, high = np.searchsorted(keys, prefix), np.searchsorted(keys, prefix + b"\xff")
        for _ in range(max(1, -(-(high - low) // PAGE_KEYS))):
            self._request()
        found = {f"{bucket}/{k.decode()}": self._file(bucket, k.decode()) for k in keys[low:high]}
        return found if detail else list(found)

    def info(self, path, **kwargs):
        bucket, key = self._split(path)
        keys = self.keys
        if key and keys[min(np.searchsorted(keys, key.encode()), len(keys) - 1)] == key.encode():
            return self._file(bucket, key)
        prefix = (key + "/").encode() if key else b""
        at = np.searchsorted(keys, prefix)
        if at < len(keys) and keys[at].startswith(prefix):
            return {"name": f"{bucket}/{key}".rstrip("/"), "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def _open(self, path, mode="rb", **kwargs):
        raise NotImplementedError("simstore objects are virtual: they list, they do not read")
