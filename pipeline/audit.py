"""`tagpipe audit`: every eval image within R bits (or byte-identical) of a train image.

Inputs are tagpipe outputs (tag or split directories) or Parquet/CSV files with a
sha256 and/or phash column (uint64, or 16 hex digits as imagehash writes). An input
with a `split` column is taken as a split output: for --train its train rows, for
--eval the rest except held-out images.
Blank-image hashes (solid colour, black) match by sha256 only, as in dedup. Exit status
1 when any leak is found, so the audit can gate CI or a nightly job.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from pipeline.errors import TagpipeError
from pipeline.hamming_search import near_pairs
from pipeline.phash import BLACK_HASH, SOLID_HASH
from pipeline.storage import filesystem_for, read_parquet, write_atomic

log = logging.getLogger(__name__)


@dataclass
class AuditReport:
    train_images: int = 0
    eval_images: int = 0
    leaks: int = 0  # eval images with a train image within R (or the same bytes)
    exact_leaks: int = 0  # of which byte-identical
    max_distance: int = 6
    histogram: dict = field(default_factory=dict)  # distance -> eval images whose nearest train image is that far

    def text(self) -> str:
        hist = ", ".join(f"{d}: {c}" for d, c in sorted(self.histogram.items(), key=lambda kv: int(kv[0]))) or "none"
        verdict = "LEAKS FOUND" if self.leaks else "clean"
        return (
            f"audit: {verdict}: {self.leaks} of {self.eval_images} eval images within {self.max_distance} bits of the "
            f"{self.train_images} train images ({self.exact_leaks} byte-identical); nearest-distance histogram: {hist}"
        )


def read_hashes(uri: str, storage_options: dict | None = None, role: str = "train") -> pa.Table:
    """uri, sha256, phash (uint64, null where unknown) from any supported input."""
    fs, path = filesystem_for(uri, storage_options)
    if path.endswith(".csv"):
        with fs.open(path, "rb") as handle:
            table = pcsv.read_csv(handle)
    else:
        table = read_parquet(uri, storage_options, ["uri", "sha256", "phash", "phash_hex", "split"], only_present=True)
    names = set(table.column_names)
    if not names & {"sha256", "phash", "phash_hex"}:
        raise TagpipeError(f"{uri}: needs a sha256 and/or phash column (has {sorted(names)})")
    if "split" in names:
        split = table.column("split")
        keep = pc.equal(split, "train") if role == "train" else pc.invert(pc.is_in(split, pa.array(["train", "held_out"])))
        table = table.filter(keep)
    n = table.num_rows
    if "phash" in names and pa.types.is_integer(table.schema.field("phash").type):
        phash = table.column("phash").cast(pa.uint64())
    elif "phash" in names or "phash_hex" in names:
        text = table.column("phash" if "phash" in names else "phash_hex").to_pylist()
        phash = pa.array([int(h, 16) if h else None for h in text], pa.uint64())
    else:
        phash = pa.nulls(n, pa.uint64())
    uris = table.column("uri") if "uri" in names else pa.array([f"{uri}#{i}" for i in range(n)], pa.string())
    sha = table.column("sha256").cast(pa.string()) if "sha256" in names else pa.nulls(n, pa.string())
    return pa.table({"uri": uris, "sha256": sha, "phash": phash})


def audit(train: pa.Table, evaluation: pa.Table, max_distance: int) -> tuple[pa.Table, AuditReport]:
    """(leaks: eval_uri, train_uri, distance, exact; one row per leaking eval image, its
    nearest train image), report."""
    report = AuditReport(train_images=train.num_rows, eval_images=evaluation.num_rows, max_distance=max_distance)
    best: dict[int, tuple[int, int]] = {}  # eval row -> (distance, train row)

    train_sha = {s: i for i, s in enumerate(train.column("sha256").to_pylist()) if s}
    exact = set()
    for j, s in enumerate(evaluation.column("sha256").to_pylist()):
        if s and s in train_sha:
            best[j] = (0, train_sha[s])
            exact.add(j)

    def usable(table):
        h = table.column("phash")
        valid = h.is_valid().to_numpy(zero_copy_only=False)
        values = h.fill_null(0).to_numpy().astype(np.uint64)
        ok = valid & (values != np.uint64(SOLID_HASH)) & (values != np.uint64(BLACK_HASH))
        return np.flatnonzero(ok), values

    t_rows, t_hash = usable(train)
    e_rows, e_hash = usable(evaluation)
    if len(t_rows) and len(e_rows):
        hashes, inverse = np.unique(np.concatenate([t_hash[t_rows], e_hash[e_rows]]), return_inverse=True)
        t_of = inverse[: len(t_rows)]
        e_of = inverse[len(t_rows) :]
        first_train = np.full(len(hashes), -1, np.int64)
        first_train[t_of[::-1]] = t_rows[::-1]  # a train row per distinct hash (the first)
        in_eval = np.zeros(len(hashes), bool)
        in_eval[e_of] = True
        a, b = near_pairs(hashes, max_distance)
        distance = np.bitwise_count(hashes[a] ^ hashes[b]).astype(np.int64)
        # distance 0: the same hash on both sides
        same = np.flatnonzero((first_train >= 0) & in_eval)
        a = np.concatenate([a, same])
        b = np.concatenate([b, same])
        distance = np.concatenate([distance, np.zeros(len(same), np.int64)])
        nearest = np.full(len(hashes), max_distance + 1, np.int64)
        nearest_train = np.full(len(hashes), -1, np.int64)
        x = np.concatenate([a, b])  # each pair both ways: eval hash x, train hash y
        y = np.concatenate([b, a])
        d = np.concatenate([distance, distance])
        hit = in_eval[x] & (first_train[y] >= 0)
        x, y, d = x[hit], y[hit], d[hit]
        order = np.lexsort((np.arange(len(d)), d))  # nearest first; ties: the first pair found
        h, first = np.unique(x[order], return_index=True)
        nearest[h] = d[order][first]
        nearest_train[h] = first_train[y[order][first]]
        for row, h in zip(e_rows, e_of):
            if nearest_train[h] >= 0 and (row not in best or nearest[h] < best[row][0]):
                best[int(row)] = (int(nearest[h]), int(nearest_train[h]))
    eval_uris = evaluation.column("uri").to_pylist()
    train_uris = train.column("uri").to_pylist()
    rows = sorted(best.items())
    leaks = pa.table(
        {
            "eval_uri": pa.array([eval_uris[j] for j, _ in rows], pa.string()),
            "train_uri": pa.array([train_uris[t] for _, (d, t) in rows], pa.string()),
            "distance": pa.array([d for _, (d, t) in rows], pa.int32()),
            "exact": pa.array([j in exact for j, _ in rows], pa.bool_()),
        }
    )
    report.leaks = len(rows)
    report.exact_leaks = len(exact)
    for _, (d, _) in rows:
        report.histogram[str(d)] = report.histogram.get(str(d), 0) + 1
    return leaks, report


def run_audit(train: str, evaluation: str, max_distance: int = 6, output: str | None = None, storage_options: dict | None = None) -> tuple[pa.Table, AuditReport]:
    if not 0 <= max_distance <= 32:
        raise TagpipeError(f"--max-distance must be 0-32 bits, got {max_distance}")
    leaks, report = audit(read_hashes(train, storage_options, "train"), read_hashes(evaluation, storage_options, "eval"), max_distance)
    if output:
        path = output.rstrip("/")
        write_atomic(f"{path}/leaks.parquet", table=leaks, storage_options=storage_options)
        write_atomic(f"{path}/audit.json", json.dumps(asdict(report), indent=1).encode(), storage_options=storage_options)
    return leaks, report
