"""`tagpipe split`: train/val/test by whole duplicate clusters, stable under growth.

Assignment: a cluster's split comes from sha256(seed, cluster_id) mapped to [0, 1) and
cut by the ratios, so it depends on nothing but the cluster and the seed (not row order,
not workers). Every image of a cluster gets its cluster's split.

Growth (--previous): an image already assigned keeps its split, always. A new image
takes the split of the previous members of its cluster. When a cluster's previous
members sit in more than one split (a new image bridges two old families), its new
images are held out (split "held_out", reported): putting a bridge anywhere would put
it within the dedup radius of an image in another split. Clusters with no previous
member are assigned fresh.

--exclude: images within the dedup radius of an existing training set (or sharing its
sha256) force their whole cluster into train, so none of it reaches val or test.

--group-column COL with --metadata FILE (Parquet or CSV with uri and COL): images that
share a value of COL (a source post, a parent, an artist) are joined like duplicates,
so a group never crosses splits. The unit assigned is the connected component of
clusters and groups (split_unit in the output).

Images are columns, never a Python object each (pipeline/corpus/split_columns.py): the
tag table is read a part at a time, and only what the split uses of it.

Why this module is long: the run and its report, a frozen record built once with its
`record()`/`from_record` pair (an older tagpipe's _report.json reads here), sit together.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.arrays import unique_sorted
from pipeline.core.errors import TagpipeError
from pipeline.core.schemas import SPLITS_SCHEMA, conform
from pipeline.core.settings import build
from pipeline.core.words import counted
from pipeline.corpus.audit import audit
from pipeline.corpus.audit_sides import read_signals
from pipeline.corpus.dedup import DedupSummary
from pipeline.corpus.split_columns import (
    Tagged,
    cluster_codes,
    join_images,
    last_index_in,
    previous_splits,
    read_groups,
    read_tagged,
    tag_split_counts,
    unit_labels,
    unit_of_cluster,
)
from pipeline.corpus.split_settings import SplitSettings
from pipeline.storage.filesystem import write_atomic
from pipeline.storage.outputs import mark_output
from pipeline.storage.writable import check_writable
from pipeline.table.input_kinds import SPLIT, expect, expect_output
from pipeline.table.reading import read_parquet

log = logging.getLogger(__name__)
HELD_OUT = "held_out"


@dataclass(frozen=True)
class Bridge:
    """A cluster whose new images join images of more than one previous split: held out."""

    cluster_id: str
    previous_splits: tuple[str, ...]
    held_out: int  # its new images, held out


@dataclass(frozen=True)
class SplitReport:
    """A split run's report (_report.json, the nightly's split), built once at the end."""

    images: int = 0
    clusters: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # split -> images
    fractions: dict[str, float] = field(default_factory=dict)
    kept_from_previous: int = 0
    bridges: tuple[Bridge, ...] = ()
    forced_train_by_exclude: int = 0  # clusters
    unmatched_hashes: dict[str, int] = field(
        default_factory=dict
    )  # from dedup: rows whose phash matches nothing, by reason
    positives: dict[str, dict[str, int]] = field(
        default_factory=dict
    )  # tag -> {split: count} (tags with >= 1 positive)
    zero_positive_tags: dict[str, list[str]] = field(
        default_factory=dict
    )  # split -> tags with >= min_count overall and none there
    label_deviation: dict[str, float] = field(default_factory=dict)  # split -> mean |tag rate - overall rate|
    empty_splits: tuple[str, ...] = ()  # splits with a ratio above 0 that got no image

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def json_record(self) -> dict[str, Any]:
        return self.record()

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> SplitReport:
        """From a _report.json (one an older tagpipe wrote: what it lacks, the defaults)."""
        given = {k: v for k, v in (record or {}).items() if k in cls.__dataclass_fields__}
        bridges = given.get("bridges") or ()
        given["bridges"] = tuple(
            Bridge(b["cluster_id"], tuple(b["previous_splits"]), b["held_out"]) for b in bridges
        )
        given["empty_splits"] = tuple(given.get("empty_splits") or ())
        return cls(**given)

    def text(self) -> str:
        sizes = ", ".join(f"{k} {v} ({self.fractions.get(k, 0):.1%})" for k, v in sorted(self.sizes.items()))
        return (
            f"split: {counted(self.images, 'images')} in {counted(self.clusters, 'clusters')}: {sizes}; "
            f"{len(self.bridges)} bridged clusters held out"
            + (f"; NO IMAGE in {', '.join(self.empty_splits)}" if self.empty_splits else "")
        )


def cluster_unit(seed: int, cluster_id: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{cluster_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(unit: float, ratios: dict[str, float]) -> str:
    edge = 0.0
    for name in sorted(ratios, key=lambda n: (n != "train", n)):  # train first, then by name: fixed order
        edge += ratios[name]
        if unit < edge:
            return name
    return "train"


def stratify(
    cluster_ids: list[str],
    labels: dict[str, dict[str, int]],
    sizes: dict[str, int],
    ratios: dict[str, float],
    seed: int,
    min_val_positives: int = 0,
    val: str = "val",
) -> dict[str, str]:
    """Iterative stratification (Sechidis et al. 2011) over clusters: labels[c] = {tag:
    images of c with it}. Rarest label first, its clusters (in hashed order) to the split
    that still wants most of it. Then, for tags frequent enough that a proportional split
    would give val >= min_val_positives, clusters move from train to val until it does."""
    names = sorted(ratios, key=lambda n: (n != "train", n))
    total = sum(sizes.values())
    want = {n: ratios[n] * total for n in names}
    positives: dict[str, int] = {}
    holders: dict[str, list[str]] = {}
    order = sorted(cluster_ids, key=lambda c: cluster_unit(seed, c))
    for c in order:
        for tag, count in labels.get(c, {}).items():
            positives[tag] = positives.get(tag, 0) + count
            holders.setdefault(tag, []).append(c)
    want_tag = {t: {n: ratios[n] * p for n in names} for t, p in positives.items()}
    remaining = dict(positives)
    chosen: dict[str, str] = {}

    def place(c: str, split_name: str) -> None:
        chosen[c] = split_name
        want[split_name] -= sizes[c]
        for t, count in labels.get(c, {}).items():
            want_tag[t][split_name] -= count
            remaining[t] -= count

    while True:
        open_tags = [t for t, r in remaining.items() if r > 0]
        if not open_tags:
            break
        tag = min(open_tags, key=lambda t: (remaining[t], t))
        for c in holders[tag]:
            if c not in chosen:
                place(c, max(names, key=lambda n: (want_tag[tag][n], want[n], -names.index(n))))
    for c in order:  # clusters without labels
        if c not in chosen:
            place(c, max(names, key=lambda n: (want[n], -names.index(n))))

    if min_val_positives and val in ratios and ratios[val] > 0:
        have = {t: 0 for t in positives}
        for c, split_name in chosen.items():
            if split_name == val:
                for t, count in labels.get(c, {}).items():
                    have[t] += count
        for t in sorted(positives, key=lambda t: (positives[t], t)):
            if positives[t] * ratios[val] < min_val_positives:
                continue  # too rare to ask for
            for c in sorted(
                (c for c in holders[t] if chosen[c] == "train"),
                key=lambda c: (sizes[c], cluster_unit(seed, c)),
            ):
                if have[t] >= min_val_positives:
                    break
                chosen[c] = val
                for u, count in labels.get(c, {}).items():
                    have[u] += count
    return chosen


def run_split(
    settings: SplitSettings | str, dedup: str | None = None, output: str | None = None, **values
) -> SplitReport:
    """Images as columns (pipeline/corpus/split_columns.py): the tag table read a part at
    a time, only uri, error, tags and the phash flag; decisions per unit, not per image.
    `run_split(tags, dedup, output, seed=...)`: the settings from keywords."""
    if not isinstance(settings, SplitSettings):
        settings = build(SplitSettings, {"tags": settings, "dedup": dedup, "output": output, **values})
    tags, dedup, output, storage_options = (
        settings.tags,
        settings.dedup,
        settings.output,
        settings.storage_options,
    )
    group_column, metadata, ratios = settings.group_column, settings.metadata, settings.ratios
    expect(tags, "table", "--tags", storage_options)  # before any work: one line, nothing written
    expect(dedup, "dedup", "--dedup", storage_options)
    check_writable(output, "--output")
    expect_output(output, SPLIT, "--output", storage_options)
    tagged = read_tagged(tags, storage_options)
    clusters = dedup.rstrip("/") + "/clusters.parquet" if not dedup.endswith(".parquet") else dedup
    columns = ["uri", "sha256", "phash", "cluster_id"]  # the table as read is not kept: only its join
    images, rows = join_images(read_parquet(clusters, storage_options, columns), tagged)
    if not images.num_rows:
        raise TagpipeError(f"{dedup} and {tags} share no images without errors")
    uris = images.column("uri").combine_chunks()
    codes, cluster_ids = cluster_codes(images.column("cluster_id").combine_chunks())
    groups = _groups(group_column, metadata, storage_options)
    unit = unit_of_cluster(codes, len(cluster_ids), uris, groups, metadata, group_column)[codes]
    units = unique_sorted(unit)
    names = list(dict.fromkeys([*ratios, "train", HELD_OUT]))  # an image's split: an index into these
    before = (
        previous_splits(settings.previous, storage_options, uris, images.column("sha256").combine_chunks())
        if settings.previous
        else None
    )
    unit_split = _drawn(
        tagged, rows, unit, _to_draw(units, unit, before, settings), cluster_ids, names, settings
    )
    dedup_summary = _dedup_summary(dedup, storage_options)
    forced = np.zeros(0, np.int64)
    if settings.exclude:
        forced = _forced_train(
            tags, list(settings.exclude), uris, unit, dedup_summary, settings.max_distance, storage_options
        )
        unit_split[forced] = names.index("train")
    split = unit_split[unit]
    kept, bridges = _keep_previous(before, unit, cluster_ids, split, names) if before is not None else (0, ())
    balance = _balance(tag_split_counts(tagged, rows, split, names), split, names, settings.min_count)
    empty = tuple(s for s, share in ratios.items() if share > 0 and s not in balance["sizes"])
    if empty:
        log.warning(
            "split: %s got no image: %s too few for these ratios",
            ", ".join(empty),
            counted(len(units), "clusters"),
        )
    report = SplitReport(
        images=images.num_rows,
        clusters=len(units),
        kept_from_previous=kept,
        bridges=bridges,
        forced_train_by_exclude=len(forced),
        unmatched_hashes=dict(dedup_summary.unmatched_hashes),
        empty_splits=empty,
        **balance,
    )
    out = images.append_column("split_unit", cluster_ids.take(pa.array(unit)))
    # the hash's reliability travels with it, so an audit of this file alone knows it
    out = out.append_column("phash_degenerate", pa.array(tagged.degenerate[rows]))
    out = out.append_column("split", pa.array(names, pa.string()).take(pa.array(split)))
    path = output.rstrip("/")  # replaced atomically: the next run reads it as --previous
    mark_output(path, "split", storage_options, writes=("splits.parquet", "_report.json"))
    write_atomic(f"{path}/splits.parquet", table=conform(out, SPLITS_SCHEMA), storage_options=storage_options)
    write_atomic(
        f"{path}/_report.json",
        json.dumps(report.record(), indent=1, sort_keys=True).encode(),
        storage_options=storage_options,
    )
    return report


def _drawn(
    tagged: Tagged,
    rows: np.ndarray,
    unit: np.ndarray,
    units: np.ndarray,
    cluster_ids: pa.Array,
    names: list,
    settings: SplitSettings,
) -> np.ndarray:
    """Each drawn unit's split (by unit code), hashed or stratified: the one loop over
    units. Units not in `units` stay 0: every image of theirs keeps a previous split."""
    unit_ids = cluster_ids.take(pa.array(units)).to_pylist()  # sorted, as the units' codes are
    ratios, seed = settings.ratios, settings.seed
    if settings.stratify:
        labels = unit_labels(tagged, rows, unit, dict(zip(units.tolist(), unit_ids)))
        sizes = dict(zip(unit_ids, np.bincount(unit)[units].tolist()))
        chosen = stratify(unit_ids, labels, sizes, ratios, seed, settings.min_val_positives)
    else:
        chosen = {c: assign(cluster_unit(seed, c), ratios) for c in unit_ids}
    index = {name: i for i, name in enumerate(names)}
    drawn = np.zeros(len(cluster_ids), np.int64)
    drawn[units] = [index[chosen[c]] for c in unit_ids]
    return drawn


def _to_draw(
    units: np.ndarray, unit: np.ndarray, before: pa.Array | None, settings: SplitSettings
) -> np.ndarray:
    """The units whose draw can matter. Hashed draws are independent, and an image in the
    previous split keeps its split, so after a nightly only units with a new image are
    drawn (their number follows the change, not the corpus). Stratified draws balance
    every unit against the others: all of them."""
    if before is None or settings.stratify:
        return units
    new = ~pc.is_valid(before).to_numpy(zero_copy_only=False)
    return unique_sorted(unit[new])


def _groups(group_column: str | None, metadata: str | None, storage_options: dict | None):
    """(uri, group) of the metadata, or None without --group-column (the settings pair them)."""
    if not group_column or not metadata:
        return None
    return read_groups(metadata, group_column, storage_options)


def _forced_train(
    tags: str,
    exclude: list[str],
    uris: pa.Array,
    unit: np.ndarray,
    dedup_summary: DedupSummary,
    max_distance: int,
    storage_options: dict | None,
) -> np.ndarray:
    """The units (codes) with an image within the dedup radius of an excluded train set."""
    corpus = read_signals(tags, storage_options, "eval")
    corpus = corpus.filter(pc.is_in(corpus.column("uri"), value_set=uris))
    # the threshold dedup used: exclusions match what dedup would have joined
    threshold = dedup_summary.embedding.threshold
    forced: set[int] = set()
    for uri in exclude:
        leaks, _ = audit(read_signals(uri, storage_options, "train"), corpus, max_distance, threshold)
        forced |= set(unit[last_index_in(leaks.column("eval_uri"), uris)].tolist())
    return np.array(sorted(forced), np.int64)


def _keep_previous(
    before: pa.Array,
    unit: np.ndarray,
    cluster_ids: pa.Array,
    split: np.ndarray,
    names: list,
) -> tuple[int, tuple[Bridge, ...]]:
    """Images in the previous split keep theirs; a unit's new images take its previous
    members' split, or are held out when those sit in more than one (a bridge). `split`
    is changed in place; `names` gains the previous split's names this run lacks.
    Returns the images kept and the bridges."""
    names += sorted(set(pc.unique(before).drop_null().to_pylist()) - set(names))
    kept = pc.is_valid(before).to_numpy(zero_copy_only=False)
    prior = pc.fill_null(pc.index_in(before, value_set=pa.array(names)), 0).to_numpy(zero_copy_only=False)
    split[kept] = prior[kept]
    old = kept & (prior != names.index(HELD_OUT))
    pairs = unique_sorted(unit[old] * len(names) + prior[old])  # (unit, previous split), by unit
    pair_unit, pair_split = pairs // len(names), pairs % len(names)
    count = np.bincount(pair_unit, minlength=len(cluster_ids))
    only = np.zeros(len(cluster_ids), np.int64)
    only[pair_unit] = pair_split  # the one previous split of units that have one
    new = ~kept
    split[new & (count[unit] == 1)] = only[unit[new & (count[unit] == 1)]]
    split[new & (count[unit] > 1)] = names.index(HELD_OUT)
    held = np.bincount(unit[new], minlength=len(cluster_ids))
    units, first = np.unique(unit, return_index=True)
    bridged = count[units] > 1
    bridges = []
    for u in units[bridged][np.argsort(first[bridged])].tolist():  # in the order of each unit's first image
        lo, hi = np.searchsorted(pair_unit, [u, u + 1])
        bridges.append(
            _bridge(cluster_ids[u].as_py(), tuple(sorted(names[s] for s in pair_split[lo:hi])), int(held[u]))
        )
    return int(kept.sum()), tuple(bridges)


def _bridge(cluster_id: str, previous: tuple[str, ...], held_out: int) -> Bridge:
    log.warning(
        "cluster %s: new images bridge previous splits %s; %d held out",
        cluster_id[:16],
        list(previous),
        held_out,
    )
    return Bridge(cluster_id, previous, held_out)


def _dedup_summary(dedup: str, storage_options: dict | None) -> DedupSummary:
    """dedup's _summary.json (all defaults when dedup is a bare clusters file)."""
    from pipeline.storage.filesystem import filesystem_for

    fs, path = filesystem_for(dedup.rstrip("/") + "/_summary.json", storage_options)
    if dedup.endswith(".parquet") or not fs.exists(path):
        return DedupSummary()
    with fs.open(path, "rb") as handle:
        return DedupSummary.from_record(json.loads(handle.read()))


def _balance(counts: dict, split: np.ndarray, names: list, min_count: int) -> dict[str, Any]:
    """The report's sizes, fractions, positives per tag and split, tags missing from a
    split, and label deviation (SplitReport's fields of those names)."""
    images = np.bincount(split, minlength=len(names))
    present = sorted(names[i] for i in np.flatnonzero(images))
    sizes = {s: int(images[names.index(s)]) for s in present}
    total = {t: sum(v.values()) for t, v in counts.items()}
    zero_positive_tags, label_deviation = {}, {}
    for s in present:
        if s == HELD_OUT:
            continue
        frequent = [t for t, n in total.items() if n >= min_count]
        zero_positive_tags[s] = sorted(t for t in frequent if counts[t].get(s, 0) == 0)
        rates = [abs(counts[t].get(s, 0) / sizes[s] - total[t] / len(split)) for t in total]
        label_deviation[s] = round(float(np.mean(rates)), 6) if rates else 0.0
    return {
        "sizes": sizes,
        "fractions": {s: round(sizes[s] / len(split), 6) for s in present},
        "positives": counts,
        "zero_positive_tags": zero_positive_tags,
        "label_deviation": label_deviation,
    }
