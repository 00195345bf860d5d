"""Tag tables with planted near-duplicates, at any size, for the corpus stages' tests and benchmarks.

Tagging a million images takes hours on a laptop; dedup, split and audit only read a
table's narrow columns and its embeddings. So this writes tables directly through the
table API (`TagTable.write_part`, `commit_version`), with the truth kept beside them:

- embeddings: unit float16 vectors, either random directions (`random`, the hardest
  case for a partitioned search: nothing is near anything) or drawn around 2,000
  centres (`clustered`, crowded neighbourhoods as real embeddings have);
- planted copies: `copy_share` of the rows are near-copies of another row, at a cosine
  drawn from `copy_cosine`; half share their source's phash to within a few bits (phash
  finds them too), half have an unrelated phash (only the embedding can find them);
- `identical` rows that all carry one vector (blank images: their phash is flagged
  degenerate, so only sha256 or the embedding could join them).

`apply_increment` commits a nightly's change: new rows (some of them copies of old
rows), changed rows (same uri, new bytes and vector) and deleted rows, with the kept
parts kept and the touched parts rewritten, as the tag job does. The truth (source
uri, copy uri, how findable) is returned and can be written with `write_truth`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.schemas import embedding_type
from pipeline.table.tag_table import TagTable, commit_version
from pipeline.table.version_fields import RulesRecord, VersionCounts

CENTRES = 2_000
PHASH_BITS_APART = 3  # a phash-findable copy's hash: this many bits from its source's


@dataclass(frozen=True)
class PlantedSpec:
    rows: int
    dim: int = 1152
    kind: str = "random"  # random | clustered
    copy_share: float = 0.01
    copy_cosine: tuple[float, float] = (0.95, 0.99)
    identical: int = 0  # rows sharing one vector (blank images)
    rows_per_part: int = 100_000
    seed: int = 0


@dataclass
class Truth:
    """Planted pairs: (source uri, copy uri, cosine, found by phash too)."""

    source: list = field(default_factory=list)
    copy: list = field(default_factory=list)
    cosine: list = field(default_factory=list)
    phash_findable: list = field(default_factory=list)
    identical: list = field(default_factory=list)  # uris of the rows sharing one vector

    def table(self) -> pa.Table:
        return pa.table(
            {
                "source": pa.array(self.source, pa.string()),
                "copy": pa.array(self.copy, pa.string()),
                "cosine": pa.array(self.cosine, pa.float32()),
                "phash_findable": pa.array(self.phash_findable, pa.bool_()),
            }
        )


def _uri(seed: int, i: int) -> str:
    """Uris in no useful order (a table is sorted by uri; rows of one part scatter)."""
    return f"s3://corpus/{hashlib.blake2b(f'{seed}:{i}'.encode(), digest_size=6).hexdigest()}/{i:09d}.jpg"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _centres(spec: PlantedSpec) -> np.ndarray | None:
    if spec.kind == "random":
        return None
    return np.random.default_rng([spec.seed, 7]).standard_normal((CENTRES, spec.dim), dtype=np.float32)


def _vectors(rng: np.random.Generator, n: int, spec: PlantedSpec, centres: np.ndarray | None) -> np.ndarray:
    x = rng.standard_normal((n, spec.dim), dtype=np.float32)
    if centres is not None:
        x += centres[rng.integers(0, len(centres), n)]
    return _unit(x)


def near_copy(rng: np.random.Generator, source: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    """Unit vectors at exactly `cosine` to each (unit) source row: source plus orthogonal noise."""
    noise = rng.standard_normal(source.shape, dtype=np.float32)
    noise -= (noise * source).sum(1, keepdims=True) * source
    noise = _unit(noise)
    return cosine[:, None] * source + np.sqrt(1 - cosine**2)[:, None] * noise


def _flip_bits(rng: np.random.Generator, hashes: np.ndarray, bits: int) -> np.ndarray:
    out = hashes.copy()
    for _ in range(bits):
        out ^= np.uint64(1) << rng.integers(0, 64, len(out)).astype(np.uint64)
    return out


def _rows(
    uris: list[str], vectors: np.ndarray, phash: np.ndarray, degenerate: np.ndarray, rng: np.random.Generator
) -> pa.Table:
    n = len(uris)
    sha = [hashlib.sha256(rng.bytes(16)).hexdigest() for _ in range(n)]
    flat = pa.array(vectors.astype(np.float16).reshape(-1), pa.float16())
    return pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "sha256": pa.array(sha, pa.string()),
            "size": pa.array(rng.integers(20_000, 900_000, n), pa.int64()),
            "width": pa.array(np.full(n, 512, np.int32)),
            "height": pa.array(np.full(n, 512, np.int32)),
            "phash": pa.array(phash, pa.uint64()),
            "phash_degenerate": pa.array(degenerate),
            "error": pa.nulls(n, pa.string()),
            "error_kind": pa.nulls(n, pa.string()),
            "tags": pa.array([[f"tag_{t}" for t in rng.integers(0, 50, 3)] for _ in range(n)]),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]).cast(
                embedding_type(vectors.shape[1])
            ),
        }
    )


def _plant(
    rng: np.random.Generator,
    vectors: np.ndarray,
    phash: np.ndarray,
    uris: list[str],
    count: int,
    spec: PlantedSpec,
    truth: Truth,
    sources: tuple[list[str], np.ndarray, np.ndarray] | None = None,
) -> None:
    """Make the first `count` rows copies of other rows (of `sources`, else of this block's other rows)."""
    if not count:
        return
    if sources is None:
        pick = rng.choice(np.arange(count, len(uris)), size=count, replace=False)
        src_uris, src_vec, src_hash = [uris[i] for i in pick], vectors[pick], phash[pick]
    else:
        pick = rng.integers(0, len(sources[0]), count)
        src_uris, src_vec, src_hash = [sources[0][i] for i in pick], sources[1][pick], sources[2][pick]
    cos = rng.uniform(*spec.copy_cosine, size=count).astype(np.float32)
    vectors[:count] = near_copy(rng, src_vec.astype(np.float32), cos)
    findable = np.arange(count) % 2 == 0
    phash[:count] = np.where(findable, _flip_bits(rng, src_hash, PHASH_BITS_APART), phash[:count])
    truth.source += src_uris
    truth.copy += uris[:count]
    truth.cosine += cos.tolist()
    truth.phash_findable += findable.tolist()


def _block(
    spec: PlantedSpec, start: int, n: int, rng: np.random.Generator, centres, truth: Truth, sources=None
) -> pa.Table:
    uris = [_uri(spec.seed, i) for i in range(start, start + n)]
    vectors = _vectors(rng, n, spec, centres)
    phash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    degenerate = np.zeros(n, bool)
    _plant(rng, vectors, phash, uris, int(round(n * spec.copy_share)), spec, truth, sources)
    return _rows(uris, vectors, phash, degenerate, rng)


def _identical(spec: PlantedSpec, start: int, rng: np.random.Generator, truth: Truth) -> pa.Table:
    """`spec.identical` blank images: one vector, one (degenerate) phash, distinct bytes."""
    n = spec.identical
    uris = [_uri(spec.seed, i) for i in range(start, start + n)]
    vector = np.repeat(_vectors(rng, 1, spec, None), n, axis=0)
    truth.identical += uris
    return _rows(uris, vector, np.full(n, 1 << 63, np.uint64), np.ones(n, bool), rng)


def write_planted_table(uri: str, spec: PlantedSpec) -> Truth:
    """A committed tag table of spec.rows rows (plus spec.identical) at uri; the planted truth."""
    rng = np.random.default_rng(spec.seed)
    centres = _centres(spec)
    table, truth, files = TagTable(uri), Truth(), []
    for part, start in enumerate(range(0, spec.rows, spec.rows_per_part)):
        n = min(spec.rows_per_part, spec.rows - start)
        rows = _block(spec, start, n, np.random.default_rng([spec.seed, part]), centres, truth)
        files.append(table.write_part(f"data/planted/part-{part:05d}.parquet", rows))
    if spec.identical:
        rows = _identical(spec, spec.rows, rng, truth)
        files.append(table.write_part("data/planted/part-identical.parquet", rows))
    _commit(table, None, files)
    return truth


def _commit(table: TagTable, base, files: list[str]) -> None:
    commit_version(
        table,
        base,
        files,
        model_sha256="planted",
        inference_key="planted",
        rules_key="planted",
        run_id=f"planted-{(base.version if base else 0) + 1}",
        model_name="planted",
        rules=RulesRecord(),
        counts=VersionCounts(),
    )


@dataclass(frozen=True)
class Increment:
    added: int = 0
    changed: int = 0
    deleted: int = 0
    copy_share: float = 0.2  # of the added rows, copies of rows already in the table
    seed: int = 1


def apply_increment(uri: str, spec: PlantedSpec, step: Increment, truth: Truth) -> dict:
    """Commit one nightly's change on top of the current version; the truth gains the new copies.

    Changed and deleted rows are drawn from the current rows; the parts holding them are
    rewritten without them, the rest kept; added and changed rows go into one new part."""
    table = TagTable(uri)
    base = table.snapshot()
    rng = np.random.default_rng([spec.seed, step.seed, base.version])
    current = table.read(base, ["uri"], with_file=True)
    chosen = rng.choice(current.num_rows, size=step.changed + step.deleted, replace=False)
    changed_uris = [current.column("uri")[int(i)].as_py() for i in chosen[: step.changed]]
    gone = pa.array([current.column("uri")[int(i)].as_py() for i in chosen], pa.string())
    touched = sorted({int(current.column("_file")[int(i)].as_py()) for i in chosen})
    files = [f for i, f in enumerate(base.files) if i not in touched]
    sources = _sources(table, base, rng, gone)
    for i in touched:
        part = table.read_part(base.files[i])
        kept = part.filter(pc.invert(pc.is_in(part.column("uri"), gone)))
        files.append(table.write_part(f"data/planted/part-v{base.version + 1}-{i:05d}.parquet", kept))
    start = spec.rows + spec.identical + 10_000_000 * base.version
    block = _block(
        PlantedSpec(**{**spec.__dict__, "copy_share": step.copy_share}),
        start,
        step.added,
        rng,
        _centres(spec),
        truth,
        sources,
    )
    unplanted = PlantedSpec(**{**spec.__dict__, "copy_share": 0.0})  # new bytes, no new copies
    replaced = _block(unplanted, start + step.added, step.changed, rng, _centres(spec), Truth())
    replaced = replaced.set_column(0, "uri", pa.array(changed_uris, pa.string()))
    new_rows = pa.concat_tables([block, replaced])
    files.append(table.write_part(f"data/planted/part-v{base.version + 1}-new.parquet", new_rows))
    _drop_truth(truth, set(gone.to_pylist()))
    _commit(table, base, files)
    return {"added": step.added, "changed": step.changed, "deleted": step.deleted, "rewritten": len(touched)}


def _sources(table: TagTable, base, rng: np.random.Generator, gone: pa.Array):
    """Rows of one current part (not changing) that new copies are made of."""
    part = table.read_part(base.files[int(rng.integers(0, len(base.files)))], ["uri", "phash", "embedding"])
    part = part.filter(pc.invert(pc.is_in(part.column("uri"), gone)))
    width = part.schema.field("embedding").type.list_size
    vectors = part.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return (
        part.column("uri").to_pylist(),
        vectors.reshape(-1, width).astype(np.float32),
        part.column("phash").to_numpy(),
    )


def _drop_truth(truth: Truth, gone: set[str]) -> None:
    """Planted pairs with a row deleted or changed are no longer pairs."""
    keep = [i for i, (s, c) in enumerate(zip(truth.source, truth.copy)) if s not in gone and c not in gone]
    truth.source = [truth.source[i] for i in keep]
    truth.copy = [truth.copy[i] for i in keep]
    truth.cosine = [truth.cosine[i] for i in keep]
    truth.phash_findable = [truth.phash_findable[i] for i in keep]
    truth.identical = [u for u in truth.identical if u not in gone]
