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
from pipeline.corpus.audit_vectors import Batches, column_batches, embedding_leaks, part_batches
from pipeline.corpus.duplicate_signals import (
    EMBEDDING,
    PHASH,
    SHA256,
    exact_signals,
    known_copies,
    table_hashes,
)
from pipeline.corpus.hamming_search import pairs_touching
from pipeline.storage.filesystem import filesystem_for, write_atomic
from pipeline.table.reading import Pieces, read_parquet
from pipeline.table.tag_table import is_tag_table

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


@dataclass
class Side:
    """One side of an audit: its rows' narrow signals, and where their embeddings are read
    (part by part) when the table does not carry them in memory."""

    table: pa.Table  # uri, sha256, phash, phash_unreliable (and embedding, when in memory)
    parts: Pieces | None = None

    def batches(self) -> Batches | None:
        if "embedding" in self.table.column_names:
            return column_batches(self.table)
        if self.parts is not None:
            return part_batches(self.parts, self.table.column("uri").combine_chunks())
        return None


def read_side(
    uri: str, storage_options: dict | None = None, role: str = "train", tags: str | None = None
) -> Side:
    """read_signals without the embedding column: the side's embeddings stay in their parts
    (the tag table given with a split output, else the input's own), read one at a time."""
    table = read_signals(uri, storage_options, role, tags, with_embedding=False)
    source = tags if tags and _is_split(uri, storage_options) else uri
    parts = None
    if not source.endswith(".csv"):
        candidate = Pieces(source, storage_options)
        parts = candidate if "embedding" in candidate.names else None
    return Side(table, parts)


def _is_split(uri: str, storage_options: dict | None) -> bool:
    fs, path = filesystem_for(uri, storage_options)
    if path.endswith("splits.parquet"):
        return True
    return (
        fs.isdir(path)
        and fs.isfile(path.rstrip("/") + "/splits.parquet")
        and not is_tag_table(uri, storage_options)
    )


def read_signals(
    uri: str,
    storage_options: dict | None = None,
    role: str = "train",
    tags: str | None = None,
    with_embedding: bool = True,
) -> pa.Table:
    """uri, sha256, phash (uint64, null where unknown), phash_unreliable, embedding (or
    null) from any supported input; a split output's train or eval rows, with hashes
    (and embeddings) joined from tags when given."""
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
        wanted = SIGNAL_COLUMNS if with_embedding else [c for c in SIGNAL_COLUMNS if c != "embedding"]
        table = read_parquet(uri, storage_options, wanted, only_present=True)
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
            table = _join_tags(table, tags, storage_options, with_embedding)
    elif "error" in names:
        table = table.filter(pc.is_null(table.column("error")))
    return _normalised(table, uri)


def _join_tags(table: pa.Table, tags: str, storage_options: dict | None, with_embedding: bool) -> pa.Table:
    """A split's rows with the tag table's phash flag (and embedding), by uri."""
    wanted = ["uri", "phash_degenerate", "embedding"] if with_embedding else ["uri", "phash_degenerate"]
    extra = read_parquet(tags, storage_options, wanted, only_present=True)
    take = pc.index_in(table.column("uri"), extra.column("uri"))  # null: not tagged
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


@dataclass
class _Found:
    """Leaks by one signal: eval rows, their train rows, and how close."""

    signal: str
    eval_row: np.ndarray
    train_row: np.ndarray
    distance: np.ndarray  # phash bits (0 for sha256); -1 for embedding
    cosine: np.ndarray  # embedding; nan for the others


def audit(
    train: pa.Table | Side,
    evaluation: pa.Table | Side,
    max_distance: int,
    embedding_threshold: float | str | None = "auto",
) -> tuple[pa.Table, AuditReport]:
    """(leaks: eval_uri, train_uri, signal, distance, cosine, exact; per eval image and
    signal, its nearest train image), report."""
    train, evaluation = _side(train), _side(evaluation)
    t, e = train.table, evaluation.table
    report = AuditReport(train_images=t.num_rows, eval_images=e.num_rows, max_distance=max_distance)
    found = [_sha256_leaks(t, e)]
    phash, phash_checked = _phash_leaks(t, e, max_distance, report)
    emb, emb_checked = _embedding_leaks(train, evaluation, embedding_threshold, max_distance, report)
    report.unchecked = int((~(phash_checked | emb_checked)).sum())
    return _leak_table(t, e, found + [phash, emb], report), report


def _side(side: pa.Table | Side) -> Side:
    return side if isinstance(side, Side) else Side(side)


def _sha256_leaks(train: pa.Table, evaluation: pa.Table) -> _Found:
    at = pc.index_in(evaluation.column("sha256"), train.column("sha256"))  # the first train row
    rows = np.flatnonzero(at.is_valid().to_numpy(zero_copy_only=False))
    train_rows = at.to_numpy(zero_copy_only=False)[rows].astype(np.int64)
    return _Found(SHA256, rows, train_rows, np.zeros(len(rows), np.int64), np.full(len(rows), np.nan))


