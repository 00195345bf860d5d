"""Every tag run is a pass of one model or more: each image read once and decoded once
per distinct draft, and each model's table equal, row for row, to its oracle: the same
stages (DecodeStage, then TaggerStage) in a plain loop, with no Ray, no pass, no slices.
A run of one model is checked against it too, and so is each table of a pass."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFile

from pipeline.core.errors import ConfigError, TagpipeError
from pipeline.core.schemas import geometry_column
from pipeline.image.decode import DecodeStage
from pipeline.image.imaging import DecodeOptions
from pipeline.job.run_summary import PassSummary
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job, run_tag_pass
from pipeline.model.profiles import load_profile
from pipeline.table.tag_table import read_current
from tests.sample_photos import jpeg, load_photos, mosaic_3mp

SQUASH_384 = load_profile("cl_tagger_v2").preprocess
PAD_448 = load_profile("wd_v3").preprocess
FIT_PAD = SQUASH_384.model_copy(update={"resize_mode": type(SQUASH_384.resize_mode)("fit_pad")})
# what a run writes that differs between two runs of the same rows
PER_RUN = ["run_id", "tagged_at"]
NAMES = ["tagpipe-demo-tagger", "demo-pad-448", "demo-squash-b"]  # three_bundles' models


def _files(tmp_path) -> list[str]:
    """Real photos as JPEG (some EXIF-rotated) and PNG, a 3 MP JPEG, and broken files."""
    files = {}
    for i, (name, image) in enumerate(load_photos()[:6]):
        rgb = image.convert("RGB")
        exif = Image.Exif()
        exif[0x0112] = 6 if i % 2 else 1
        files[f"{name}.jpg"] = jpeg(rgb, exif=exif.tobytes())
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        files[f"{name}.png"] = buffer.getvalue()
    files["mosaic.jpg"] = mosaic_3mp(1)[0]
    files["truncated.jpg"] = files["mosaic.jpg"][:5000]
    files["empty.jpg"] = b""
    uris = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        uris.append(str(tmp_path / name))
    return uris


@pytest.mark.parametrize("exact", [False, True])
def test_decoding_for_several_profiles_equals_decoding_for_each(tmp_path, exact):
    uris = _files(tmp_path)
    batch = {"uri": np.asarray(uris, object)}
    profiles = (SQUASH_384, PAD_448, FIT_PAD)
    options = DecodeOptions(exact=exact)
    together = DecodeStage(profiles, options)(batch)
    for g, pre in enumerate(profiles):
        alone = DecodeStage(pre, options)(batch)
        for name, values in alone.items():
            column = together[geometry_column(name, g)]
            if values.dtype == object:
                assert list(column) == list(values), (pre.resize_mode, name)
            else:
                np.testing.assert_array_equal(column, values, err_msg=f"{pre.resize_mode} {name}")
    assert (
        sum(e is not None for e in together[geometry_column("error", 0)]) == 2
    )  # truncated, empty: rows, not a crash


def test_profiles_whose_draft_is_the_same_share_one_decode(tmp_path, monkeypatch):
    """A 3 MP JPEG for squash 384 and pad 448 drafts to the same DCT scale: loaded once.
    Exact decoding (no draft) is loaded once for any number of profiles."""
    data = mosaic_3mp(1)[0]
    (tmp_path / "a.jpg").write_bytes(data)
    loads = []
    original = ImageFile.ImageFile.load

    def counted(self):
        if self.tile:  # pixels still to decode (a loaded image's load() is a no-op)
            loads.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    batch = {"uri": np.asarray([str(tmp_path / "a.jpg")], object)}
    DecodeStage((SQUASH_384, PAD_448), DecodeOptions())(batch)
    assert len(loads) == 1, loads
    loads.clear()
    DecodeStage((SQUASH_384, PAD_448, FIT_PAD), DecodeOptions(exact=True))(batch)
    assert len(loads) == 1, loads
    loads.clear()
    DecodeStage((SQUASH_384,), DecodeOptions(draft_ratio=1.0))(batch)
    DecodeStage((PAD_448,), DecodeOptions(draft_ratio=8.0))(batch)
    assert len(loads) == 2  # the counter counts: one decode per stage


@pytest.fixture(scope="module")
def three_bundles(tmp_path_factory, demo_bundle):
    """The demo model (squash 384), one of another geometry (pad 448) and one sharing
    the first's geometry with other weights."""
    from pipeline.demo.model import write_demo_bundle

    root = tmp_path_factory.mktemp("bundles")
    pad = write_demo_bundle(
        root / "pad", seed=1, input_size=448, resize_mode="pad_square", name="demo-pad-448"
    )
    same = write_demo_bundle(root / "same", seed=2, name="demo-squash-b")
    return [demo_bundle, pad, same]


