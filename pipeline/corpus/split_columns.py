"""The images `tagpipe split` assigns, as columns: Arrow strings and numpy codes, never a
Python object per image (a 10M-image corpus would be 10M dicts, each holding its tag
list). What is per cluster (its hash, its split, a stratified split's label counts) and
per tag stays in Python; pipeline/corpus/split.py says what is decided.

  tagged     the tag table read a part at a time: uri, no error, the phash flag, and the
             tags as integer codes into one vocabulary (tag lists as strings are most of
             the bytes of the columns split reads)
  images     clusters.parquet joined with it by uri (pc.index_in), sorted by uri
  units      cluster ids as codes in sorted order; metadata groups join clusters (scipy's
             connected components), the smallest cluster id names a unit
  previous   an earlier splits.parquet matched by uri, kept where the bytes are the same
  positives  tag occurrences by (tag, split) with np.bincount, in first-appearance order

Where a uri repeats, the last row wins, as the dicts by uri this replaces did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import TagpipeError
from pipeline.table.reading import Pieces, read_parquet

log = logging.getLogger(__name__)
BLOCK_ROWS = 1 << 18  # images whose tags are counted at once


@dataclass
class Tagged:
    """The tag table's rows, as split needs them."""

    uri: pa.Array
    good: np.ndarray  # no error
    degenerate: np.ndarray  # phash_degenerate (null or absent: False)
    tags: pa.LargeListArray  # the tag lists, as codes into vocab
    vocab: list


def read_tagged(tags: str, storage_options: dict | None) -> Tagged:
    """The tag table a part at a time, its tags encoded as they are read."""
    source = Pieces(tags, storage_options)
    missing = [c for c in ("uri", "error", "tags") if c not in source.names]
    if missing:
        raise TagpipeError(f"{tags}: no {missing[0]!r} column; split needs a tag table's uri, error and tags")
    columns: list[str] = [c for c in ("uri", "error", "tags", "phash_degenerate") if c in source.names]
    vocab: dict = {}
    uris, good, degenerate, lists = [], [], [], []
    for _, piece in source.stream(columns):
        uris.append(piece.column("uri").combine_chunks().cast(pa.string()))
        good.append(pc.is_null(piece.column("error")).to_numpy(zero_copy_only=False))
        flag = piece.column("phash_degenerate") if "phash_degenerate" in columns else pa.nulls(len(piece))
        degenerate.append(pc.fill_null(flag.cast(pa.bool_()), False).to_numpy(zero_copy_only=False))
        lists.append(_encoded(piece.column("tags").combine_chunks(), vocab))
    return Tagged(
        uri=pa.concat_arrays(uris) if uris else pa.array([], pa.string()),
        good=np.concatenate(good) if good else np.zeros(0, bool),
        degenerate=np.concatenate(degenerate) if degenerate else np.zeros(0, bool),
        tags=pa.concat_arrays(lists) if lists else pa.array([], pa.large_list(pa.int32())),
        vocab=list(vocab),
    )


def _encoded(lists: pa.Array, vocab: dict) -> pa.LargeListArray:
    """Tag lists as lists of codes (a null list: empty), new tags added to vocab."""
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(lists).dictionary_encode()
    words = values.dictionary.to_pylist() + [None]  # a null tag: its own code, as a dict key it was
    mapping = np.array([vocab.setdefault(w, len(vocab)) for w in words], np.int32)
    codes = mapping[pc.fill_null(values.indices, len(words) - 1).to_numpy(zero_copy_only=False)]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(codes, pa.int32()))


def last_index_in(values, of: pa.Array) -> np.ndarray:
    """Each value's index in `of`, its last occurrence (as a dict built from `of` keeps);
    -1 where absent."""
    n = len(of)
    found = pc.index_in(values, value_set=of.take(pa.array(np.arange(n - 1, -1, -1, dtype=np.int64))))
    found = pc.fill_null(found, n).to_numpy(zero_copy_only=False).astype(np.int64)
    return n - 1 - found


def join_images(clusters: pa.Table, tagged: Tagged) -> tuple[pa.Table, np.ndarray]:
    """The clustered images with a tag row without error, sorted by uri, and each one's
    tag row (one copy of the clusters' columns: sorted and filtered in one take)."""
    row = last_index_in(clusters.column("uri"), tagged.uri)
    keep = (row >= 0) & tagged.good[np.maximum(row, 0)] if len(tagged.good) else row >= 0
    order = pc.sort_indices(clusters.column("uri")).to_numpy()
    order = order[keep[order]]
    return clusters.take(pa.array(order)).combine_chunks(), row[order]


