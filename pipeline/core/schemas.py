"""The contract of every table that crosses a boundary: one module, one type per column.

- the manifest (listing -> planning and decode), MANIFEST_SCHEMA;
- the decoded batch (decode tasks -> tagger actors), DECODED_COLUMNS and decoded_batch;
- the tag row and a written part (tagger -> parts), tag_row_schema and part_schema;
- clusters and edges (dedup), splits (split), leaks (audit);
- a tag table's edit calibration (tag time -> dedup's threshold), EDIT_CALIBRATION_SCHEMA;
- the label-check columns (LABEL_FIELDS) that comparing source (human) tags gives, kept in a
  tag table's label sidecar keyed by uri (LABELS_SCHEMA), not in its parts.

Each stage builds or casts its output to its schema at its edge (`conform`), so a batch
where every image failed, a batch of one, or a model with no embedding output gives
columns of exactly these types, and parts always concatenate. The README's column
tables are checked against these (tests/corpus/test_contracts.py). The tag row columns that
depend on the model are the per-category tag lists (from its vocabulary) and the
embedding width (a fixed-size list when the width is known, as every model with a
static output shape and every probed model gives; a plain list otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

EMBEDDING_VALUE = pa.float16()

# What the listing found: one row per input.
MANIFEST_SCHEMA = pa.schema(
    [("uri", pa.string()), ("source_size", pa.int64()), ("etag", pa.string()), ("mtime", pa.float64())]
)

# The decode stage's output columns (numpy, as Ray Data batches carry them); pixels are
# [N, height, width, 3] uint8 at the model's input size. Manifest columns pass through.
DECODED_COLUMNS: dict[str, type] = {
    "uri": np.object_,
    "pixels": np.uint8,
    "width": np.int32,  # upright original size; on an error row what the file declared, else 0
    "height": np.int32,
    "size": np.int64,  # bytes read
    "sha256": np.object_,  # None when the file could not be read
    "phash": np.uint64,
    "phash_degenerate": np.bool_,
    "error": np.object_,  # None when fine
    "error_kind": np.object_,  # an ErrorKind value (pipeline/core/errors.py)
}


# A tag run decodes each file once for every model of its pass: the file's columns once,
# the rest once per distinct preprocessing g (0, 1, ...) of the pass's models. Geometry
# 0's columns carry the plain names above, so a run of one model, and any one-model
# loop, reads a batch by DECODED_COLUMNS' names; geometry g > 0's are `<column>@<g>`.
FILE_COLUMNS = ("uri", "size", "sha256")
GEOMETRY_COLUMNS = tuple(name for name in DECODED_COLUMNS if name not in FILE_COLUMNS)


def geometry_column(name: str, geometry: int) -> str:
    """The name of decoded column `name` for the pass's preprocessing number `geometry`."""
    return name if geometry == 0 or name in FILE_COLUMNS else f"{name}@{geometry}"


def decoded_batch(n: int, sizes: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """An empty decoded batch of n rows, every column of its declared dtype; sizes:
    (height, width) per preprocessing."""
    batch: dict[str, np.ndarray] = {}
    for g, (height, width) in enumerate(sizes):
        for name, dtype in DECODED_COLUMNS.items():
            column = geometry_column(name, g)
            if column in batch:  # a file column, made for the first geometry
                continue
            if name == "pixels":
                batch[column] = np.zeros((n, height, width, 3), dtype)
            elif dtype is np.object_:
                batch[column] = np.full(n, None, object)
            else:
                batch[column] = np.zeros(n, dtype)
    return batch


# A tag table's edit calibration, _calibration/<inference_key>.parquet: one row per sampled
# image and standard edit (pipeline/image/edits.py), written once per inference key at tag time
# (pipeline/job/edit_calibration.py); its key-value metadata: EDIT_CALIBRATION_METADATA.
EDIT_CALIBRATION_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),  # the original image
        pa.field("edit", pa.string(), nullable=False),  # the edit's name (STANDARD_EDITS)
        ("cosine", pa.float32()),  # edited copy's embedding . original's; null when either failed
        ("error", pa.string()),  # null when fine
    ]
)
EDIT_CALIBRATION_METADATA = (  # keys of the file's metadata, values as UTF-8 text
    b"tagpipe.model_name",
    b"tagpipe.model_sha256",
    b"tagpipe.inference_key",
    b"tagpipe.sample_size",  # originals sampled (rows = sample_size x len(edits))
    b"tagpipe.edits",  # the edits' names, comma-separated, in row order
)


