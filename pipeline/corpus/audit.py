"""`tagpipe audit`: every eval image that is a copy or near-duplicate of a train image.

Three signals, as in dedup (pipeline/corpus/duplicate_signals.py): the same sha256; phash
within R bits between hashes that carry detail; the tagger's embedding at cosine >= a
threshold (given, or "auto" from the data). Inputs are tagpipe outputs (tag tables,
split outputs) or Parquet/CSV files with sha256, phash (uint64 or 16 hex digits) and,
optionally, embedding columns. A split output is read for its train rows (--train) or
its val/test rows (--eval); its hashes and embeddings come from the tag table given
with --tags. The report says how many eval images each signal could not check
(no hash, a low-detail hash, no embedding); "clean" is printed only when no leak was
found and every eval image was checked by phash or embedding. Exit status 1 on leaks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from pipeline.core.errors import TagpipeError
from pipeline.core.schemas import LEAKS_SCHEMA, conform
from pipeline.corpus.duplicate_signals import (
    EMBEDDING,
    PHASH,
    SHA256,
    Edges,
    embedding_edges,
    embedding_matrix,
    table_hashes,
)
from pipeline.corpus.hamming_search import near_pairs
from pipeline.storage.filesystem import filesystem_for, write_atomic
from pipeline.table.reading import read_parquet

log = logging.getLogger(__name__)
SIGNAL_COLUMNS = ["uri", "sha256", "phash", "phash_hex", "phash_degenerate", "embedding", "split", "error"]


@dataclass
class AuditReport:
    train_images: int = 0
    eval_images: int = 0
    leaks: int = 0  # eval images with a train copy or near-duplicate by any signal
    exact_leaks: int = 0  # of which byte-identical
    by_signal: dict = field(default_factory=dict)  # signal -> eval images it found
    not_checked: dict = field(default_factory=dict)  # signal -> eval images it could not check
    train_not_usable: dict = field(default_factory=dict)  # signal -> train images it could not use
    unchecked: int = 0  # eval images neither phash nor embedding could check
    max_distance: int = 6
    embedding: dict = field(default_factory=dict)  # threshold and how it was chosen; {} if not used
    histogram: dict = field(
        default_factory=dict
    )  # bits -> eval images whose nearest train image (sha256 or phash) is that far

    def text(self) -> str:
        if self.leaks:
            verdict = "LEAKS FOUND" + (
                f" ({self.unchecked} eval images could not be checked)" if self.unchecked else ""
            )
        elif self.unchecked:
            verdict = (
                f"no leaks found, but {self.unchecked} eval images could not be checked for near-duplicates"
            )
        elif self.embedding.get("threshold") is None:
            verdict = (
                "no leaks found by sha256 and phash; the embedding was not used, "
                "so crops and edits went unchecked"
            )
        else:
            verdict = "clean"
        found = ", ".join(f"{k} {v}" for k, v in self.by_signal.items()) or "none"
        missed = ", ".join(f"{k} {v}" for k, v in self.not_checked.items()) or "none"
        emb = self.embedding
        emb_text = (
            f"cosine >= {emb['threshold']:.4f} ({emb['chosen_by']})"
            if emb.get("threshold") is not None
            else f"not used ({emb.get('reason') or 'off'})"
        )
        return (
            f"audit: {verdict}: {self.leaks} of {self.eval_images} eval images are copies "
            "or near-duplicates of the "
            f"{self.train_images} train images ({self.exact_leaks} byte-identical); found by {found}; "
            f"not checkable by: {missed}; phash R={self.max_distance}, embedding {emb_text}"
        )


def read_hashes(uri: str, storage_options: dict | None = None, role: str = "train") -> pa.Table:
    """read_signals without a tag table to join (the name split and older code use)."""
    return read_signals(uri, storage_options, role)


def read_signals(
    uri: str, storage_options: dict | None = None, role: str = "train", tags: str | None = None
) -> pa.Table:
    """uri, sha256, phash (uint64, null where unknown), phash_unreliable, embedding (or
    null) from any supported input; a split output's train or eval rows, with hashes
    and embeddings joined from tags when given."""
    fs, path = filesystem_for(uri, storage_options)
    if fs.isdir(path) and fs.isfile(
        path.rstrip("/") + "/splits.parquet"
    ):  # a split output folder (it may hold audits)
        uri, path = uri.rstrip("/") + "/splits.parquet", path.rstrip("/") + "/splits.parquet"
    if path.endswith(".csv"):
        with fs.open(path, "rb") as handle:
            table = pcsv.read_csv(handle)
        if "embedding" in table.column_names:
            raise TagpipeError(
                f"{uri}: a CSV cannot hold embedding vectors; give Parquet with a list column, "
                "or drop the embedding column"
            )
    else:
        table = read_parquet(uri, storage_options, SIGNAL_COLUMNS, only_present=True)
    names = set(table.column_names)
    if not names & {"sha256", "phash", "phash_hex", "embedding"}:
        raise TagpipeError(f"{uri}: needs sha256, phash or embedding columns (has {sorted(names)})")
    if "split" in names:
        split = table.column("split")
        keep = (
            pc.equal(split, "train")
            if role == "train"
            else pc.invert(pc.is_in(split, pa.array(["train", "held_out"])))
        )
        table = table.filter(keep)
        if tags:
            table = _join_tags(table, tags, storage_options)
    elif "error" in names:
        table = table.filter(pc.is_null(table.column("error")))
    return _normalised(table, uri)


def _join_tags(table: pa.Table, tags: str, storage_options: dict | None) -> pa.Table:
    """A split's rows with the tag table's phash flag and embedding, by uri."""
    extra = read_parquet(tags, storage_options, ["uri", "phash_degenerate", "embedding"], only_present=True)
    position = {u: i for i, u in enumerate(extra.column("uri").to_pylist())}
    take = pa.array(
        [position.get(u) for u in table.column("uri").to_pylist()], pa.int64()
    )  # null: not tagged
    for name in extra.column_names:
        if name != "uri":  # Arrow joins do not carry fixed-size lists: taken by position
            column = extra.column(name).take(take)
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, column)
            else:
                table = table.append_column(name, column)
    return table


def _normalised(table: pa.Table, uri: str) -> pa.Table:
    names = set(table.column_names)
    n = table.num_rows
    if "phash" in names and pa.types.is_integer(table.schema.field("phash").type):
        phash = table.column("phash").cast(pa.uint64())
    elif "phash" in names or "phash_hex" in names:
        text = table.column("phash" if "phash" in names else "phash_hex").to_pylist()
        phash = pa.array([int(h, 16) if h else None for h in text], pa.uint64())
    else:
        phash = pa.nulls(n, pa.uint64())
    flagged = (
        table.column("phash_degenerate").fill_null(False)
        if "phash_degenerate" in names
        else pa.array([False] * n)
    )
    columns = {
        "uri": table.column("uri")
        if "uri" in names
        else pa.array([f"{uri}#{i}" for i in range(n)], pa.string()),
        "sha256": table.column("sha256").cast(pa.string()) if "sha256" in names else pa.nulls(n, pa.string()),
        "phash": phash,
        "phash_unreliable": flagged,
    }
    if "embedding" in names:
        columns["embedding"] = table.column("embedding")
    return pa.table(columns)


def audit(
    train: pa.Table, evaluation: pa.Table, max_distance: int, embedding_threshold: float | str | None = "auto"
) -> tuple[pa.Table, AuditReport]:
    """(leaks: eval_uri, train_uri, signal, distance, cosine, exact; per eval image and
    signal, its nearest train image), report."""
    report = AuditReport(
        train_images=train.num_rows, eval_images=evaluation.num_rows, max_distance=max_distance
    )
    found: dict[
        tuple[int, str], tuple[float, int, int, float]
    ] = {}  # (eval, signal) -> (rank key, train, distance, cosine)
    _sha256_leaks(train, evaluation, found)
    phash_checked = _phash_leaks(train, evaluation, max_distance, found, report)
    emb_checked = _embedding_leaks(train, evaluation, embedding_threshold, found, report)
    report.unchecked = int((~(phash_checked | emb_checked)).sum())
    return _leak_table(train, evaluation, found, report), report


def _sha256_leaks(train: pa.Table, evaluation: pa.Table, found: dict) -> None:
    train_sha = {s: i for i, s in enumerate(train.column("sha256").to_pylist()) if s}
    for j, s in enumerate(evaluation.column("sha256").to_pylist()):
        if s and s in train_sha:
            found[(j, SHA256)] = (0.0, train_sha[s], 0, 1.0)


def _phash_leaks(train, evaluation, max_distance, found, report) -> np.ndarray:
    """Nearest reliable train hash within max_distance, per eval image; returns which
    eval images phash could check."""
    t_hash, _, t_ok, _ = table_hashes(train, "phash_unreliable")
    e_hash, _, e_ok, reasons = table_hashes(evaluation, "phash_unreliable")
    report.train_not_usable[PHASH] = int((~t_ok).sum())
    if not t_ok.any():  # nothing on the train side to compare with: nothing was checked
        e_ok = np.zeros_like(e_ok)
        reasons = {"no_usable_train_hash": evaluation.num_rows}
    report.not_checked[PHASH] = int((~e_ok).sum())
    report.not_checked.update({f"{PHASH}:{k}": v for k, v in reasons.items() if v})
    t_rows, e_rows = np.flatnonzero(t_ok), np.flatnonzero(e_ok)
    if not (len(t_rows) and len(e_rows)):
        return e_ok
    hashes, inverse = np.unique(np.concatenate([t_hash[t_rows], e_hash[e_rows]]), return_inverse=True)
    t_of, e_of = inverse[: len(t_rows)], inverse[len(t_rows) :]
    first_train = np.full(len(hashes), -1, np.int64)
    first_train[t_of[::-1]] = t_rows[::-1]  # a train row per distinct hash (the first)
    a, b = near_pairs(hashes, max_distance)
    same = np.unique(t_of)
    x = np.concatenate([a, b, same])  # eval-side hash, train-side hash, distance
    y = np.concatenate([b, a, same])
    d = np.concatenate(
        [np.bitwise_count(hashes[a] ^ hashes[b])] * 2 + [np.zeros(len(same), np.uint8)]
    ).astype(np.int64)
    hit = first_train[y] >= 0
    x, y, d = x[hit], y[hit], d[hit]
    order = np.lexsort((np.arange(len(d)), d))
    h, first = np.unique(x[order], return_index=True)
    nearest = dict(zip(h.tolist(), zip(d[order][first].tolist(), first_train[y[order][first]].tolist())))
    for row, code in zip(e_rows.tolist(), e_of.tolist()):
        if code in nearest:
            distance, t = nearest[code]
            found[(row, PHASH)] = (float(distance), t, distance, float("nan"))
    return e_ok


def _embedding_leaks(train, evaluation, threshold, found, report) -> np.ndarray:
    """Train images at cosine >= threshold, per eval image; returns which eval images
    the embedding checked (a usable vector, and a threshold to check with)."""
    checked = np.zeros(evaluation.num_rows, bool)
    have = "embedding" in train.column_names and "embedding" in evaluation.column_names
    if threshold is None or not have:
        report.not_checked[EMBEDDING] = evaluation.num_rows
        report.embedding = {
            "threshold": None,
            "reason": "off" if threshold is None else "no embedding column",
        }
        return checked
    t_rows, t_vec = embedding_matrix(train.column("embedding"))
    e_rows, e_vec = embedding_matrix(evaluation.column("embedding"))
    if not len(t_rows) or not len(e_rows) or t_vec.shape[1] != e_vec.shape[1]:
        report.not_checked[EMBEDDING] = evaluation.num_rows
        report.embedding = {"threshold": None, "reason": "no comparable embeddings on both sides"}
        return checked
    vectors = np.vstack([t_vec, e_vec])
    side = np.r_[np.zeros(len(t_rows), bool), np.ones(len(e_rows), bool)]
    index = np.r_[t_rows, e_rows]
    edges = Edges()
    groups = np.arange(len(vectors))
    # auto: negatives from train pairs only, so the leaks being looked for cannot raise the bar
    choice, facts = embedding_edges(
        vectors,
        np.arange(len(vectors)),
        threshold,
        groups,
        (np.zeros(0), np.zeros(0)),
        edges,
        negatives_from=~side,
    )
    usable = facts.pop("usable")
    report.embedding = {**asdict(choice), **facts}
    report.train_not_usable[EMBEDDING] = int(len(train) - (usable & ~side).sum())
    if choice.threshold is None:
        report.not_checked[EMBEDDING] = evaluation.num_rows
        return checked
    a, b, _, _, cosine = edges.arrays()
    cross = side[a] != side[b]
    for x, y, c in zip(a[cross].tolist(), b[cross].tolist(), cosine[cross].tolist()):
        e, t = (x, y) if side[x] else (y, x)
        key = (int(index[e]), EMBEDDING)
        if key not in found or -c < found[key][0]:
            found[key] = (-c, int(index[t]), -1, c)
    checked[index[side & usable]] = (usable & ~side).any()
    report.not_checked[EMBEDDING] = int((~checked).sum())
    return checked


def _leak_table(train, evaluation, found, report) -> pa.Table:
    eval_uris, train_uris = evaluation.column("uri").to_pylist(), train.column("uri").to_pylist()
    keys = sorted(found, key=lambda k: (k[0], [SHA256, PHASH, EMBEDDING].index(k[1])))
    leaking = {e for e, _ in keys}
    report.leaks = len(leaking)
    report.exact_leaks = sum(1 for e, s in keys if s == SHA256)
    report.by_signal = {s: sum(1 for _, k in keys if k == s) for s in (SHA256, PHASH, EMBEDDING)}
    nearest: dict[int, int] = {}  # eval image -> bits to its nearest train image (same bytes: 0)
    for (e, s), (_, _, distance, _) in found.items():
        if s in (SHA256, PHASH):
            nearest[e] = min(nearest.get(e, 99), distance)
    for distance in nearest.values():
        report.histogram[str(distance)] = report.histogram.get(str(distance), 0) + 1
    rows = [found[k] for k in keys]
    table = pa.table(
        {
            "eval_uri": pa.array([eval_uris[e] for e, _ in keys], pa.string()),
            "train_uri": pa.array([train_uris[r[1]] for r in rows], pa.string()),
            "signal": pa.array([s for _, s in keys], pa.string()),
            "distance": pa.array(
                [r[2] if s != EMBEDDING else None for (_, s), r in zip(keys, rows)], pa.int32()
            ),
            "cosine": pa.array(
                [r[3] if s == EMBEDDING else None for (_, s), r in zip(keys, rows)], pa.float32()
            ),
            "exact": pa.array([s == SHA256 for _, s in keys], pa.bool_()),
        }
    )
    return conform(table, LEAKS_SCHEMA)


def run_audit(
    train: str,
    evaluation: str,
    max_distance: int = 6,
    output: str | None = None,
    storage_options: dict | None = None,
    tags: str | None = None,
    embedding_threshold: float | str | None = "auto",
) -> tuple[pa.Table, AuditReport]:
    if not 0 <= max_distance <= 32:
        raise TagpipeError(f"--max-distance must be 0-32 bits, got {max_distance}")
    leaks, report = audit(
        read_signals(train, storage_options, "train", tags),
        read_signals(evaluation, storage_options, "eval", tags),
        max_distance,
        embedding_threshold,
    )
    if output:
        path = output.rstrip("/")
        write_atomic(f"{path}/leaks.parquet", table=leaks, storage_options=storage_options)
        write_atomic(
            f"{path}/audit.json",
            json.dumps(asdict(report), indent=1).encode(),
            storage_options=storage_options,
        )
    return leaks, report
