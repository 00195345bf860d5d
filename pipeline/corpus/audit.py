"""`tagpipe audit`: every eval image that is a copy or near-duplicate of a train image.

Three signals, as in dedup (pipeline/corpus/duplicate_signals.py): the same sha256; phash
within R bits between hashes that carry detail; the tagger's embedding at cosine >= a
threshold (given, or "auto" from the data). Inputs are tagpipe outputs (tag tables,
split outputs) or Parquet/CSV files with sha256, phash (uint64 or 16 hex digits) and,
optionally, embedding columns. A split output is read for its train rows (--train) or
its val/test rows (--eval); its hashes and embeddings come from the tag table given
with --tags. The report says how many eval images each signal could not check
(no hash, a low-detail hash, no embedding). A run is asked to use sha256 and phash always,
and the embedding unless its threshold is `off` (the default, `auto`, asks for it): it is
complete only when every eval image was checked by every signal it was asked to use
(an image whose phash has too little detail counts as checked when the embedding, asked
for, checked it; see short_of), and there was an eval image to check.
"clean" and exit status 0 need a complete run; leaks exit 1; a run with no leak that is not
complete exits 4 (ExitStatus.UNCHECKED), so "unchecked" is never read as clean.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.arrays import unique_sorted
from pipeline.core.errors import ExitStatus
from pipeline.core.schemas import LEAKS_SCHEMA, conform
from pipeline.core.settings import build
from pipeline.corpus.audit_index import AUDIT_ENTRIES, leaks_in_index
from pipeline.corpus.audit_settings import AuditSettings
from pipeline.corpus.audit_sides import Side, read_side
from pipeline.corpus.audit_vectors import embedding_leaks
from pipeline.corpus.duplicate_signals import (
    EMBEDDING,
    PHASH,
    SHA256,
    exact_signals,
    known_copies,
    table_hashes,
)
from pipeline.corpus.embedding_threshold import EmbeddingThreshold
from pipeline.corpus.hamming_search import pairs_touching
from pipeline.storage.filesystem import write_atomic
from pipeline.storage.outputs import mark_output
from pipeline.storage.writable import check_writable
from pipeline.table.input_kinds import AUDIT, expect, expect_output

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditReport:
    """An audit's report (audit.json, the nightly's audits), built once from each signal's
    result; from_record reads one an older tagpipe wrote."""

    train_images: int = 0
    eval_images: int = 0
    leaks: int = 0  # eval images with a train copy or near-duplicate by any signal
    exact_leaks: int = 0  # of which byte-identical
    by_signal: dict[str, int] = field(default_factory=dict)  # signal -> eval images it found
    not_checked: dict[str, int] = field(default_factory=dict)  # signal -> eval images it could not check
    train_not_usable: dict[str, int] = field(default_factory=dict)  # signal -> train images it could not use
    unchecked: int = 0  # eval images neither phash nor embedding could check
    max_distance: int = 6
    embedding: EmbeddingThreshold = field(default_factory=EmbeddingThreshold)  # how the cosine was set
    histogram: dict[str, int] = field(
        default_factory=dict
    )  # bits -> eval images whose nearest train image (sha256 or phash) is that far
    asked: tuple[str, ...] = ()  # the signals the run was asked to use
    complete: bool = False  # every eval image checked by every signal in `asked`

    def record(self) -> dict[str, Any]:
        """The audit.json object (its embedding as EmbeddingThreshold.record() stores it)."""
        return {**asdict(self), "asked": list(self.asked), "embedding": self.embedding.record()}

    def json_record(self) -> dict[str, Any]:
        return self.record()

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> AuditReport:
        given = {k: v for k, v in (record or {}).items() if k in cls.__dataclass_fields__}
        given["asked"] = tuple(given.get("asked") or ())
        given["embedding"] = EmbeddingThreshold.from_record(given.get("embedding"))
        return cls(**given)

    def short_of(self) -> dict:
        """signal -> eval images it could not check, for the asked signals that missed some."""
        return short_of(self.asked, self.not_checked)

    def exit_status(self) -> int:
        """1 on leaks; else 4 when some eval image went unchecked by an asked signal, or
        there was no eval image to check; else 0."""
        if self.leaks:
            return int(ExitStatus.LEAKS)
        return int(ExitStatus.OK if self.complete else ExitStatus.UNCHECKED)

    def text(self) -> str:
        missing = self.short_of()
        gaps = ": " + missing_text(missing, self.eval_images) if missing else ""
        if self.leaks:
            verdict = "LEAKS FOUND" + (
                f" ({self.unchecked} eval images could not be checked)" if self.unchecked else ""
            )
        elif not self.eval_images:
            verdict = f"NOTHING CHECKED (exit {int(ExitStatus.UNCHECKED)}): the eval side has no image"
        elif missing:
            verdict = (
                f"NOT FULLY CHECKED (exit {int(ExitStatus.UNCHECKED)}): no leaks found, but some eval "
                f"images could not be checked{gaps}"
                + ("; --embedding-threshold off audits by hashes only" if EMBEDDING in missing else "")
            )
        elif EMBEDDING not in self.asked:
            verdict = (
                "no leaks found by sha256 and phash; the embedding was off, so crops and edits went unchecked"
            )
        else:
            verdict = "clean"
        found = ", ".join(f"{k} {v}" for k, v in self.by_signal.items()) or "none"
        missed = ", ".join(f"{k} {v}" for k, v in self.not_checked.items()) or "none"
        emb = self.embedding
        emb_text = (
            f"cosine >= {emb.threshold:.4f} ({emb.chosen_by})"
            if emb.threshold is not None
            else f"not used ({emb.reason or 'off'})"
        )
        return (
            f"audit: {verdict}: {self.leaks} of {self.eval_images} eval images are copies "
            "or near-duplicates of the "
            f"{self.train_images} train images ({self.exact_leaks} byte-identical); found by {found}; "
            f"not checkable by: {missed}; phash R={self.max_distance}, embedding {emb_text}"
            + (f"; {emb.index.text()}" if emb.index else "")
        )


def short_of(asked, not_checked: dict) -> dict:
    """signal -> eval images it could not check, for each asked signal that missed some
    (an audit record's `asked` and `not_checked`: the nightly reads its records so).

    phash cannot check an image whose hash has too little detail (flat colour, stripes).
    When the embedding is asked for, it covers those: phash's misses then make no gap of
    their own (an image neither checked is the embedding's miss too). Otherwise every
    blank image would keep a nightly at exit 4, and a status that never clears is one
    nobody reads: the gap that matters, an embedding not used, would go unseen."""
    covered = {PHASH} if EMBEDDING in asked else set()
    return {s: int(not_checked.get(s, 0)) for s in asked if not_checked.get(s, 0) and s not in covered}


def missing_text(missing: dict, eval_images: int) -> str:
    """'phash could not check 3, embedding 33 of 33 eval images', or '' when none missed."""
    if not missing:
        return ""
    listed = ", ".join(f"{signal} {n}" for signal, n in missing.items())
    return f"not checked by {listed} of {eval_images} eval images"


def asked_signals(embedding_threshold) -> tuple[str, ...]:
    """sha256 and phash always; the embedding unless its threshold is off (None)."""
    return (SHA256, PHASH) + ((EMBEDDING,) if embedding_threshold is not None else ())


@dataclass
class _Found:
    """Leaks by one signal: eval rows, their train rows, and how close."""

    signal: str
    eval_row: np.ndarray
    train_row: np.ndarray
    distance: np.ndarray  # phash bits (0 for sha256); -1 for embedding
    cosine: np.ndarray  # embedding; nan for the others


@dataclass(frozen=True)
class _Checked:
    """One signal's leaks, which eval rows it checked, and what it could not check or use."""

    found: _Found
    checked: np.ndarray
    not_checked: dict[str, int]  # signal (or signal:reason) -> eval images
    train_not_usable: dict[str, int]  # signal -> train images
    decision: EmbeddingThreshold | None = None  # the embedding's


def audit(
    train: pa.Table | Side,
    evaluation: pa.Table | Side,
    max_distance: int,
    embedding_threshold: float | str | None = "auto",
    dedup: str | None = None,
    output: str | None = None,
    storage_options: dict | None = None,
) -> tuple[pa.Table, AuditReport]:
    """(leaks: eval_uri, train_uri, signal, distance, cosine, exact; per eval image and
    signal, its nearest train image), report. dedup: a dedup output whose index holds both
    sides' embeddings (a split made from it): searched there, and with output, only what
    changed since the audit last wrote there (pipeline/corpus/audit_index.py)."""
    train, evaluation = _side(train), _side(evaluation)
    t, e = train.table, evaluation.table
    asked = asked_signals(embedding_threshold)
    phash = _phash_leaks(t, e, max_distance)
    indexed = None
    if dedup and isinstance(embedding_threshold, float):
        indexed = leaks_in_index(
            dedup, t.column("uri").combine_chunks(), e.column("uri").combine_chunks(), embedding_threshold,
            output, storage_options,
        )  # fmt: skip
    if indexed is not None:
        emb = _indexed(indexed, t.num_rows)
    else:
        emb = _embedding_leaks(train, evaluation, embedding_threshold, max_distance)
    table, leaks = _leak_table(t, e, [_sha256_leaks(t, e), phash.found, emb.found])
    not_checked = {**phash.not_checked, **emb.not_checked}
    report = AuditReport(
        train_images=t.num_rows,
        eval_images=e.num_rows,
        not_checked=not_checked,
        train_not_usable={**phash.train_not_usable, **emb.train_not_usable},
        unchecked=int((~(phash.checked | emb.checked)).sum()),
        max_distance=max_distance,
        embedding=emb.decision or EmbeddingThreshold(),
        asked=asked,
        complete=bool(e.num_rows) and not short_of(asked, not_checked),  # none checked: not clean
        **leaks,
    )
    return table, report


def _side(side: pa.Table | Side) -> Side:
    return side if isinstance(side, Side) else Side(side)


def _sha256_leaks(train: pa.Table, evaluation: pa.Table) -> _Found:
    at = pc.index_in(evaluation.column("sha256"), train.column("sha256"))  # the first train row
    rows = np.flatnonzero(at.is_valid().to_numpy(zero_copy_only=False))
    train_rows = at.to_numpy(zero_copy_only=False)[rows].astype(np.int64)
    return _Found(SHA256, rows, train_rows, np.zeros(len(rows), np.int64), np.full(len(rows), np.nan))


def _phash_leaks(train, evaluation, max_distance) -> _Checked:
    """Nearest reliable train hash within max_distance, per eval image (only pairs with an
    eval hash are searched); and which eval images phash could check."""
    t_hash, _, t_ok, _ = table_hashes(train, "phash_unreliable")
    e_hash, _, e_ok, reasons = table_hashes(evaluation, "phash_unreliable")
    if not t_ok.any():  # nothing on the train side to compare with: nothing was checked
        e_ok = np.zeros_like(e_ok)
        reasons = {"no_usable_train_hash": evaluation.num_rows}
    not_checked = {PHASH: int((~e_ok).sum()), **{f"{PHASH}:{k}": v for k, v in reasons.items() if v}}
    train_not_usable = {PHASH: int((~t_ok).sum())}
    t_rows, e_rows = np.flatnonzero(t_ok), np.flatnonzero(e_ok)
    nothing = _Found(PHASH, *(np.zeros(0, np.int64),) * 3, np.zeros(0))
    if not (len(t_rows) and len(e_rows)):
        return _Checked(nothing, e_ok, not_checked, train_not_usable)
    hashes, inverse = np.unique(np.r_[t_hash[t_rows], e_hash[e_rows]], return_inverse=True)
    t_of, e_of = inverse[: len(t_rows)], inverse[len(t_rows) :]
    first_train = np.full(len(hashes), -1, np.int64)
    first_train[t_of[::-1]] = t_rows[::-1]  # a train row per distinct hash (the first)
    fresh = np.zeros(len(hashes), bool)
    fresh[e_of] = True
    a, b = pairs_touching(hashes, fresh, max_distance)
    same = unique_sorted(e_of)
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
    return _Checked(found, e_ok, not_checked, train_not_usable)


def _embedding_leaks(train: Side, evaluation: Side, threshold, max_distance) -> _Checked:
    """Each eval image's nearest train image at cosine >= the threshold, searched in an index
    of the train images only (pipeline/corpus/audit_vectors.py)."""
    n_eval = evaluation.table.num_rows
    nothing = _Found(EMBEDDING, *(np.zeros(0, np.int64),) * 3, np.zeros(0))
    train_batches, eval_batches = train.batches(), evaluation.batches()
    if threshold is None or train_batches is None or eval_batches is None:
        off = EmbeddingThreshold(reason="off" if threshold is None else "no embedding column")
        return _Checked(nothing, np.zeros(n_eval, bool), {EMBEDDING: n_eval}, {}, off)
    t = train.table
    exact = exact_signals(
        t.column("sha256").combine_chunks(),
        *table_hashes(t, "phash_unreliable")[:2],
        t.column("phash_unreliable").fill_null(False).to_numpy(zero_copy_only=False),
        max_distance,
    )
    found = embedding_leaks(train_batches, t.num_rows, eval_batches, n_eval, threshold, known_copies(exact))
    checked = found.checked if found.decision.threshold is not None else np.zeros(n_eval, bool)
    distance = np.full(len(found.eval_row), -1, np.int64)
    return _Checked(
        _Found(EMBEDDING, found.eval_row, found.train_row, distance, found.cosine),
        checked,
        {EMBEDDING: int((~checked).sum())},
        {EMBEDDING: t.num_rows - found.train_usable},
        found.decision,
    )


def _indexed(found, train_images: int) -> _Checked:
    distance = np.full(len(found.eval_row), -1, np.int64)
    return _Checked(
        _Found(EMBEDDING, found.eval_row, found.train_row, distance, found.cosine),
        found.checked,
        {EMBEDDING: int((~found.checked).sum())},
        {EMBEDDING: train_images - found.train_usable},
        found.decision,
    )


def _leak_table(
    train: pa.Table, evaluation: pa.Table, found: list[_Found]
) -> tuple[pa.Table, dict[str, Any]]:
    """The leaks table, and the report's counts of it (AuditReport's fields of those names)."""
    signal_rank = {SHA256: 0, PHASH: 1, EMBEDDING: 2}
    e = np.concatenate([f.eval_row for f in found]).astype(np.int64)
    t = np.concatenate([f.train_row for f in found]).astype(np.int64)
    d = np.concatenate([f.distance for f in found]).astype(np.int64)
    c = np.concatenate([f.cosine for f in found]).astype(np.float32)
    kind = np.concatenate([np.full(len(f.eval_row), signal_rank[f.signal]) for f in found])
    order = np.lexsort((kind, e))
    e, t, d, c, kind = e[order], t[order], d[order], c[order], kind[order]
    names = np.array([SHA256, PHASH, EMBEDDING], object)
    counts = {
        "leaks": int(len(unique_sorted(e))),
        "exact_leaks": int((kind == 0).sum()),
        "by_signal": {str(names[k]): int((kind == k).sum()) for k in range(3)},
        "histogram": {},
    }
    hashed = kind < 2  # the nearest train image by sha256 or phash, in bits
    if hashed.any():
        nearest = np.full(evaluation.num_rows, 99, np.int64)
        np.minimum.at(nearest, e[hashed], d[hashed])
        bits, per_bits = np.unique(nearest[nearest < 99], return_counts=True)
        counts["histogram"] = {str(int(b)): int(n) for b, n in zip(bits, per_bits)}
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
    return conform(table, LEAKS_SCHEMA), counts


def run_audit(
    settings: AuditSettings | str, evaluation: str | None = None, **values
) -> tuple[pa.Table, AuditReport]:
    """The leaks of `settings.eval` into `settings.train`, written under `settings.output`
    if given. `run_audit(train, evaluation, max_distance=...)`: the settings from keywords."""
    if not isinstance(settings, AuditSettings):
        settings = build(AuditSettings, {"train": settings, "eval": evaluation, **values})
    output, storage_options, tags = settings.output, settings.storage_options, settings.tags
    _check_paths(settings)
    leaks, report = audit(
        read_side(settings.train, storage_options, "train", tags),
        read_side(settings.eval, storage_options, "eval", tags),
        settings.max_distance,
        settings.embedding_threshold,
        settings.dedup,
        output,
        storage_options,
    )
    if output:
        path = output.rstrip("/")
        mark_output(path, "audit", storage_options, writes=AUDIT_ENTRIES)
        write_atomic(f"{path}/leaks.parquet", table=leaks, storage_options=storage_options)
        write_atomic(
            f"{path}/audit.json",
            json.dumps(report.record(), indent=1).encode(),
            storage_options=storage_options,
        )
    return leaks, report


def _check_paths(settings: AuditSettings) -> None:
    """Every input of the kind its option takes, and the output writable, before any work."""
    options = settings.storage_options
    expect(settings.train, "side", "--train", options)
    expect(settings.eval, "side", "--eval", options)
    if settings.tags:
        expect(settings.tags, "table", "--tags", options)
    if settings.dedup:
        expect(settings.dedup, "dedup", "--dedup", options)
    if settings.output:
        check_writable(settings.output, "--output")
        expect_output(settings.output, AUDIT, "--output", options)
