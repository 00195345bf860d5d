"""One declared schema for tag rows: every batch, whatever it holds, gives the same
column types, so parts always concatenate and a run of failures never stops a job."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core.schemas import part_schema, tag_row_schema
from pipeline.demo.model import write_demo_bundle
from pipeline.image.decode import DecodeStage
from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.model.runtime import ProviderChoice
from pipeline.model.tagger import TaggerSettings, TaggerStage
from pipeline.table.tag_table import TagTable, read_current

HTML_ERROR_PAGE = (
    b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
)


def _write_jpeg(path: Path, seed: int, size=(96, 72)) -> None:
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, 3)
    pixels = np.clip(colour + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=85)


@pytest.fixture(scope="module")
def stage(demo_bundle) -> TaggerStage:
    return TaggerStage(
        TaggerSettings(
            model_dir=str(demo_bundle), provider=ProviderChoice.CPU, intra_op_threads=1, run_id="r"
        )
    )


def _decoded(stage: TaggerStage, tmp_path: Path, good: int, bad: int) -> dict:
    paths = []
    for i in range(good):
        _write_jpeg(tmp_path / f"good{i:03d}.jpg", i)
        paths.append(tmp_path / f"good{i:03d}.jpg")
    for i in range(bad):
        (tmp_path / f"bad{i:03d}.jpg").write_bytes(HTML_ERROR_PAGE)
        paths.append(tmp_path / f"bad{i:03d}.jpg")
    return DecodeStage(stage.bundle.profile.preprocess)({"uri": np.array([str(p) for p in paths], object)})


@pytest.mark.parametrize(
    "good,bad",
    [(0, 5), (3, 2), (5, 0), (0, 1), (1, 0)],
    ids=["all-failed", "mixed", "all-good", "one-failed", "one-good"],
)
def test_tagger_batches_of_any_content_share_the_declared_schema(stage, tmp_path, good, bad):
    table = stage(_decoded(stage, tmp_path, good, bad))
    expected = tag_row_schema(stage.postprocess.category_names, 22)
    assert table.schema == expected, table.schema
    assert table.num_rows == good + bad and table.column("error_kind").null_count == good


def test_model_failures_and_models_without_embedding_keep_the_schema(demo_bundle, tmp_path):
    plain = write_demo_bundle(tmp_path / "no_embedding", with_embedding_output=False)
    stage = TaggerStage(TaggerSettings(model_dir=str(plain), provider=ProviderChoice.CPU, intra_op_threads=1))
    batches = [_decoded(stage, tmp_path, good, bad) for good, bad in ((2, 0), (0, 2))]
    tables = [stage(b) for b in batches]
    assert tables[0].schema == tables[1].schema == tag_row_schema(stage.postprocess.category_names, None)
    assert pa.concat_tables(tables).num_rows == 4


def test_symbolic_embedding_width_is_probed_once(demo_bundle, tmp_path):
    """A graph that leaves the embedding width symbolic: the stage runs one blank image
    at start, so even an all-failed first batch has the fixed-size type."""
    directory = write_demo_bundle(tmp_path / "symbolic")
    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    embedding = next(o for o in model.graph.output if o.name == "embedding")
    embedding.type.tensor_type.shape.dim[1].dim_param = "features"
    onnx.save(model, str(directory / "model.onnx"))
    stage = TaggerStage(
        TaggerSettings(model_dir=str(directory), provider=ProviderChoice.CPU, intra_op_threads=1)
    )
    assert stage.bundle.embedding_width is None
    failed = stage(_decoded(stage, tmp_path, 0, 3))
    assert failed.schema.field("embedding").type == pa.list_(pa.float16(), 22)


def test_eighty_file_scrape_commits_eighty_rows(ray_session, demo_bundle, tmp_path):
    """40 HTML error pages saved as .jpg beside 40 photos (the case that stopped a run)."""
    folder = tmp_path / "scrape"
    folder.mkdir()
    for i in range(1, 41):
        (folder / f"bad{i:02d}.jpg").write_bytes(HTML_ERROR_PAGE)
        _write_jpeg(folder / f"good{i:02d}.jpg", i)
    out = tmp_path / "tags"
    summary = run_tag_job(make_tag_config(inputs=[str(folder)], output=str(out), model=str(demo_bundle)))
    table = read_current(str(out))
    assert summary.version == 1 and table.num_rows == 80
    assert summary.errors_by_kind == {"not_an_image": 40}
    assert table.column("error_kind").to_pylist().count("not_an_image") == 40


@pytest.mark.parametrize("batch", [1, 32])
def test_failed_mixed_and_good_batches_in_every_order(ray_session, demo_bundle, tmp_path, batch):
    """Each part is three batches: all failed, mixed and all good, in one of the six orders."""
    folder = tmp_path / "in"
    folder.mkdir()
    kinds = {"failed": (0, batch), "mixed": (batch // 2, batch - batch // 2), "good": (batch, 0)}
    if batch == 1:
        kinds["mixed"] = (1, 0)
    seed = 0
    for number, order in enumerate(itertools.permutations(kinds)):
        for position, kind in enumerate(order):
            good, bad = kinds[kind]
            for i in range(good + bad):
                path = folder / f"o{number}_{position}_{kind}_{i:03d}.jpg"
                if i < good:
                    _write_jpeg(path, seed)
                    seed += 1
                else:
                    path.write_bytes(HTML_ERROR_PAGE)
    files = sorted(folder.iterdir())
    out = tmp_path / "tags"
    cfg = make_tag_config(
        inputs=[str(folder)],
        output=str(out),
        model=str(demo_bundle),
        batch_size=batch,
        decode_batch_size=batch,
        rows_per_part=3 * batch,
    )
    summary = run_tag_job(cfg)
    assert summary.rows == len(files) and len(summary.parts) == 6
    table = TagTable(str(out))
    schemas = {pq.read_schema(str(out / f)) for f in table.current().files}
    assert len(schemas) == 1, schemas
    stage_schema = TaggerStage(
        TaggerSettings(model_dir=str(demo_bundle), provider=ProviderChoice.CPU, intra_op_threads=1)
    ).schema
    assert schemas.pop().remove_metadata() == part_schema(stage_schema)
    errors = read_current(str(out)).column("error_kind").to_pylist()
    assert errors.count("not_an_image") == sum(1 for f in files if f.read_bytes() == HTML_ERROR_PAGE)
