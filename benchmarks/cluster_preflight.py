"""What the storage preflight adds to a run: on a joined 2-node cluster, and on a local Ray.

    python benchmarks/cluster_preflight.py [--rounds 5]

Starts moto's S3 server and a 2-node Ray cluster on loopback (tests/ray_nodes.py: `ray
start --head` and `ray start --address`, 1 CPU each, the nodes with credentials), puts
100 small objects under s3://bench/in/, and joins the cluster as `tagpipe tag
--ray-address` does. It times, in seconds:
  join:          ray.init(address=...), which a run on a cluster pays anyway;
  driver check:  driver_preflight (one listing page, one byte read, a probe put + delete);
  workers, cold: check_workers the first time (each node starts a worker process for it);
  workers, warm: check_workers again, best and median of --rounds;
then the same on a local Ray (ray.init(address="local"), 2 CPUs), where a run starts Ray
after planning and checks its workers as it starts. The target (issue 35): <= 2 s on a
joined cluster, driver check + workers cold.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.local_servers import start_moto  # noqa: E402
from tests.ray_nodes import node_env, start_cluster  # noqa: E402


def timed(call) -> tuple[float, object]:
    t = time.perf_counter()
    result = call()
    return time.perf_counter() - t, result


def measure(label: str, init, cfg, rounds: int) -> None:
    import ray

    from pipeline.job.preflight import check_workers, driver_preflight

    join, _ = timed(init)
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    driver, preflight = timed(lambda: driver_preflight(cfg, "bench"))
    cold, _ = timed(lambda: check_workers(preflight))
    warm = [timed(lambda: check_workers(preflight))[0] for _ in range(rounds)]
    print(f"{label} ({nodes} nodes)")
    print(f"  join/start Ray            {join:6.2f} s  (paid by any run that uses Ray)")
    print(f"  driver check              {driver:6.2f} s")
    print(f"  workers' check, cold      {cold:6.2f} s")
    print(f"  workers' check, warm      {min(warm):6.2f} s best, {statistics.median(warm):.2f} s median")
    print(f"  preflight total (cold)    {driver + cold:6.2f} s  (target <= 2 s on a joined cluster)")
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    moto, endpoint = start_moto()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    cluster = None
    try:
        import ray
        import s3fs

        from pipeline.job.settings import make_tag_config

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        for i in range(100):
            fs.pipe_file(f"bench/in/{i:03d}.bin", b"x" * 1000)
        cfg = make_tag_config(inputs=["s3://bench/in/"], output="s3://bench/out", model=".")
        started = time.perf_counter()
        cluster = start_cluster(node_env(with_credentials=True))
        print(f"(2-node cluster started in {time.perf_counter() - started:.1f} s; not part of any figure)")
        os.environ["RAY_AUTH_MODE"] = "disabled"
        joined = lambda: ray.init(address=cluster.address, logging_level=logging.ERROR)  # noqa: E731
        measure("joined cluster (ray start, loopback)", joined, cfg, args.rounds)
        local = lambda: ray.init(  # noqa: E731
            address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR
        )
        measure("local Ray", local, cfg, args.rounds)
    finally:
        if cluster is not None:
            cluster.stop()
        moto.terminate()
        moto.wait(timeout=10)


if __name__ == "__main__":
    main()
