"""Source (human) tags: a Parquet or CSV file of uri -> tags, read, normalised and aliased.

The file has a uri column (`uri` unless named) and a tags column (named, or the first of
`source_tags`, `tags`, `tag_string` it has: Danbooru's post export calls it `tag_string`).
The tags column is a list of strings, or one string per row split by the separator rule:
- `separator` given: split on it (" " means any run of whitespace);
- `per-row`: a row that holds ", " is comma-separated ("long hair, 1girl", as captions
  and WD-style lists write it), any other whitespace-separated (booru style:
  "long_hair 1girl", underscores inside a tag);
- not given: the one the whole file uses, by that rule. A file with comma-separated rows
  and rows of several whitespace-separated tags mixes them, and is refused with an
  example of each: one comma row must not turn every booru row into one long tag.
Each tag is normalised to the booru spelling: surrounding whitespace dropped and inner
runs of whitespace turned into one underscore ("long hair" -> "long_hair"), case kept
(Danbooru has both `o_o` and `O_O`). The vocabulary is matched the same way
(pipeline/corpus/label_quality.py), so WD (underscores) and CL (either) both match.
Aliases (Danbooru's tag_aliases export: antecedent_name,consequent_name[,status...], only
`active` rows when a status column exists; a two-column CSV without header; or a JSON
object {antecedent: consequent}) are normalised alike and applied once, not chained.
Empty tags and repeats within a row are dropped; a null tags value is no tags. A uri on
several rows is one image whose tags are the union, in first-seen order (merged rows are
counted in the table's metadata, `tagpipe.merged_rows`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import TagpipeError
from pipeline.storage.filesystem import read_bytes

log = logging.getLogger(__name__)
TAG_COLUMN_CANDIDATES = ("source_tags", "tags", "tag_string")
SOURCE_TAGS_SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field("source_tags", pa.list_(pa.string()))])
MERGED_ROWS_KEY = b"tagpipe.merged_rows"


def normalise_tag(tag: str) -> str:
    """The booru spelling: outer whitespace dropped, inner runs of whitespace as one '_'."""
    return "_".join(tag.split())


def read_source_tags(
    path: str,
    storage_options: dict | None = None,
    aliases: str | dict[str, str] | None = None,
    uri_column: str = "uri",
    tags_column: str | None = None,
    separator: str | None = None,
) -> pa.Table:
    """uri -> source_tags (list<string>, normalised, aliased, deduplicated), one row per
    uri (SOURCE_TAGS_SCHEMA). aliases: a file (CSV or JSON) or a ready map. A bad file is
    one TagpipeError naming the file and the column."""
    table = _read_table(path, storage_options)
    if uri_column not in table.column_names:
        raise TagpipeError(f"{path}: no column {uri_column!r} (columns: {', '.join(table.column_names)})")
    column = tags_column or next((c for c in TAG_COLUMN_CANDIDATES if c in table.column_names), None)
    if column is None or column not in table.column_names:
        wanted = repr(tags_column) if tags_column else " or ".join(TAG_COLUMN_CANDIDATES)
        raise TagpipeError(f"{path}: no tags column {wanted} (columns: {', '.join(table.column_names)})")
    uris = table.column(uri_column)
    if not (pa.types.is_string(uris.type) or pa.types.is_large_string(uris.type)):
        raise TagpipeError(f"{path}: column {uri_column!r} is {uris.type}, expected strings")
    empty = uris.null_count + (pc.sum(pc.equal(uris, "")).as_py() or 0)
    if empty:
        raise TagpipeError(f"{path}: column {uri_column!r} has {empty} empty values")
    rows, tags = _tag_pairs(path, column, table.column(column), separator)
    alias_map = read_aliases(aliases, storage_options) if isinstance(aliases, str) else aliases or {}
    if alias_map:
        keys = pa.array(list(alias_map), pa.string())
        hit = pc.index_in(tags, value_set=keys)
        replaced = pc.take(pa.array(list(alias_map.values()), pa.string()), hit)
        tags = pc.if_else(pc.is_null(hit), tags, replaced)
    return _group(uris.combine_chunks().cast(pa.string()), rows, tags)


def _read_table(path: str, storage_options: dict | None) -> pa.Table:
    """Parquet, or CSV (a name ending .csv) with every column read as text."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        data = read_bytes(path, storage_options)
    except FileNotFoundError:
        raise TagpipeError(f"{path}: no such file") from None
    is_csv = posixpath.basename(path).lower().endswith(".csv")
    try:
        if is_csv:
            first = data[: data.find(b"\n") if b"\n" in data else len(data)].decode("utf-8", "replace")
            header = next(csv.reader([first]), [])
            return pcsv.read_csv(
                pa.py_buffer(data),
                convert_options=pcsv.ConvertOptions(
                    column_types={name: pa.string() for name in header}, strings_can_be_null=False
                ),
            )
        return pq.read_table(pa.py_buffer(data))
    except pa.ArrowInvalid as exc:
        kind = "CSV" if is_csv else "Parquet file (or a CSV named .csv)"
        raise TagpipeError(f"{path}: not a readable {kind} ({str(exc).splitlines()[0]})") from None


