"""A table is portable and hard to misread: its records name parts relative to its root,
so a copy on another disk or on S3 reads the same through every reader; and a plain read
of the whole folder, which would mix versions, fails loudly on a guard file instead."""

from __future__ import annotations

import os
import shutil
import uuid

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.table.tag_table import GUARD_FILE, current_files, read_current

COLUMNS = ["uri", "sha256", "tags", "error_kind"]


def _sorted(table: pa.Table) -> list[dict]:
    """The rows' values, by uri (readers differ in string and list types, not in values)."""
    return table.select(COLUMNS).sort_by("uri").to_pylist()


@pytest.fixture(scope="module")
def two_versions(ray_session, demo_bundle, demo_corpus, tmp_path_factory):
    """Version 2 drops an image and adds one, so its parts differ from version 1's."""
    root = tmp_path_factory.mktemp("portable")
    corpus = root / "images"
    shutil.copytree(demo_corpus / "images", corpus)
    out = root / "tags"
    cfg = make_tag_config(inputs=[str(corpus)], output=str(out), model=str(demo_bundle), rows_per_part=16)
    run_tag_job(cfg)
    (corpus / "noise" / "noise_001.png").unlink()
    shutil.copy(corpus / "red" / "red_001.png", corpus / "red" / "red_copy.png")
    assert run_tag_job(cfg).version == 2
    return out


def test_a_copied_table_reads_the_same_through_every_reader(two_versions, s3_server, tmp_path, monkeypatch):
    expected = _sorted(read_current(str(two_versions)))
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(two_versions, copy)
    shutil.rmtree(two_versions.parent / "unused", ignore_errors=True)
    monkeypatch.chdir(tmp_path)  # another working directory: nothing may depend on the old one
    files = current_files(str(copy))
    assert all(f.startswith(str(copy)) for f in files)
    assert _sorted(read_current(str(copy))) == expected
    assert _sorted(pa.Table.from_pandas(pd.read_parquet(files), preserve_index=False)) == expected
    assert _sorted(pads.dataset(files).to_table()) == expected
    assert _sorted(pl.read_parquet(files).to_arrow()) == expected
    duckdb.execute(
        f"SET VARIABLE files = (SELECT list_transform(files, lambda f: '{copy}/' || f) "
        f"FROM read_json('{copy}/_current.json'))"
    )
    uris = [
        r[0]
        for r in duckdb.execute("select uri from read_parquet(getvariable('files')) order by uri").fetchall()
    ]
    assert uris == [row["uri"] for row in expected]

    import s3fs

    bucket = f"portable-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    fs.put(str(two_versions), f"{bucket}/tags", recursive=True)
    on_s3 = f"s3://{bucket}/tags"
    assert _sorted(read_current(on_s3)) == expected
    remote = current_files(on_s3)
    assert all(f.startswith(on_s3 + "/") for f in remote)
    keys = [f[len("s3://") :] for f in remote]
    assert (
        _sorted(pa.Table.from_pandas(pd.read_parquet(keys, filesystem=fs), preserve_index=False)) == expected
    )
    assert _sorted(pads.dataset(keys, filesystem=fs).to_table()) == expected


PLAIN_READS = {
    "pandas.read_parquet(OUTPUT)": lambda out: pd.read_parquet(out),
    "pyarrow.dataset(OUTPUT)": lambda out: pads.dataset(out).to_table(),
    "polars.read_parquet(OUTPUT)": lambda out: pl.read_parquet(out),
    "polars.read_parquet(OUTPUT/**/*.parquet)": lambda out: pl.read_parquet(f"{out}/**/*.parquet"),
    "duckdb read_parquet('OUTPUT/**/*.parquet')": lambda out: duckdb.execute(
        f"select count(*) from read_parquet('{out}/**/*.parquet')"
    ).fetchall(),
    "duckdb read_parquet('OUTPUT/*/*/*.parquet')": lambda out: duckdb.execute(
        f"select count(*) from read_parquet('{out}/*/*/*.parquet')"
    ).fetchall(),
    "duckdb read_parquet('OUTPUT/data/*/*.parquet')": lambda out: duckdb.execute(
        f"select count(*) from read_parquet('{out}/data/*/*.parquet')"
    ).fetchall(),
}


