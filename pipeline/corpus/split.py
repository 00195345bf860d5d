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
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import TagpipeError
from pipeline.core.schemas import SPLITS_SCHEMA, conform
from pipeline.corpus.audit import audit, read_signals
from pipeline.storage.filesystem import write_atomic
from pipeline.table.reading import read_parquet

log = logging.getLogger(__name__)
HELD_OUT = "held_out"


@dataclass
class SplitReport:
    images: int = 0
    clusters: int = 0
    sizes: dict = field(default_factory=dict)  # split -> images
    fractions: dict = field(default_factory=dict)
    kept_from_previous: int = 0
    bridges: list = field(default_factory=list)  # {cluster_id, previous_splits, held_out}
    forced_train_by_exclude: int = 0  # clusters
    unmatched_hashes: dict = field(
        default_factory=dict
    )  # from dedup: rows whose phash matches nothing, by reason
    positives: dict = field(default_factory=dict)  # tag -> {split: count} (tags with >= 1 positive)
    zero_positive_tags: dict = field(
        default_factory=dict
    )  # split -> tags with >= min_count overall and none there
    label_deviation: dict = field(default_factory=dict)  # split -> mean |tag rate - overall rate|

    def text(self) -> str:
        sizes = ", ".join(f"{k} {v} ({self.fractions.get(k, 0):.1%})" for k, v in sorted(self.sizes.items()))
        return (
            f"split: {self.images} images in {self.clusters} clusters: {sizes}; "
            f"{len(self.bridges)} bridged clusters held out"
        )


