"""One local Ray for the whole session; shared demo bundle and corpus, and one run of
`tagpipe demo` that every test reading the demo's outputs shares."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.local_servers import start_moto


class _EditCalibration:
    """Whether an in-process tag run calibrates edits now (the switch below)."""

    wanted = False


@pytest.fixture(scope="session", autouse=True)
def _edit_calibration_switch():
    """Tag runs in tests skip the edit calibration (a Ray task and 12 edited copies of up
    to 200 images: ~25 s a run, minutes over the suite), except in tests marked
    `edit_calibration`, which test it (tests/job/test_edit_calibration.py) or need its
    file, and inside `calibrating()`. Session-wide, so module and session fixtures' runs
    skip it too (a function-scoped patch is set up after them). Commands run in-process
    (tests/helpers.py run_cli) skip it; runs in processes of their own (the signal,
    terminal and start-up tests) calibrate as users' runs do."""
    import pipeline.job.tag_job as tag_job

    real = tag_job.calibrate_edits

    def calibrate_where_wanted(run, snapshot):
        return real(run, snapshot) if _EditCalibration.wanted else None

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tag_job, "calibrate_edits", calibrate_where_wanted)
        yield


@contextmanager
def calibrating():
    """In-process tag runs calibrate edits inside this block, as users' runs do."""
    before, _EditCalibration.wanted = _EditCalibration.wanted, True
    try:
        yield
    finally:
        _EditCalibration.wanted = before


@pytest.fixture(autouse=True)
def _edit_calibration_only_where_tested(request):
    marked = request.node.get_closest_marker("edit_calibration") is not None
    _EditCalibration.wanted = marked
    yield
    _EditCalibration.wanted = False


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on loopback, as s3fs's own tests run it. The standard
    AWS variables point every client at it (set before Ray starts, so workers inherit
    them): that is also how users reach MinIO or R2, with no tagpipe flag."""
    proc, endpoint = start_moto()
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_session(s3_server):
    import ray
    import ray.data

    # address="local": always a new instance, never a cluster already running on this machine
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    from pipeline.demo.model import write_demo_bundle

    return write_demo_bundle(tmp_path_factory.mktemp("demo_model"))


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    from pipeline.demo.synthetic import make_corpus

    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, images_per_kind=2)
    return root


@pytest.fixture(scope="session")
def tagged(ray_session, demo_bundle, demo_corpus, tmp_path_factory):
    """Three kinds of the demo corpus (with their planted copies) and its broken files,
    tagged by the real tag job into three parts: (table, corpus). Tests of the label check
    (tests/corpus/test_label_quality.py, tests/corpus/test_label_sidecar.py) copy what they change."""
    import shutil

    from pipeline.job.settings import make_tag_config
    from pipeline.job.tag_job import run_tag_job

    work = tmp_path_factory.mktemp("labels")
    for folder in ("red", "green", "blue", "broken"):
        shutil.copytree(demo_corpus / "images" / folder, work / "corpus" / "images" / folder)
    shutil.copy(demo_corpus / "expected.jsonl", work / "corpus" / "expected.jsonl")
    cfg = make_tag_config(
        inputs=[str(work / "corpus" / "images")],
        output=str(work / "tags"),
        model=str(demo_bundle),
        rows_per_part=8,
    )
    run_tag_job(cfg)
    return work / "tags", work / "corpus"


@dataclass(frozen=True)
class DemoRun:
    """`tagpipe demo --workdir WORKDIR` as it ran: its exit status and output, and where
    it wrote (as pipeline.demo.end_to_end.DemoResult names them)."""

    workdir: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def model_dir(self) -> Path:
        return self.workdir / "model"

    @property
    def corpus_dir(self) -> Path:
        return self.workdir / "corpus"

    @property
    def tags_dir(self) -> Path:
        return self.workdir / "tags"

    @property
    def report(self) -> Path:
        return self.workdir / "report.html"


@pytest.fixture(scope="session")
def demo_run(ray_session, tmp_path_factory, worker_id) -> DemoRun:
    """The demo pipeline (tag, dedup, split, report, audit) run once per test run: the
    `tagpipe demo` command in-process (tests/helpers.py run_cli) on the session's Ray.
    It calibrates edits as users' runs do (calibrating()). Under pytest-xdist the first
    process that needs it runs it and the others read what it left (a file lock in the
    run's shared temp folder): ~50 s once, not once per process.
    tests/cli/test_cli.py checks it and tests/corpus/test_report.py reads its outputs: read-only; a
    test that changes them copies."""
    from filelock import FileLock

    from tests.helpers import run_cli

    own = tmp_path_factory.getbasetemp()
    shared = own if worker_id == "master" else own.parent  # pytest-N/ holds every worker's folder
    workdir, record = shared / "demo_run" / "demo", shared / "demo_run.json"
    with FileLock(str(shared / "demo_run.lock")):
        if not record.exists():
            with calibrating():
                done = run_cli("demo", "--workdir", workdir, "--images-per-kind", "3")
            record.write_text(json.dumps([done.returncode, done.stdout, done.stderr]))
        returncode, stdout, stderr = json.loads(record.read_text())
    return DemoRun(workdir, returncode, stdout, stderr)
