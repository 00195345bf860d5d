"""The Ray session a command runs in, and the id of a run.

Every command that starts Ray work (tag, rethreshold, dedup at scale) joins or starts Ray
through ensure_ray, so the embedded default (a private local Ray) and the cluster case
(RAY_ADDRESS or --ray-address) behave the same everywhere.
"""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime

from pipeline.core.logs import ray_logging_level
from pipeline.core.progress import Progress, ProgressSettings


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def ensure_ray(address: str | None) -> None:
    """None (and no RAY_ADDRESS): start a new local Ray, the embedded default, even if
    another one runs on this machine; 'auto' or an address: join that cluster."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=ray_logging_level())
    else:
        ray.init(address="local", include_dashboard=False, logging_level=ray_logging_level())


def joins_cluster(address: str | None) -> bool:
    """Whether ensure_ray(address) joins a running cluster rather than starting a local
    Ray: its nodes' environments are their own, not this process's."""
    address = address or os.environ.get("RAY_ADDRESS")
    return bool(address) and address != "local"


def results_in_order(refs: list, label: str, progress: ProgressSettings | None = None) -> list:
    """The Ray tasks' results in the order of `refs`, counted on a progress line as each
    finishes (the part rewrites, the label check's passes)."""
    import ray

    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    waiting = list(refs)
    with Progress(label, len(refs), "parts", progress or ProgressSettings()) as shown:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            results[index[ready[0]]] = ray.get(ready[0])
            shown.update(1)
    return results