def parse_ratios(text: str) -> dict[str, float]:
    ratios = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            ratios[name.strip()] = float(value)
        except ValueError:
            raise TagpipeError(
                f"--ratios {text!r}: expected NAME=FRACTION,..., e.g. train=0.9,val=0.05,test=0.05"
            ) from None
        if not sep or not name.strip():
            raise TagpipeError(f"--ratios {text!r}: expected NAME=FRACTION,...")
    if "train" not in ratios or any(v < 0 for v in ratios.values()) or abs(sum(ratios.values()) - 1.0) > 1e-6:
        raise TagpipeError(
            f"--ratios {text!r}: needs a train share, no negative shares, and shares summing to 1"
        )
    return ratios


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
    tags: str,
    dedup: str,
    output: str,
    ratios: dict[str, float] | None = None,
    seed: int = 0,
    previous: str | None = None,
    exclude: list[str] | None = None,
    max_distance: int = 6,
    min_count: int = 5,
    storage_options: dict | None = None,
    stratified: bool = False,
    min_val_positives: int = 0,
    group_column: str | None = None,
    metadata: str | None = None,
) -> SplitReport:
    ratios = ratios or {"train": 0.9, "val": 0.05, "test": 0.05}
    clusters = read_parquet(
        dedup.rstrip("/") + "/clusters.parquet" if not dedup.endswith(".parquet") else dedup,
        storage_options,
        ["uri", "sha256", "phash", "cluster_id"],
    )
    tagged = read_parquet(
        tags, storage_options, ["uri", "tags", "error", "phash_degenerate"], only_present=True
    )
    tag_of = {r["uri"]: r for r in tagged.to_pylist()}
    rows = [
        r
        for r in clusters.sort_by("uri").to_pylist()
        if r["uri"] in tag_of and tag_of[r["uri"]]["error"] is None
    ]
    if not rows:
        raise TagpipeError(f"{dedup} and {tags} share no images without errors")
    unit_of = _split_units(rows, group_column, metadata, storage_options)
    for r in rows:
        r["split_unit"] = unit_of[r["cluster_id"]]
    cluster_ids = sorted({r["split_unit"] for r in rows})
    members: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        members.setdefault(r["split_unit"], []).append(i)
    if stratified:
        labels: dict[str, dict[str, int]] = {}
        for c, idx in members.items():
            for i in idx:
                for t in tag_of[rows[i]["uri"]]["tags"] or []:
                    labels.setdefault(c, {}).setdefault(t, 0)
                    labels[c][t] += 1
        split_of_cluster = stratify(
            cluster_ids, labels, {c: len(idx) for c, idx in members.items()}, ratios, seed, min_val_positives
        )
    else:
        split_of_cluster = {c: assign(cluster_unit(seed, c), ratios) for c in cluster_ids}
    report = SplitReport(images=len(rows), clusters=len(cluster_ids))
    dedup_summary = _dedup_summary(dedup, storage_options)
    report.unmatched_hashes = dedup_summary.get("unmatched_hashes", {})

    if exclude:
        wanted = pa.array([r["uri"] for r in rows])
        corpus = read_signals(tags, storage_options, "eval")
        corpus = corpus.filter(pc.is_in(corpus.column("uri"), wanted))
        # the threshold dedup used: exclusions match what dedup would have joined
        threshold = dedup_summary.get("embedding", {}).get("threshold")
        forced = set()
        for uri in exclude:
            leaks, _ = audit(read_signals(uri, storage_options, "train"), corpus, max_distance, threshold)
            index = {r["uri"]: r["split_unit"] for r in rows}
            forced |= {index[u] for u in leaks.column("eval_uri").to_pylist()}
        for c in forced:
            split_of_cluster[c] = "train"
        report.forced_train_by_exclude = len(forced)

    split = [split_of_cluster[r["split_unit"]] for r in rows]
    if previous:
        # an image keeps its split only while its bytes are the same: a file replaced
        # under the same name is a new image (its content may belong to another cluster)
        sha_now = {r["uri"]: r["sha256"] for r in rows}
        before = {
            r["uri"]: r["split"]
            for r in read_parquet(previous, storage_options, ["uri", "split", "sha256"]).to_pylist()
            if r["sha256"] is None or r["uri"] not in sha_now or r["sha256"] == sha_now[r["uri"]]
        }
        for c, idx in members.items():
            old = {before[rows[i]["uri"]] for i in idx if rows[i]["uri"] in before} - {HELD_OUT}
            new = [i for i in idx if rows[i]["uri"] not in before]
            for i in idx:
                if rows[i]["uri"] in before:
                    split[i] = before[rows[i]["uri"]]
            if len(old) == 1:
                for i in new:
                    split[i] = next(iter(old))
            elif len(old) > 1:
                for i in new:
                    split[i] = HELD_OUT
                report.bridges.append({"cluster_id": c, "previous_splits": sorted(old), "held_out": len(new)})
                log.warning(
                    "cluster %s: new images bridge previous splits %s; %d held out",
                    c[:16],
                    sorted(old),
                    len(new),
                )
        report.kept_from_previous = sum(1 for r in rows if r["uri"] in before)

    _fill_report(report, rows, split, tag_of, min_count)
    out = conform(
        pa.table(
            {
                "uri": pa.array([r["uri"] for r in rows], pa.string()),
                "sha256": pa.array([r["sha256"] for r in rows], pa.string()),
                "phash": pa.array([r["phash"] for r in rows], pa.uint64()),
                "cluster_id": pa.array([r["cluster_id"] for r in rows], pa.string()),
                "split_unit": pa.array([r["split_unit"] for r in rows], pa.string()),
                # the hash's reliability travels with it, so an audit of this file alone knows it
                "phash_degenerate": pa.array(
                    [bool(tag_of[r["uri"]].get("phash_degenerate")) for r in rows], pa.bool_()
                ),
                "split": pa.array(split, pa.string()),
            }
        ),
        SPLITS_SCHEMA,
    )
    path = output.rstrip("/")  # replaced atomically: the next run reads it as --previous
    write_atomic(f"{path}/splits.parquet", table=out, storage_options=storage_options)
    write_atomic(
        f"{path}/_report.json",
        json.dumps(asdict(report), indent=1, sort_keys=True).encode(),
        storage_options=storage_options,
    )
    return report


def _dedup_summary(dedup: str, storage_options: dict | None) -> dict:
    """dedup's _summary.json ({} when dedup is a bare clusters file)."""
    from pipeline.storage.filesystem import filesystem_for

    fs, path = filesystem_for(dedup.rstrip("/") + "/_summary.json", storage_options)
    if dedup.endswith(".parquet") or not fs.exists(path):
        return {}
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())


