"""The README's column tables say what pipeline/core/schemas.py declares, and the
stages write what it declares."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.schemas import (
    CLUSTERS_SCHEMA,
    DECODED_COLUMNS,
    EDGES_SCHEMA,
    EDIT_CALIBRATION_SCHEMA,
    LEAKS_SCHEMA,
    SPLITS_SCHEMA,
    conform,
    decoded_batch,
    part_schema,
    tag_row_schema,
)

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
CATEGORIES = ["general", "character"]


def _readme_type(kind: pa.DataType) -> str:
    """An Arrow type as the README spells it: list<string>, list<float16>[D], timestamp."""
    text = str(kind).replace("item: ", "").replace("halffloat", "float16").replace("double", "float64")
    text = re.sub(r"\bfloat\b", "float32", text)
    text = re.sub(r"fixed_size_list<(.*)>\[\d+\]", r"list<\1>[D]", text)
    return re.sub(r"timestamp\[.*\]", "timestamp", text)


def _table_after(marker: str) -> list[tuple[list[str], list[str]]]:
    """(column names, types) of each row of the first table after `marker`."""
    start = README.index(marker)
    block = README[README.index("| column | type |", start) :].split("\n\n")[0]
    rows = []
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(
            ([n.strip() for n in cells[0].split(",")], [t.strip() for t in cells[1].split(", ") if t])
        )
    return rows


def _check(marker: str, schema: pa.Schema) -> None:
    documented = set()
    for names, kinds in _table_after(marker):
        for i, name in enumerate(names):
            matching = [f for f in schema if f.name == name or (name == "tags_<category>" and
                        f.name.startswith("tags_") and f.name != "tags")]  # fmt: skip
            assert matching, f"{marker}: README names {name}, which the schema does not have"
            documented |= {f.name for f in matching}
            if kinds:
                want = kinds[i] if len(kinds) == len(names) else kinds[0]
                for f in matching:
                    assert _readme_type(f.type) == want, (name, _readme_type(f.type), want)
    assert documented == set(schema.names), sorted(set(schema.names) - documented)


@pytest.mark.parametrize(
    "marker,schema",
    [
        ("| uri | string | the input |", part_schema(tag_row_schema(CATEGORIES, 8))),
        ("`_calibration/<inference_key>.parquet` (tag, one row", EDIT_CALIBRATION_SCHEMA),
        ("`clusters.parquet` (dedup, one row per image)", CLUSTERS_SCHEMA),
        ("`edges.parquet` (dedup, one row per duplicate pair)", EDGES_SCHEMA),
        ("`splits.parquet` (split, one row per image)", SPLITS_SCHEMA),
        ("`leaks.parquet` (audit,", LEAKS_SCHEMA),
    ],
    ids=["tag row", "edit calibration", "clusters", "edges", "splits", "leaks"],
)
def test_readme_tables_match_the_schemas(marker, schema):
    if marker.startswith("| uri |"):  # the tag row table has no marker line of its own
        marker = README[: README.index(marker)].rsplit("\n\n", 1)[1][:40]
    _check(marker, schema)


def test_the_readme_check_can_fail():
    with pytest.raises(AssertionError):
        _check(
            "`edges.parquet` (dedup, one row per duplicate pair)",
            EDGES_SCHEMA.append(pa.field("x", pa.int8())),
        )
    changed = EDGES_SCHEMA.set(4, pa.field("cosine", pa.float64()))
    with pytest.raises(AssertionError):
        _check("`edges.parquet` (dedup, one row per duplicate pair)", changed)


def test_conform_casts_and_names_what_is_missing():
    table = pa.table(
        {"uri_b": ["b"], "uri_a": ["a"], "signal": ["phash"], "phash_distance": [3], "cosine": [None]}
    )
    out = conform(table, EDGES_SCHEMA)
    assert out.schema == EDGES_SCHEMA and out.column("uri_a").to_pylist() == ["a"]
    with pytest.raises(ValueError, match=r"missing \['cosine'\]"):
        conform(table.drop_columns(["cosine"]), EDGES_SCHEMA)


def test_decoded_batch_has_the_declared_dtypes():
    batch = decoded_batch(3, [(4, 5)])
    assert list(batch) == list(DECODED_COLUMNS)
    assert batch["pixels"].shape == (3, 4, 5, 3) and batch["pixels"].dtype == np.uint8
    for name, dtype in DECODED_COLUMNS.items():
        assert batch[name].dtype == np.dtype(dtype), name


def test_the_decode_stage_emits_the_declared_columns(tmp_path):
    from PIL import Image

    from pipeline.image.decode import DecodeStage
    from pipeline.model.profiles import load_profile

    Image.new("RGB", (40, 30), "red").save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"<html>")
    pre = load_profile("wd_v3").preprocess
    stage = DecodeStage(pre)
    out = stage({"uri": np.asarray([str(tmp_path / "ok.png"), str(tmp_path / "bad.jpg")], object),
                 "source_size": np.asarray([1, 2])})  # fmt: skip
    for name, dtype in DECODED_COLUMNS.items():
        assert out[name].dtype == np.dtype(dtype), name
    assert out["source_size"].tolist() == [1, 2]
    assert out["error_kind"].tolist() == [None, "not_an_image"]


def test_dedup_split_and_audit_write_their_schemas(tmp_path):
    """Tables as the stages write them: the schema exactly (names, order, types)."""
    import pyarrow.parquet as pq

    from pipeline.corpus.audit import run_audit
    from pipeline.corpus.dedup import run_dedup
    from pipeline.corpus.split import run_split

    n = 40
    rng = np.random.default_rng(0)
    phash = rng.integers(0, 2**63, n, dtype=np.uint64)
    phash[1] = phash[0]  # one pair of near-duplicates
    sha = [f"{i:064x}" for i in range(n)]
    tags = pa.table({"uri": [f"/x/{i}.jpg" for i in range(n)], "sha256": sha, "phash": phash,
                     "error": pa.nulls(n, pa.string()), "tags": [["a"]] * n})  # fmt: skip
    pq.write_table(tags, tmp_path / "tags.parquet")
    run_dedup(str(tmp_path / "tags.parquet"), str(tmp_path / "dedup"), embedding_threshold=None)
    assert pq.read_schema(tmp_path / "dedup" / "clusters.parquet").remove_metadata() == CLUSTERS_SCHEMA
    assert pq.read_schema(tmp_path / "dedup" / "edges.parquet").remove_metadata() == EDGES_SCHEMA
    run_split(str(tmp_path / "tags.parquet"), str(tmp_path / "dedup"), str(tmp_path / "split"))
    assert pq.read_schema(tmp_path / "split" / "splits.parquet").remove_metadata() == SPLITS_SCHEMA
    run_audit(str(tmp_path / "tags.parquet"), str(tmp_path / "tags.parquet"), output=str(tmp_path / "audit"),
              embedding_threshold=None)  # fmt: skip
    assert pq.read_schema(tmp_path / "audit" / "leaks.parquet").remove_metadata() == LEAKS_SCHEMA