def _tag_pairs(path: str, column: str, values: pa.ChunkedArray, separator: str | None):
    """(source row of each tag, normalised tag) for every non-empty tag, in order."""
    kind = values.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        if not (pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)):
            raise TagpipeError(f"{path}: column {column!r} is {kind}, expected a list of strings or a string")
        lists = values.combine_chunks().cast(pa.list_(pa.string()))
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = values.combine_chunks().cast(pa.string())
        lists = _split(path, column, text, separator)
    else:
        raise TagpipeError(f"{path}: column {column!r} is {kind}, expected a list of strings or a string")
    lists = pc.fill_null(lists, pa.scalar([], pa.list_(pa.string())))
    rows = pc.list_parent_indices(lists).to_numpy()
    tags = pc.replace_substring_regex(pc.utf8_trim_whitespace(pc.list_flatten(lists)), r"\s+", "_")
    keep = pc.greater(pc.utf8_length(pc.fill_null(tags, "")), 0)
    return rows[keep.to_numpy(zero_copy_only=False)], tags.filter(keep)


PER_ROW = "per-row"


def _split(path: str, column: str, text: pa.Array, separator: str | None) -> pa.Array:
    """Each row's tags as a list, by the separator rule (module docstring)."""
    if separator not in (None, PER_ROW):
        return (
            pc.utf8_split_whitespace(text) if separator.strip() == "" else pc.split_pattern(text, separator)
        )
    commas = pc.fill_null(pc.match_substring(text, ", "), False)
    spaced = _several_words(text)
    if separator is None and pc.any(commas).as_py() and pc.any(pc.and_(spaced, pc.invert(commas))).as_py():
        comma_row = int(np.flatnonzero(commas.to_numpy(zero_copy_only=False))[0])
        word_row = int(np.flatnonzero(pc.and_(spaced, pc.invert(commas)).to_numpy(zero_copy_only=False))[0])
        raise TagpipeError(
            f"{path}: column {column!r} mixes separators: row {comma_row + 1} is comma-separated "
            f"({_example(text, comma_row)}), row {word_row + 1} whitespace-separated "
            f"({_example(text, word_row)}); "
            "give --tag-separator ',' or ' ', or per-row to decide row by row"
        )
    by_comma, by_space = pc.split_pattern(text, ","), pc.utf8_split_whitespace(text)
    if separator is None:  # one rule for the whole file, as it does not mix them
        return by_comma if pc.any(commas).as_py() else by_space
    return pc.if_else(commas, by_comma, by_space)


def _several_words(text: pa.Array) -> pa.Array:
    """Rows of two or more whitespace-separated words."""
    return pc.fill_null(pc.greater(pc.list_value_length(pc.utf8_split_whitespace(text)), 1), False)


def _example(text: pa.Array, row: int, width: int = 40) -> str:
    value = text[row].as_py()
    return repr(value if len(value) <= width else value[:width] + "...")


def _group(uris: pa.Array, rows: np.ndarray, tags: pa.Array) -> pa.Table:
    """One row per uri (first-seen order), its tags' union without repeats, in order."""
    unique_uris = pc.unique(uris)
    uid = pc.index_in(uris, value_set=unique_uris).to_numpy()
    pair_uid = uid[rows].astype(np.int64)
    unique_tags = pc.unique(tags)
    tag_id = pc.index_in(tags, value_set=unique_tags).to_numpy().astype(np.int64)
    _, first = np.unique(pair_uid * max(len(unique_tags), 1) + tag_id, return_index=True)
    first = np.sort(first)
    first = first[np.argsort(pair_uid[first], kind="stable")]
    offsets = np.zeros(len(unique_uris) + 1, np.int32)
    np.cumsum(np.bincount(pair_uid[first], minlength=len(unique_uris)), out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets), pc.take(tags, pa.array(first)))
    merged = len(uris) - len(unique_uris)
    if merged:
        log.info("source tags: %d rows repeat a uri; their tags are merged", merged)
    table = pa.Table.from_arrays([unique_uris, lists], schema=SOURCE_TAGS_SCHEMA)
    return table.replace_schema_metadata({MERGED_ROWS_KEY: str(merged).encode()})


def read_aliases(path: str, storage_options: dict | None = None) -> dict[str, str]:
    """antecedent -> consequent, both normalised, from a CSV (Danbooru's export, or two
    columns without header) or a JSON object."""
    try:
        text = read_bytes(path, storage_options).decode("utf-8")
    except FileNotFoundError:
        raise TagpipeError(f"{path}: no such alias file") from None
    except UnicodeDecodeError:
        raise TagpipeError(f"{path}: the alias file is not UTF-8 text") from None
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TagpipeError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise TagpipeError(f"{path}: expected a JSON object of antecedent: consequent strings")
        pairs = list(data.items())
    else:
        pairs = _csv_aliases(path, list(csv.reader(io.StringIO(text))))
    return {normalise_tag(a): normalise_tag(c) for a, c in pairs if normalise_tag(a) and normalise_tag(c)}


def _csv_aliases(path: str, rows: list[list[str]]) -> list[tuple[str, str]]:
    if not rows:
        return []
    header = [name.strip().lower() for name in rows[0]]
    if not any("antecedent" in name for name in header):
        if any(len(row) < 2 for row in rows):
            raise TagpipeError(f"{path}: expected antecedent,consequent on every line")
        return [(row[0], row[1]) for row in rows]
    names = {"antecedent": ("antecedent_name", "antecedent"), "consequent": ("consequent_name", "consequent")}
    found = {}
    for role, spellings in names.items():
        index = next((header.index(s) for s in spellings if s in header), None)
        if index is None:
            raise TagpipeError(f"{path}: no column {spellings[0]!r}")
        found[role] = index
    status = header.index("status") if "status" in header else None
    width = max(found.values()) + 1
    return [
        (row[found["antecedent"]], row[found["consequent"]])
        for row in rows[1:]
        if len(row) >= width and (status is None or len(row) <= status or row[status].strip() == "active")
    ]