def cluster_codes(cluster_id: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(each image's cluster as a code, the cluster ids sorted): code order is id order."""
    encoded = cluster_id.dictionary_encode()
    order = pc.sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank[encoded.indices.to_numpy(zero_copy_only=False)], encoded.dictionary.take(pa.array(order))


def unit_of_cluster(
    codes: np.ndarray,
    clusters: int,
    uris: pa.Array,
    groups: tuple[pa.Array, pa.Array] | None,
    metadata: str | None,
    column: str | None,
) -> np.ndarray:
    """cluster code -> the code of the cluster naming its unit: itself, or (with groups:
    uris and their group values) the smallest of the clusters its groups connect it to."""
    if groups is None:
        return np.arange(clusters)
    at = last_index_in(uris, groups[0])
    has = at >= 0
    if not has.any():
        raise TagpipeError(
            f"--metadata {metadata}: none of its uris is in the table (it must name images as the "
            f"table does, e.g. {uris[0].as_py()!r})"
        )
    log.info("split: %d of %d images have a %s", int(has.sum()), len(uris), column)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    value = groups[1].take(pa.array(at[has])).dictionary_encode().indices.to_numpy(zero_copy_only=False)
    n = clusters + int(value.max()) + 1
    edges = coo_matrix((np.ones(len(value)), (codes[has], clusters + value)), shape=(n, n))
    labels = connected_components(edges, directed=False)[1][:clusters]
    smallest = np.full(int(labels.max()) + 1, clusters)
    np.minimum.at(smallest, labels, np.arange(clusters))
    return smallest[labels]


def read_groups(metadata: str, column: str, storage_options: dict | None) -> tuple[pa.Array, pa.Array]:
    """(uri, group value) of the metadata rows with a value, values as strings."""
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
    values = table.column(column).cast(pa.string()).combine_chunks()
    valid = pc.fill_null(pc.not_equal(values, ""), False)
    uris = table.column("uri").combine_chunks().cast(pa.string())
    return uris.filter(valid), values.filter(valid)


def previous_splits(
    previous: str, storage_options: dict | None, uris: pa.Array, sha256: pa.Array
) -> pa.Array:
    """Each image's split in an earlier splits.parquet, null where it has none. An image
    keeps its split only while its bytes are the same: a file replaced under the same
    name is a new image (its content may belong to another cluster)."""
    before = read_parquet(previous, storage_options, ["uri", "split", "sha256"]).combine_chunks()
    now = last_index_in(before.column("uri"), uris)
    same = pc.equal(before.column("sha256"), sha256.take(pa.array(np.maximum(now, 0))))
    valid = pc.or_(pc.is_null(before.column("sha256")), pc.fill_null(same, False))
    before = before.filter(pa.array(valid.to_numpy(zero_copy_only=False) | (now < 0)))
    at = last_index_in(uris, before.column("uri").combine_chunks())
    split = before.column("split").combine_chunks().take(pa.array(np.maximum(at, 0)))
    return (
        pc.if_else(pa.array(at >= 0), split, pa.scalar(None, split.type))
        if len(before)
        else pa.nulls(len(uris), pa.string())
    )


def tag_split_counts(tagged: Tagged, rows: np.ndarray, split: np.ndarray, names: list) -> dict:
    """tag -> {split: images with it}, tags in the order they first appear (images in uri
    order, each one's tags in stored order), splits likewise per tag. Counted a block of
    images at a time, so the temporaries stay small whatever the corpus."""
    width = len(names)
    counts = np.zeros(len(tagged.vocab) * width, np.int64)
    first = np.full(len(counts), np.iinfo(np.int64).max, np.int64)
    seen = 0
    for start in range(0, len(rows), BLOCK_ROWS):
        lists = tagged.tags.take(pa.array(rows[start : start + BLOCK_ROWS]))
        lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
        key = pc.list_flatten(lists).to_numpy(zero_copy_only=False) * width  # int32: tags x splits
        key += np.repeat(split[start : start + BLOCK_ROWS].astype(np.int32), lengths)
        counts += np.bincount(key, minlength=len(counts))
        np.minimum.at(first, key, np.arange(seen, seen + len(key), dtype=np.int64))
        seen += len(key)
    present = np.flatnonzero(counts)
    out: dict = {}
    for k in present[np.argsort(first[present], kind="stable")].tolist():
        out.setdefault(tagged.vocab[k // width], {})[names[k % width]] = int(counts[k])
    return out


def unit_labels(tagged: Tagged, rows: np.ndarray, unit: np.ndarray, unit_names: dict) -> dict:
    """unit id -> {tag: images of the unit with it}: a stratified split's per-cluster labels."""
    lists = tagged.tags.take(pa.array(rows))
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    codes = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    size = len(tagged.vocab)
    pairs, counts = np.unique(np.repeat(unit, lengths) * size + codes, return_counts=True)
    labels: dict = {}
    for pair, count in zip(pairs.tolist(), counts.tolist()):
        labels.setdefault(unit_names[pair // size], {})[tagged.vocab[pair % size]] = count
    return labels
