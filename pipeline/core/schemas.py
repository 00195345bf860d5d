"""The tag table's row contract: one Arrow type per column, whatever a batch holds.

A batch where every image failed, a batch of one, a model with no embedding output:
each gives columns of exactly these types, so parts always concatenate. The columns
that depend on the model are the per-category tag lists (from its vocabulary) and the
embedding width (a fixed-size list when the width is known, as every model with a
static output shape and every probed model gives; a plain list otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

EMBEDDING_VALUE = pa.float16()
# Where the listing found each input: appended to tag rows when a part is written.
SOURCE_FIELDS = (
    pa.field("source_size", pa.int64()),
    pa.field("etag", pa.string()),
    pa.field("mtime", pa.float64()),
)


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
