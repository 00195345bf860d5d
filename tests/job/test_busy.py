"""Busy time: the fraction of the tagging's wall time the model sessions (and decode)
worked, in the run record, the summary line and the HTML report; a slower model keeps
its sessions busier on the same images."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.model.session_runner import BusyClock


def test_busy_clock_counts_overlapping_calls_once():
    clock = BusyClock()

    def call():
        with clock.running():
            time.sleep(0.2)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 0.2 <= clock.seconds < 0.35  # two overlapping 0.2 s calls: 0.2 s busy, not 0.4


@pytest.fixture(scope="module")
def busy_runs(ray_session, demo_corpus, demo_bundle, tmp_path_factory):
    """The same images tagged by the demo model and by the demo model made slower."""
    from pipeline.demo.model import write_demo_bundle

    slow = write_demo_bundle(tmp_path_factory.mktemp("slow_model"), slow_layers=24)
    runs = {}
    for name, model in (("fast", demo_bundle), ("slow", slow)):
        output = tmp_path_factory.mktemp(name)
        cfg = make_tag_config(inputs=[str(demo_corpus / "images")], output=str(output), model=str(model))
        runs[name] = (output, run_tag_job(cfg))
    return runs


def test_busy_fractions_are_recorded_and_move_with_the_model(busy_runs):
    (_, fast), (slow_out, slow) = busy_runs["fast"], busy_runs["slow"]
    for summary in (fast, slow):
        busy = summary.busy
        assert busy is not None and busy.tagger_actors and busy.wall_seconds > 0
        assert all(0 < f <= 1 for f in (busy.tagger, busy.decode, *busy.tagger_actors.values()))
        assert f"tagger busy {busy.tagger:.0%}: {busy.verdict}" in summary.text()
    assert slow.busy.tagger > fast.busy.tagger  # same images, more model work per image
    record = json.loads(next((slow_out / "_runs").glob("*.json")).read_text())
    assert record["summary"]["busy"]["tagger"] == slow.busy.tagger
    assert record["summary"]["busy"]["gpus"] == {}  # no GPU here: the NVML read is skipped


def test_the_report_shows_the_last_runs_busy_time(busy_runs, tmp_path):
    from pipeline.corpus.report import build_report

    output, summary = busy_runs["slow"]
    page = tmp_path / "report.html"
    build_report(str(output), str(page))
    assert f"tagger busy {summary.busy.tagger:.0%}: {summary.busy.verdict}" in page.read_text()
