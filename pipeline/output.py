"""The tag output: a directory of Parquet part files, each named from its input slice.

A part holds the rows of one slice of the run's sorted manifest and is named from the
model fingerprint and the slice's URIs, so a rerun rewrites the same name instead of
adding a UUID-named copy. Parts are committed atomically (temp file + rename on local
disks, a single PUT on object stores, which is atomic per object). A rerun skips every
uri already present for the same model, which is how a killed job resumes.
Run manifests live under _runs/ and input listings under _manifests/, which dataset
readers skip (leading underscore).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import filesystem_for, retry

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"
MANIFESTS_DIR = "_manifests"
TMP_DIR = "_tmp"


def part_name(model_sha256: str, uris: list[str]) -> str:
    digest = hashlib.sha256(model_sha256.encode())
    for uri in uris:
        digest.update(b"\0" + uri.encode())
    return f"part-{digest.hexdigest()[:24]}.parquet"


class OutputDir:
    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.path = filesystem_for(self.uri, storage_options)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def part_files(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        return sorted(p for p in self.fs.ls(self.path, detail=False) if posixpath.basename(p).startswith("part-") and p.endswith(".parquet"))

    def done_uris(self, model_sha256: str) -> set[str]:
        """URIs already committed for this model (only two columns are read)."""
        done: set[str] = set()
        for path in self.part_files():
            with self.fs.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=["uri", "model_sha256"])
            mask = pa.compute.equal(table.column("model_sha256"), model_sha256)
            done.update(table.filter(mask).column("uri").to_pylist())
        return done

    def write_part(self, name: str, table: pa.Table) -> str:
        """Write one part atomically; returns its path."""
        self.fs.makedirs(self.path, exist_ok=True)
        final = self._join(name)
        if self.local:
            tmp_dir = self._join(TMP_DIR)
            os.makedirs(tmp_dir, exist_ok=True)
            tmp = posixpath.join(tmp_dir, f"{name}.{uuid.uuid4().hex}")
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, final)
        else:
            def put():
                with self.fs.open(final, "wb") as handle:
                    pq.write_table(table, handle, compression="zstd")

            retry(put, what=final)
        return final

    def write_input_manifest(self, run_id: str, manifest: pa.Table) -> str:
        """The listing this run works from (uri, source_size, etag, mtime), written first."""
        path = self._join(MANIFESTS_DIR, f"{run_id}.parquet")
        self.fs.makedirs(self._join(MANIFESTS_DIR), exist_ok=True)

        def put():
            with self.fs.open(path, "wb") as handle:
                pq.write_table(manifest, handle, compression="zstd")

        retry(put, what=path)
        return path

    def write_run_manifest(self, run_id: str, record: dict) -> str:
        path = self._join(RUNS_DIR, f"{run_id}.json")
        self.fs.makedirs(self._join(RUNS_DIR), exist_ok=True)
        data = json.dumps(record, indent=1, sort_keys=True, default=str)
        retry(lambda: self.fs.pipe_file(path, data.encode()), what=path)
        return path
