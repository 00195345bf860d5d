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