def _phash_leaks(train, evaluation, max_distance, report) -> tuple[_Found, np.ndarray]:
    """Nearest reliable train hash within max_distance, per eval image (only pairs with an
    eval hash are searched); and which eval images phash could check."""
    t_hash, _, t_ok, _ = table_hashes(train, "phash_unreliable")
    e_hash, _, e_ok, reasons = table_hashes(evaluation, "phash_unreliable")
    report.train_not_usable[PHASH] = int((~t_ok).sum())
    if not t_ok.any():  # nothing on the train side to compare with: nothing was checked
        e_ok = np.zeros_like(e_ok)
        reasons = {"no_usable_train_hash": evaluation.num_rows}
    report.not_checked[PHASH] = int((~e_ok).sum())
    report.not_checked.update({f"{PHASH}:{k}": v for k, v in reasons.items() if v})
    t_rows, e_rows = np.flatnonzero(t_ok), np.flatnonzero(e_ok)
    nothing = _Found(PHASH, *(np.zeros(0, np.int64),) * 3, np.zeros(0))
    if not (len(t_rows) and len(e_rows)):
        return nothing, e_ok
    hashes, inverse = np.unique(np.r_[t_hash[t_rows], e_hash[e_rows]], return_inverse=True)
    t_of, e_of = inverse[: len(t_rows)], inverse[len(t_rows) :]
    first_train = np.full(len(hashes), -1, np.int64)
    first_train[t_of[::-1]] = t_rows[::-1]  # a train row per distinct hash (the first)
    fresh = np.zeros(len(hashes), bool)
    fresh[e_of] = True
    a, b = pairs_touching(hashes, fresh, max_distance)
    same = np.unique(e_of)
    x, y = np.r_[a, b, same], np.r_[b, a, same]  # eval-side hash, train-side hash
    hit = fresh[x] & (first_train[y] >= 0)
    x, y = x[hit], y[hit]
    d = np.bitwise_count(hashes[x] ^ hashes[y]).astype(np.int64)
    order = np.lexsort((y, d, x))
    x, y, d = x[order], y[order], d[order]
    first = np.r_[True, x[1:] != x[:-1]] if len(x) else np.zeros(0, bool)
    nearest = np.full(len(hashes), -1, np.int64)
    nearest[x[first]] = np.flatnonzero(first)
    pick = nearest[e_of]
    rows = e_rows[pick >= 0]
    chosen = pick[pick >= 0]
    found = _Found(PHASH, rows, first_train[y[chosen]], d[chosen], np.full(len(rows), np.nan))
    return found, e_ok


def _embedding_leaks(
    train: Side, evaluation: Side, threshold, max_distance, report
) -> tuple[_Found, np.ndarray]:
    """Each eval image's nearest train image at cosine >= the threshold, searched in an index
    of the train images only (pipeline/corpus/audit_vectors.py)."""
    n_eval = evaluation.table.num_rows
    nothing = _Found(EMBEDDING, *(np.zeros(0, np.int64),) * 3, np.zeros(0))
    train_batches, eval_batches = train.batches(), evaluation.batches()
    if threshold is None or train_batches is None or eval_batches is None:
        report.not_checked[EMBEDDING] = n_eval
        report.embedding = {
            "threshold": None,
            "reason": "off" if threshold is None else "no embedding column",
        }
        return nothing, np.zeros(n_eval, bool)
    t = train.table
    exact = exact_signals(
        t.column("sha256").combine_chunks(),
        *table_hashes(t, "phash_unreliable")[:2],
        t.column("phash_unreliable").fill_null(False).to_numpy(zero_copy_only=False),
        max_distance,
    )
    found = embedding_leaks(train_batches, t.num_rows, eval_batches, n_eval, threshold, known_copies(exact))
    report.embedding = found.decision.record()
    report.train_not_usable[EMBEDDING] = t.num_rows - found.train_usable
    checked = found.checked if found.decision.threshold is not None else np.zeros(n_eval, bool)
    report.not_checked[EMBEDDING] = int((~checked).sum())
    distance = np.full(len(found.eval_row), -1, np.int64)
    return _Found(EMBEDDING, found.eval_row, found.train_row, distance, found.cosine), checked


def _leak_table(train: pa.Table, evaluation: pa.Table, found: list[_Found], report) -> pa.Table:
    signal_rank = {SHA256: 0, PHASH: 1, EMBEDDING: 2}
    e = np.concatenate([f.eval_row for f in found]).astype(np.int64)
    t = np.concatenate([f.train_row for f in found]).astype(np.int64)
    d = np.concatenate([f.distance for f in found]).astype(np.int64)
    c = np.concatenate([f.cosine for f in found]).astype(np.float32)
    kind = np.concatenate([np.full(len(f.eval_row), signal_rank[f.signal]) for f in found])
    order = np.lexsort((kind, e))
    e, t, d, c, kind = e[order], t[order], d[order], c[order], kind[order]
    names = np.array([SHA256, PHASH, EMBEDDING], object)
    report.leaks = int(len(np.unique(e)))
    report.exact_leaks = int((kind == 0).sum())
    report.by_signal = {str(names[k]): int((kind == k).sum()) for k in range(3)}
    hashed = kind < 2  # the nearest train image by sha256 or phash, in bits
    if hashed.any():
        nearest = np.full(evaluation.num_rows, 99, np.int64)
        np.minimum.at(nearest, e[hashed], d[hashed])
        bits, counts = np.unique(nearest[nearest < 99], return_counts=True)
        report.histogram = {str(int(b)): int(n) for b, n in zip(bits, counts)}
    table = pa.table(
        {
            "eval_uri": evaluation.column("uri").take(pa.array(e)),
            "train_uri": train.column("uri").take(pa.array(t)),
            "signal": pa.array(names[kind].tolist(), pa.string()),
            "distance": pa.array(d, pa.int32(), mask=kind == 2),
            "cosine": pa.array(c, pa.float32(), mask=kind != 2),
            "exact": pa.array(kind == 0),
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
        read_side(train, storage_options, "train", tags),
        read_side(evaluation, storage_options, "eval", tags),
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