@pytest.mark.parametrize("reader", PLAIN_READS)
def test_plain_reads_of_the_folder_fail_loudly(two_versions, reader):
    """Without the guard these read every version's parts at once (measured: 2x the rows
    for pandas and pyarrow; DuckDB's ** glob also took the input listings)."""
    assert (two_versions / GUARD_FILE).is_file() and (two_versions / "data" / GUARD_FILE).is_file()
    with pytest.raises(Exception) as raised:
        PLAIN_READS[reader](str(two_versions))
    text = str(raised.value)
    if not reader.startswith("polars"):  # polars names no file in its error
        assert "NOT_DATA-read_this_table_through__current.json" in text, text


def test_the_guard_is_what_fails_them(two_versions, tmp_path):
    """The same table without its guard files is read whole, versions mixed: the
    silent wrong read the guards exist to stop."""
    bare = tmp_path / "bare"
    shutil.copytree(two_versions, bare)
    for guard in bare.rglob(GUARD_FILE):
        guard.unlink()
    mixed = pd.read_parquet(str(bare))
    assert len(mixed) > read_current(str(bare)).num_rows
    os.environ.pop("TAGPIPE_NOTHING", None)


# A version as tagpipe wrote it before the rules and counts were typed: the counts'
# old name for reinferred rows, rules without the floor or calibrate, a count and a rule
# this tagpipe does not know.
OLD_VERSION = {
    "version": 3,
    "files": ["data/k/part-a.parquet"],
    "rows": 5,
    "model_sha256": "m" * 64,
    "inference_key": "i",
    "rules_key": "r",
    "run_id": "old",
    "committed_at": "2026-01-01T00:00:00+00:00",
    "model_name": "demo",
    "rules": {"default_threshold": 0.4, "exclude": ["a", "b"], "retired_rule": 1},
    "counts": {
        "listed": 5,
        "retagged": 4,
        "rows": 5,
        "skipped_files": {"sidecar": 2},
        "label_check": {"rule": "data", "likely_wrong": 1, "retired_count": 9},
        "retired_total": 7,
    },
}


def test_a_version_written_before_the_typed_records_reads_with_its_defaults():
    import json

    from pipeline.table.tag_table import Snapshot
    from pipeline.table.version_fields import DEFAULT_LOGIT_FLOOR

    snapshot = Snapshot.from_json(json.dumps(OLD_VERSION).encode())
    rules, counts = snapshot.rules, snapshot.counts
    assert rules.default_threshold == 0.4 and rules.exclude == ("a", "b")
    assert rules.floor == DEFAULT_LOGIT_FLOOR == 0.01 and rules.calibrates is True  # not recorded
    assert counts.reinferred == 4 and counts.listed == counts.rows == 5 and counts.new is None
    assert counts.label_check is not None and (counts.label_check.rule, counts.label_check.likely_wrong) == (
        "data",
        1,
    )
    again = json.loads(snapshot.to_json())  # written back: the same objects, today's names, nothing null
    assert again["rules"] == {"default_threshold": 0.4, "exclude": ["a", "b"]}
    assert again["counts"]["reinferred"] == 4 and "retagged" not in again["counts"]
    assert again["counts"]["skipped_files"] == {"sidecar": 2} and None not in again["counts"].values()
    assert Snapshot.from_json(snapshot.to_json()) == snapshot


def test_a_tag_runs_version_records_its_rules_and_counts_as_plain_objects(two_versions):
    """What an older tagpipe reads: `rules` as RuleSettings.record() gives them, `counts`
    with every count the run made and none it did not."""
    import json

    record = json.loads(next((two_versions / "_versions").glob("*2.json")).read_text())
    counts = record["counts"]
    assert {"listed", "new", "deleted", "reinferred", "images", "rows", "skipped_files"} <= set(counts)
    assert counts["rows"] == record["rows"] and "label_check" not in counts and "rows_changed" not in counts
    assert record["rules"] == {} or None not in record["rules"].values()