def _split_units(
    rows: list[dict], group_column: str | None, metadata: str | None, storage_options: dict | None
) -> dict[str, str]:
    """cluster_id -> the unit it is split with: itself, or (with groups) the smallest
    cluster_id of the clusters its group values connect it to."""
    clusters = sorted({r["cluster_id"] for r in rows})
    if metadata and not group_column:
        raise TagpipeError("--metadata needs --group-column: which of its columns groups images")
    if not group_column:
        return {c: c for c in clusters}
    if not metadata:
        raise TagpipeError("--group-column needs --metadata FILE (Parquet or CSV with uri and the column)")
    groups = _read_groups(metadata, group_column, storage_options)
    matched = sum(1 for r in rows if groups.get(r["uri"]) is not None)
    if not matched:
        raise TagpipeError(
            f"--metadata {metadata}: none of its uris is in the table (it must name images as the "
            f"table does, e.g. {rows[0]['uri']!r})"
        )
    log.info("split: %d of %d images have a %s", matched, len(rows), group_column)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index = {c: i for i, c in enumerate(clusters)}
    values = sorted({groups[r["uri"]] for r in rows if groups.get(r["uri"]) is not None})
    value_index = {v: len(clusters) + i for i, v in enumerate(values)}
    a = [index[r["cluster_id"]] for r in rows if groups.get(r["uri"]) is not None]
    b = [value_index[groups[r["uri"]]] for r in rows if groups.get(r["uri"]) is not None]
    n = len(clusters) + len(values)
    labels = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)[1]
    first: dict[int, str] = {}
    for c in clusters:  # sorted: the smallest cluster_id names its unit
        first.setdefault(int(labels[index[c]]), c)
    return {c: first[int(labels[index[c]])] for c in clusters}


def _read_groups(metadata: str, column: str, storage_options: dict | None) -> dict[str, str]:
    import pyarrow.csv as pcsv

    from pipeline.storage.filesystem import filesystem_for

    fs, path = filesystem_for(metadata, storage_options)
    if not fs.exists(path):
        raise TagpipeError(f"--metadata {metadata}: no such file")
    if path.endswith(".csv"):
        with fs.open(path, "rb") as handle:  # strings: "007" and "7" are different groups
            table = pcsv.read_csv(
                handle,
                convert_options=pcsv.ConvertOptions(
                    strings_can_be_null=True, column_types={column: pa.string()}
                ),
            )
    else:
        table = read_parquet(metadata, storage_options)
    missing = [c for c in ("uri", column) if c not in table.column_names]
    if missing:
        what = "the images, as the table names them" if missing[0] == "uri" else "the groups (--group-column)"
        raise TagpipeError(f"{metadata}: no column {missing[0]!r} for {what}; it has {table.column_names}")
    values = table.column(column).cast(pa.string()).to_pylist()
    return {u: v for u, v in zip(table.column("uri").to_pylist(), values) if v not in (None, "")}


def _fill_report(report: SplitReport, rows, split, tag_of, min_count: int) -> None:
    names = sorted(set(split))
    report.sizes = {s: split.count(s) for s in names}
    report.fractions = {s: round(report.sizes[s] / len(rows), 6) for s in names}
    counts: dict[str, dict[str, int]] = {}
    for r, s in zip(rows, split):
        for t in tag_of[r["uri"]]["tags"] or []:
            counts.setdefault(t, {}).setdefault(s, 0)
            counts[t][s] += 1
    report.positives = counts
    total = {t: sum(v.values()) for t, v in counts.items()}
    for s in names:
        if s == HELD_OUT:
            continue
        frequent = [t for t, n in total.items() if n >= min_count]
        report.zero_positive_tags[s] = sorted(t for t in frequent if counts[t].get(s, 0) == 0)
        rates = [abs(counts[t].get(s, 0) / report.sizes[s] - total[t] / len(rows)) for t in total]
        report.label_deviation[s] = round(float(np.mean(rates)), 6) if rates else 0.0