def _rows(uri: str) -> pa.Table:
    table = read_current(uri)
    return table.drop_columns(PER_RUN).sort_by("uri")


@pytest.fixture(scope="module")
def alone(ray_session, demo_corpus, three_bundles, tmp_path_factory):
    """Each model's table from a run of that model alone, by model name."""
    root = tmp_path_factory.mktemp("alone")
    images = str(demo_corpus / "images")
    tables = {}
    for model in three_bundles:
        summary = run_tag_job(
            make_tag_config(inputs=[images], output=str(root / model.name), model=str(model))
        )
        tables[summary.model_name] = (root / model.name, summary)
    return tables


def _oracle(table: pa.Table, model: str) -> pa.Table:
    """The table's rows as the stages make them in a plain loop over its uris, with the
    settings a run gives them (tagger_settings on a cluster with no GPU)."""
    from pipeline.job.graph import decode_options, plan_placement
    from pipeline.model.bundle import load_bundle
    from pipeline.model.tagger import TaggerSettings, TaggerStage

    cfg = make_tag_config(inputs=["x"], output="o", model=model)
    bundle = load_bundle(model)
    settings = TaggerSettings(
        model_dir=model,
        provider=cfg.provider,
        intra_op_threads=plan_placement(cfg, 0).intra_op_threads,
        dense_logits=cfg.dense_logits_for(len(bundle.vocabulary)),
        normalise_in_graph=cfg.normalise_in_graph,
        rules=cfg.rules,
        batch_timeout=cfg.batch_timeout,
    )
    tagger = TaggerStage(settings, bundle)
    decode = DecodeStage(bundle.profile.preprocess, decode_options(cfg))
    uris = np.asarray(table.column("uri").to_pylist(), object)
    rows = [tagger(decode({"uri": uris[i : i + 8]})) for i in range(0, len(uris), 8)]
    return pa.concat_tables(rows).drop_columns(PER_RUN).sort_by("uri")


def _equals_oracle(stored: pa.Table, model: str) -> bool:
    oracle = _oracle(stored, model)
    return stored.select(oracle.column_names).equals(oracle)


@pytest.mark.parametrize("index", [0, 1])
def test_a_run_of_one_model_writes_what_the_stages_give_in_a_plain_loop(three_bundles, alone, index):
    """N = 1: a run of one model (one pass of one) against its oracle, row for row."""
    path, summary = alone[NAMES[index]]
    stored = _rows(str(path))
    assert stored.num_rows == summary.images > 0
    assert _equals_oracle(stored, str(three_bundles[index]))


def test_models_in_one_pass_write_what_each_writes_alone(demo_corpus, three_bundles, alone, tmp_path):
    images = str(demo_corpus / "images")
    models = [str(b) for b in three_bundles]
    summary = run_tag_pass(make_tag_config(inputs=[images], output=str(tmp_path), model=models))
    assert isinstance(summary, PassSummary) and len(summary.runs) == 3
    assert [run.model_name for run in summary.runs] == NAMES
    for name, run in zip(NAMES, summary.runs, strict=True):
        single_path, single = alone[name]
        assert run.images == single.images and run.errors_by_kind == single.errors_by_kind
        together, by_itself = _rows(str(tmp_path / name)), _rows(str(single_path))
        assert together.schema == by_itself.schema
        assert together.equals(by_itself), name  # row for row, every stored value
        assert _equals_oracle(together, str(three_bundles[NAMES.index(name)]))


def test_a_pass_tags_for_each_model_only_what_its_table_needs(demo_corpus, three_bundles, alone, tmp_path):
    """A table already up to date is not tagged again when another model joins it."""
    import shutil

    images = str(demo_corpus / "images")
    shutil.copytree(alone["tagpipe-demo-tagger"][0], tmp_path / "tagpipe-demo-tagger")
    models = [str(three_bundles[0]), str(three_bundles[1])]
    summary = run_tag_pass(make_tag_config(inputs=[images], output=str(tmp_path), model=models))
    assert isinstance(summary, PassSummary)
    assert summary.runs[0].change == "no change" and summary.runs[0].images == 0
    assert summary.runs[1].change == "first run" and summary.runs[1].images == alone["demo-pad-448"][1].images
    assert _rows(str(tmp_path / "demo-pad-448")).equals(_rows(str(alone["demo-pad-448"][0])))


