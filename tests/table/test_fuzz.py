"""The decode stage against a seeded mutation fuzzer (tests/fuzz.py): no case crashes a
worker, hangs past the decode timeout, loses or repeats a row, passes with partial
pixels, or grows the worker past the memory budget. CI runs a few hundred cases; the
slow run (FUZZ_CASES, default 20,000) gives the figures in docs/reliability.md:

    FUZZ_CASES=20000 python -m pytest -m slow tests/table/test_fuzz.py -s
"""

from __future__ import annotations

import os

import pytest

from pipeline.core.errors import ErrorKind
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.table.tag_table import read_current
from tests.fuzz import FuzzSettings, make_cases, run_cases, seed_files


def _check(report) -> None:
    print(report.text())
    details = {
        "crashes": report.crashes,
        "hangs": report.hangs,
        "row mismatches": report.row_mismatches,
        "partial-pixel rows": report.partial_pixel_rows,
        "inconsistent": report.inconsistent,
        "over budget": report.over_budget,
    }
    assert report.problems() == 0, {k: v[:10] for k, v in details.items() if v}
    assert set(report.kinds) - {"ok"} <= {k.value for k in ErrorKind}


def test_seed_files_are_valid_and_cover_the_formats():
    seeds = seed_files()
    assert len(seeds) >= 28
    from tests.fuzz import fresh_pillow_loads

    assert {name: fresh_pillow_loads(data) for name, data in seeds.items()} == {name: None for name in seeds}


def test_mutations_are_deterministic():
    first = make_cases(60, seed=3)
    assert [c.data for c in first] == [c.data for c in make_cases(60, seed=3)]
    assert [c.data for c in first] != [c.data for c in make_cases(60, seed=4)]


def test_fuzz_cases_through_the_decode_stage_and_a_tag_job(ray_session, demo_bundle, tmp_path):
    cases = make_cases(600, seed=0)
    report = run_cases(ray_session, cases, tmp_path / "cases")
    _check(report)
    assert (
        report.kinds["ok"] >= 15 and len(report.kinds) >= 4
    )  # the seeds decode; mutations fail in several ways

    sample = cases[::6]  # 100 cases through a real tag job: one row each, the same verdicts
    folder = tmp_path / "sample"
    folder.mkdir()
    for i, case in enumerate(sample):
        (folder / f"{i:03d}-{case.name.split('~')[0]}").write_bytes(case.data)
    summary = run_tag_job(
        make_tag_config(
            inputs=[str(folder)],
            output=str(tmp_path / "tags"),
            model=str(demo_bundle),
            max_pixels=16_000_000,
            max_decode_memory=512 * 2**20,
        )
    )
    rows = read_current(str(tmp_path / "tags"))
    assert summary.listed == rows.num_rows == len(sample)
    by_file = dict(
        zip(
            (os.path.basename(u) for u in rows.column("uri").to_pylist()),
            rows.column("error_kind").to_pylist(),
        )
    )
    for i, case in enumerate(sample):
        assert by_file[f"{i:03d}-{case.name.split('~')[0]}"] == report.results[case.name], case.name


@pytest.mark.slow
@pytest.mark.soak
def test_fuzz_many_cases(ray_session, tmp_path):
    count = int(os.environ.get("FUZZ_CASES", "20000"))
    report = run_cases(
        ray_session,
        make_cases(count, seed=int(os.environ.get("FUZZ_SEED", "1"))),
        tmp_path / "cases",
        FuzzSettings(chunk=200),
    )
    _check(report)
