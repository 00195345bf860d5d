import json

import pytest

from pipeline.core.errors import ConfigError
from pipeline.demo.end_to_end import check_tags
from pipeline.job.settings import load_config_file, make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.table.tag_table import read_current


def test_tag_job_writes_every_input_once_and_resumes(ray_session, demo_bundle, demo_corpus, tmp_path):
    out = tmp_path / "tags"
    cfg = make_tag_config(
        inputs=[str(demo_corpus / "images")], output=str(out), model=str(demo_bundle), rows_per_part=16
    )
    summary = run_tag_job(cfg)
    images = sorted(str(p) for p in (demo_corpus / "images").rglob("*") if p.is_file())
    table = read_current(str(out))
    assert sorted(table.column("uri").to_pylist()) == images  # exactly once each
    assert summary.images == len(images) and summary.errors == 4
    assert summary.errors_by_kind == {"empty": 1, "not_an_image": 2, "truncated": 1}
    checked, correct, wrong = check_tags(out, demo_corpus)
    assert (checked, correct, wrong) == (len(images), len(images), [])
    snapshot = json.loads((out / "_current.json").read_text())
    assert snapshot["version"] == summary.version == 1 and snapshot["rows"] == len(images)
    assert len(snapshot["files"]) == -(-len(images) // 16) and sorted(summary.parts) == snapshot["files"]
    assert all((out / f).is_file() for f in snapshot["files"])
    row = table.filter(table.column("error").is_null()).slice(0, 1).to_pylist()[0]
    assert len(row["embedding"]) == 22 and row["ood_distance"] > 0 and len(row["phash_hex"]) == 16
    from pipeline.model.bundle import load_bundle

    vocabulary = load_bundle(demo_bundle).vocabulary
    assert row["logit_indices"] == list(range(len(vocabulary)))  # a small vocabulary: every logit by default
    assert isinstance(row["ood"], bool)
    manifest = json.loads((out / "_runs" / f"{summary.run_id}.json").read_text())
    assert (
        manifest["summary"]["images"] == len(images)
        and manifest["fingerprint"]["model_sha256"] == summary.model_sha256
    )

    import duckdb  # the README's two DuckDB statements read the current version

    duckdb.execute(
        f"SET VARIABLE files = (SELECT list_transform(files, lambda f: '{out}/' || f) "
        f"FROM read_json('{out}/_current.json'))"
    )
    counts = duckdb.execute(
        "select count(*), count(distinct uri), count(error) from read_parquet(getvariable('files'))"
    ).fetchone()
    assert counts == (len(images), len(images), 4)
    phash = duckdb.execute(
        f"select phash from read_parquet(getvariable('files')) where uri = '{row['uri']}'"
    ).fetchone()[0]
    assert phash == row["phash"] and f"{phash:016x}" == row["phash_hex"]

    # the README's one-liners read any tag's probability from every row
    import numpy as np
    import pandas as pd

    df = table.to_pandas(types_mapper=pd.ArrowDtype)
    ok = df[df.error.isna()]
    i = vocabulary.tags.index(next(t for tags in table.column("tags").to_pylist() if tags for t in tags))
    p = 1 / (1 + np.exp(-ok.logit_values.list[i].astype(float)))
    want = [
        1 / (1 + np.exp(-float(r[i])))
        for r in table.filter(table.column("error").is_null()).column("logit_values").to_pylist()
    ]
    np.testing.assert_allclose(p.to_numpy(float), want, rtol=1e-6)
    assert p.max() > 0.5 > p.min()
    duck = duckdb.execute(
        f"select 1 / (1 + exp(-logit_values[{i} + 1])) from read_parquet(getvariable('files')) "
        "where error is null"
    ).fetchall()
    np.testing.assert_allclose(sorted(v for (v,) in duck), sorted(want), rtol=1e-6)

    again = run_tag_job(cfg)  # everything is done: nothing recomputed, nothing added, no new version
    assert (
        again.images == 0
        and again.skipped == len(images)
        and again.change == "no change"
        and again.version == 1
    )
    assert read_current(str(out)).num_rows == len(images)


def test_config_file_and_field_errors(tmp_path, demo_bundle):
    path = tmp_path / "job.toml"
    path.write_text(
        f'[tag]\ninputs = ["imgs"]\noutput = "out"\nmodel = "{demo_bundle}"\n'
        'batch_size = 8\nprovider = "cpu"\n'
    )
    cfg = make_tag_config(load_config_file(path), batch_size=4)
    assert cfg.batch_size == 4 and cfg.inputs == (str(tmp_path / "imgs"),) and cfg.provider.value == "cpu"
    with pytest.raises(ConfigError, match="field batch_size"):
        make_tag_config(load_config_file(path), batch_size=0)
    path.write_text(path.read_text() + 'provider = "gpu-ish"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(path)
    path.write_text('[tag]\ninputs = ["x"]\noutput = "o"\nmodel = "m"\nbatchsize = 3\n')
    with pytest.raises(ConfigError, match="unknown field.*batchsize"):
        make_tag_config(load_config_file(path))
    path.write_text('[tag]\ninputs = ["x"]\noutput = "o"\nmodel = "m"\nprovider = "gpu-ish"\n')
    with pytest.raises(ConfigError, match="field provider.*allowed: auto, cpu, cuda, tensorrt"):
        make_tag_config(load_config_file(path))


def test_example_config_parses_and_names_bad_decode_fields(tmp_path):
    from pathlib import Path

    example = Path(__file__).parents[2] / "configs" / "tag.example.toml"
    cfg = make_tag_config(load_config_file(example))
    assert cfg.draft_ratio == 2.0 and cfg.normalise_in_graph and not cfg.exact_decode
    with pytest.raises(ConfigError, match="field draft_ratio"):
        make_tag_config(load_config_file(example), draft_ratio=0.5)


@pytest.mark.parametrize("cap", [None, 1])
def test_max_decode_tasks_caps_the_decode_pool(ray_session, cap):
    """Split stages: the cap reaches Ray Data as the decode stage's task pool size; unset,
    Ray Data scales the pool itself. Fused (the CPU default): the cap is the number of
    actors that decode, one per CPU slot without it."""
    import pyarrow as pa
    import ray.data

    from pipeline.job.graph import ModelInPass, build_pass_dataset, plan_placement, slice_column
    from pipeline.model.profiles import load_profile
    from pipeline.model.tagger import TaggerSettings

    values = {"inputs": ["x"], "output": "o", "model": "m", "max_decode_tasks": cap}
    cfg = make_tag_config({**values, "decode_placement": "split"})
    blocks = [pa.table({"uri": ["a.jpg"], slice_column(0): [0]})]
    model = ModelInPass(TaggerSettings(model_dir="m"), 0, plan_placement(cfg, 0))
    dataset = build_pass_dataset(blocks, cfg, (load_profile("wd_v3").preprocess,), [model])
    decode = dataset._logical_plan.dag.input_dependencies[0]  # tagger <- decode <- blocks
    assert decode.compute == ray.data.TaskPoolStrategy(size=cap)
    fused = plan_placement(make_tag_config(values), 0, cluster_cpus=4)
    assert fused.fused and fused.tagger_actors == fused.decode_slots == (cap or 4)


PLAN_WITHOUT_RAY = """
import json, sys
import ray
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job

inputs, out, model = sys.argv[1:4]
cfg = make_tag_config(inputs=[inputs], output=out, model=model, progress=False)
dry = run_tag_job(cfg, dry_run=True)
after_dry = ray.is_initialized()
again = run_tag_job(cfg)
print(json.dumps([dry.change, after_dry, again.change, again.version, ray.is_initialized()]))
"""


def test_a_dry_run_and_a_no_change_run_never_start_ray(ray_session, demo_bundle, demo_corpus, tmp_path):
    """Listing, classifying and planning need no Ray, so a dry run or a run with nothing
    to do answers in about a second instead of waiting ~4-9 s for a local Ray to start
    (issue 32, item 11). A fresh process, so no Ray from another test is there already."""
    import subprocess
    import sys

    out = tmp_path / "tags"
    images = str(demo_corpus / "images")
    version = run_tag_job(make_tag_config(inputs=[images], output=str(out), model=str(demo_bundle))).version
    done = subprocess.run(
        [sys.executable, "-c", PLAN_WITHOUT_RAY, images, str(out), str(demo_bundle)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dry_change, ray_after_dry, change, committed, ray_after = json.loads(done.stdout.splitlines()[-1])
    assert dry_change == change == "no change" and committed == version
    assert not ray_after_dry and not ray_after