def test_several_models_are_checked_before_any_work(demo_bundle, tmp_path):
    with pytest.raises(TagpipeError, match="named 'tagpipe-demo-tagger'"):
        copy = tmp_path / "copy"
        import shutil

        shutil.copytree(demo_bundle, copy)
        run_tag_pass(
            make_tag_config(
                inputs=[str(tmp_path)], output=str(tmp_path / "o"), model=[str(demo_bundle), str(copy)]
            )
        )
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="profile"):
        make_tag_config(inputs=["x"], output="o", model=["a", "b"], profile=["wd_v3"])
    with pytest.raises(ConfigError, match="model"):
        make_tag_config(inputs=["x"], output="o", model=["a", "a"])
    with pytest.raises(TagpipeError, match="nightly one"):
        run_tag_job(make_tag_config(inputs=["x"], output="o", model=["a", "b"]))


@pytest.mark.parametrize("budget_mib", [40, 70, 100])
def test_a_shared_decode_counts_against_each_profiles_memory_budget(tmp_path, budget_mib):
    """A profile that takes a decode an earlier profile paid for is charged its memory,
    so at any budget each profile's row is what decoding for it alone gives."""
    values = (np.arange(3000 * 2000, dtype=np.uint32).reshape(2000, 3000) % 65536).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    batch = {"uri": np.asarray([str(tmp_path / "deep.png")], object)}
    options = DecodeOptions(max_memory=budget_mib * 2**20)
    profiles = (SQUASH_384, PAD_448)
    together = DecodeStage(profiles, options)(batch)
    kinds = [DecodeStage(pre, options)(batch)["error_kind"][0] for pre in profiles]
    assert [together[geometry_column("error_kind", g)][0] for g in range(2)] == kinds


def test_rows_no_model_of_a_preprocessing_needs_are_not_decoded_for_it(tmp_path):
    uris = _files(tmp_path)[:4]
    batch = {"uri": np.asarray(uris, object)}
    needed = [np.array([True, False, True, False]), np.array([False, False, True, True])]
    out = DecodeStage((SQUASH_384, PAD_448), DecodeOptions())(batch, needed)
    alone = DecodeStage((SQUASH_384, PAD_448), DecodeOptions())(batch)
    for g in range(2):
        for i in range(4):
            same = np.array_equal(
                out[geometry_column("pixels", g)][i], alone[geometry_column("pixels", g)][i]
            )
            assert same == bool(needed[g][i]) and (out[geometry_column("phash", g)][i] != 0) == bool(
                needed[g][i]
            )


def test_pools_that_ask_for_more_gpus_than_the_cluster_has_share_them_in_whole_fractions():
    from types import SimpleNamespace

    from pipeline.job.model_runs import pass_placements

    runs = [SimpleNamespace(cfg=make_tag_config(inputs=["x"], output="o", model=f"m{i}")) for i in range(3)]
    assert [p.tagger_gpus for p in pass_placements(runs, 2.0)] == [0.5, 0.5, 0.5]  # packs 2 per GPU
    assert [p.tagger_gpus for p in pass_placements(runs[:2], 2.0)] == [1.0, 1.0]
    assert [p.tagger_gpus for p in pass_placements(runs, 0.0)] == [0.0, 0.0, 0.0]  # CPU


def test_a_bundle_name_that_cannot_be_a_folder_is_refused(demo_bundle, tmp_path):
    import json
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(demo_bundle, odd)
    metadata = json.loads((odd / "model_metadata.json").read_text())
    (odd / "model_metadata.json").write_text(json.dumps({**metadata, "name": "org/model"}))
    with pytest.raises(TagpipeError, match="'org/model' cannot name its table's folder"):
        run_tag_pass(
            make_tag_config(
                inputs=[str(tmp_path)], output=str(tmp_path / "o"), model=[str(demo_bundle), str(odd)]
            )
        )


def test_the_split_stages_write_what_the_fused_stage_writes(demo_corpus, three_bundles, alone, tmp_path):
    """Without a GPU a run decodes in its tagger actors (fused); decode tasks feeding the
    actors (split) give the same rows, error rows included, for one model (the pass's
    only model) and for a pass of two (struct columns)."""
    images = str(demo_corpus / "images")
    one = run_tag_job(
        make_tag_config(
            inputs=[images],
            output=str(tmp_path / "one"),
            model=str(three_bundles[0]),
            decode_placement="split",
        )
    )
    assert "fused" not in one.placement and "fused" in alone[NAMES[0]][1].placement
    assert _rows(str(tmp_path / "one")).equals(_rows(str(alone[NAMES[0]][0])))
    assert one.errors_by_kind == alone[NAMES[0]][1].errors_by_kind and one.errors
    models = [str(three_bundles[0]), str(three_bundles[1])]
    run_tag_pass(
        make_tag_config(
            inputs=[images], output=str(tmp_path / "pass"), model=models, decode_placement="split"
        )
    )
    for name in NAMES[:2]:
        assert _rows(str(tmp_path / "pass" / name)).equals(_rows(str(alone[name][0]))), name