# dedup: clusters.parquet, one row per image, and edges.parquet, one row per duplicate pair.
CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        ("sha256", pa.string()),
        ("phash", pa.uint64()),
        ("cluster_id", pa.string()),  # the smallest sha256 in the cluster (row:<uri> when none)
        ("cluster_size", pa.int64()),
        ("is_representative", pa.bool_()),  # the copy first seen in the table, then the best (dedup)
    ]
)
EDGES_SCHEMA = pa.schema(
    [
        ("uri_a", pa.string()),
        ("uri_b", pa.string()),
        ("signal", pa.string()),  # sha256 | phash | embedding
        ("phash_distance", pa.int32()),  # null unless signal is phash
        ("cosine", pa.float32()),  # null unless signal is embedding
    ]
)
# split: splits.parquet, one row per image.
SPLITS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        ("sha256", pa.string()),
        ("phash", pa.uint64()),
        ("cluster_id", pa.string()),
        ("split_unit", pa.string()),  # what moves as one: the cluster, joined by metadata groups
        ("phash_degenerate", pa.bool_()),
        ("split", pa.string()),  # a ratio's name, or held_out
    ]
)
# audit: leaks.parquet, one row per (eval image, signal) that found a train copy.
LEAKS_SCHEMA = pa.schema(
    [
        ("eval_uri", pa.string()),
        ("train_uri", pa.string()),
        ("signal", pa.string()),
        ("distance", pa.int32()),  # phash bits (0 for sha256); null for embedding
        ("cosine", pa.float32()),  # null unless signal is embedding
        ("exact", pa.bool_()),  # same bytes
    ]
)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The table as its contract says: exactly the schema's columns, in order, cast to
    its types. A missing or extra column is a bug in the stage, said by name."""
    names = set(table.column_names)
    missing, extra = [f.name for f in schema if f.name not in names], sorted(names - set(schema.names))
    if missing or extra:
        raise ValueError(f"table does not match its schema: missing {missing}, extra {extra}")
    return table.select(schema.names).cast(schema)


# Where the listing found each input: appended to tag rows when a part is written.
SOURCE_FIELDS = (
    pa.field("source_size", pa.int64()),
    pa.field("etag", pa.string()),
    pa.field("mtime", pa.float64()),
)


# Source (human) tags compared with the model (pipeline/corpus/label_quality.py). Lists are
# null, and label_quality too, where the row has no source tags or is an error row
# (source_tags is null only where the source file has no row for the uri). Tables written
# before the sidecar carry these columns after the source columns of their parts.
LABEL_FIELDS = (
    pa.field("source_tags", pa.list_(pa.string())),  # aliases applied, the vocabulary's spelling
    pa.field("likely_missing", pa.list_(pa.string())),  # model confident, humans did not tag: surest first
    pa.field("likely_missing_scores", pa.list_(pa.float32())),  # the model's probability of each
    pa.field("likely_wrong", pa.list_(pa.string())),  # humans tagged, model confident absent: surest first
    pa.field("likely_wrong_scores", pa.list_(pa.float32())),  # the model's probability of each (low)
    pa.field("label_quality", pa.float32()),  # 0..1, higher: the human tags agree with the model
)
LABEL_COLUMNS = tuple(field.name for field in LABEL_FIELDS)
# A tag table's label sidecar, _labels/labels-*.parquet (pipeline/table/labels.py): one file
# per labelled part, holding exactly that part's rows (by uri), written by the label check
# (pipeline/job/label_check.py) and named in the version record beside its part.
LABELS_SCHEMA = pa.schema([pa.field("uri", pa.string(), nullable=False), *LABEL_FIELDS])


def embedding_type(width: int | None) -> pa.DataType:
    return pa.list_(EMBEDDING_VALUE, width) if width else pa.list_(EMBEDDING_VALUE)


def tag_row_schema(category_names: Sequence[str], embedding_width: int | None) -> pa.Schema:
    """The columns TaggerStage emits for every batch, in order."""
    tag_list = pa.list_(pa.string())
    return pa.schema(
        [
            pa.field("uri", pa.string(), nullable=False),
            ("sha256", pa.string()),  # null when the file could not be read
            ("size", pa.int64()),
            ("width", pa.int32()),  # upright original size; 0 when not decoded
            ("height", pa.int32()),
            ("phash", pa.uint64()),  # null when not decoded
            ("phash_hex", pa.string()),
            ("phash_degenerate", pa.bool_()),
            ("error", pa.string()),  # null when fine
            ("error_kind", pa.string()),  # an ErrorKind value (pipeline/core/errors.py)
            ("model_name", pa.string()),
            ("model_sha256", pa.string()),
            ("calibration_sha256", pa.string()),
            ("tags", tag_list),
            *((f"tags_{name}", tag_list) for name in category_names),
            ("scores", pa.list_(pa.float32())),
            ("rating", pa.string()),
            ("quality", pa.string()),
            ("embedding", embedding_type(embedding_width)),
            ("ood_distance", pa.float32()),
            ("ood", pa.bool_()),
            ("logit_indices", pa.list_(pa.int32())),
            ("logit_values", pa.list_(pa.float16())),
            ("run_id", pa.string()),
            ("tagged_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def part_schema(row_schema: pa.Schema) -> pa.Schema:
    """A written part: the tag row columns, then the listing's source columns."""
    schema = row_schema
    for field in SOURCE_FIELDS:
        schema = schema.append(field)
    return schema
