"""One local Ray for the whole session; shared demo bundle and corpus."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    from pipeline.demo_model import write_demo_bundle

    return write_demo_bundle(tmp_path_factory.mktemp("demo_model"))


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    from pipeline.synthetic import make_corpus

    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, images_per_kind=2)
    return root
