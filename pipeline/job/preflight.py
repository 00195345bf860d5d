"""What `tagpipe tag` checks before it loads a bundle, lists an input or starts Ray: that
each local input is there, and not an empty folder, and that the output can be written
and is not another command's output. Each failure is one line naming the path (exit 2),
and nothing is written. After the listing, an input that lists no file at all is refused
the same way (empty_listing_text) unless --allow-empty.

Then the storage preflight (--no-preflight skips it; a dry run writes nothing, so skips it
too): the driver reads one object of each input and creates and deletes a probe object
under the output (driver_preflight), then, on a joined cluster, one Ray task on every node
with CPUs does the same with the run's storage options as its argument (check_workers): a node's
environment (credentials, role, endpoint) is its own, and a worker without access would
otherwise fail every one of millions of reads. On a cluster Ray is joined before the
listing for it; a local Ray starts after planning, and its workers, which inherit the
driver's environment, are not asked again (docs/decisions.md). Every message says
whose access failed: the driver's, or the workers' on node IP (with the driver's passing).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from pipeline.core.errors import ConfigError, TagpipeError
from pipeline.storage.filesystem import BUCKET, CREDENTIALS, DENIED, DRIVER, ENDPOINT, WORKERS, cause_of
from pipeline.storage.probe import ProbeFailure, first_object, probe_place, probe_storage
from pipeline.storage.writable import check_writable
from pipeline.table.input_kinds import AUDIT, DEDUP, SPLIT, TABLES, expect_output, kind_of

ALLOW = "pass --allow-empty to commit it anyway"


def check_tag_paths(cfg) -> None:
    """Refuse, before any work, a missing or empty local input and an output that cannot
    take a table. A dry run is checked the same way (the checks write nothing): it must
    not plan a run that the real one refuses."""
    for uri in cfg.inputs:
        if "://" in uri:
            continue  # an object store's listing answers for itself
        if not os.path.exists(uri):
            raise TagpipeError(f"input not found: {uri}")
        if os.path.isdir(uri) and not cfg.allow_empty and _empty(uri):
            raise TagpipeError(f"input {uri} is an empty folder: nothing to tag, nothing committed; {ALLOW}")
    check_writable(cfg.output, "--output")
    found = kind_of(cfg.output, cfg.storage_options)
    if found.kind in (DEDUP, SPLIT, AUDIT):
        raise TagpipeError(f"--output {cfg.output} is {found.kind}, not a tag table: write to a new folder")
    if found.kind == TABLES and len(cfg.model) == 1:
        raise TagpipeError(
            f"--output {cfg.output} holds one tag table per model ({', '.join(found.tables)}), from a "
            "pass with several --model: give one of them, or the same models again"
        )


def check_nightly_paths(cfg) -> None:
    """A nightly's later outputs (dedup's, and the splits' with their audits) checked
    before its tag step: a read-only splits folder found after hours of tagging is late."""
    options = cfg.tag.storage_options
    for option, uri, own in (
        ("dedup_output", cfg.dedup_output, DEDUP),
        ("splits_output", cfg.splits_output, SPLIT),
    ):
        check_writable(uri, option)
        expect_output(uri, own, option, options)


def _empty(folder: str) -> bool:
    with os.scandir(folder) as entries:
        return not any(entries)


def empty_listing_text(inputs: tuple[str, ...], skipped: dict[str, int]) -> str:
    """Why nothing was committed when the inputs listed no file to tag."""
    left_out = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    own = bool(skipped) and set(skipped) == {"tagpipe_output"}  # the input is an output: a wrong -i
    return (
        f"the inputs ({', '.join(inputs)}) list no file to tag"
        + (f" (left out: {left_out})" if left_out else "")
        + "; nothing was committed: "
        + ("they hold only tagpipe's own outputs: give the folder of images as -i" if own else ALLOW)
    )


NODE_ANSWER_SECONDS = 120.0  # a node whose probe has not answered by then is named as stuck
PROBE_NAME = ".tagpipe-preflight-{run_id}-{who}"  # created and deleted at once under the output


@dataclass(frozen=True)
class Preflight:
    """What the driver could read and write, for the workers to be asked the same.
    storage_options travel to each task as an argument: never in runtime_env (the
    dashboard shows it), a log line or a run record."""

    reads: tuple[str, ...]
    output: str
    run_id: str
    storage_options: dict

    def probe(self, who: str) -> str:
        return probe_place(self.output, PROBE_NAME.format(run_id=self.run_id, who=who))


def driver_preflight(cfg, run_id: str) -> Preflight:
    """The driver's own check (before the listing): one object per input found with one
    listing page and one byte of it read; a probe object created and deleted under the
    output. A failure is one line that says it is the driver's environment."""
    preflight = Preflight(_first_objects(cfg), cfg.output, run_id, cfg.storage_options)
    failure = probe_storage(list(preflight.reads), preflight.probe("driver"), cfg.storage_options)
    if failure is not None:
        raise TagpipeError(driver_text(failure))
    return preflight


def _first_objects(cfg) -> tuple[str, ...]:
    """One object of each input (probe.first_object), found by the driver."""
    found = []
    for uri in cfg.inputs:
        try:
            found.append(first_object(uri, cfg.storage_options))
        except FileNotFoundError:
            raise ConfigError(f"input not found: {uri}") from None
        except Exception as exc:
            listed = ProbeFailure("list", uri, cause_of(exc), f"{type(exc).__name__}: {exc}"[:300])
            raise TagpipeError(driver_text(listed)) from None
    return tuple(found)


def check_workers(preflight: Preflight) -> float:
    """One Ray task per node with CPUs (pinned: NodeAffinitySchedulingStrategy, soft=False;
    no CPU reserved, so a busy node answers at once) does the driver's check in that node's
    environment; the first node that fails stops the run. Seconds taken."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started = time.monotonic()
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_on_node)
    asked = {}
    for node in _nodes_with_cpus():
        pinned = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        where = node_name(node)
        reads, place = list(preflight.reads), preflight.probe(node["NodeID"][:12])
        asked[probe.options(scheduling_strategy=pinned).remote(reads, place, preflight.storage_options)] = (
            where
        )
    done, stuck = ray.wait(list(asked), num_returns=len(asked), timeout=NODE_ANSWER_SECONDS)
    if stuck:
        raise TagpipeError(
            f"the preflight's task on node {asked[stuck[0]]} did not finish in {NODE_ANSWER_SECONDS:.0f} s: "
            "is the node alive and its object store reachable? (--no-preflight skips the check)"
        )
    for ref in done:
        try:
            failure = ray.get(ref)
        except ray.exceptions.RayError as exc:
            first = (str(exc).strip().splitlines() or [""])[-1][:300]
            raise TagpipeError(
                f"workers on node {asked[ref]} cannot run tagpipe's preflight task: {first}"
            ) from None
        if failure is not None:
            raise TagpipeError(workers_text(asked[ref], failure))
    return time.monotonic() - started


def _probe_on_node(reads: list[str], probe: str, storage_options: dict) -> ProbeFailure | None:
    """The Ray task: probe_storage in the node's own environment."""
    return probe_storage(reads, probe, storage_options)


def _nodes_with_cpus() -> list[dict]:
    """The alive nodes that run storage work (decode, part writes: they take CPUs); every
    alive node where none has CPUs. A head with num-cpus 0 does none, so is not asked."""
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    working = [node for node in alive if node.get("Resources", {}).get("CPU", 0) > 0]
    return working or alive


def node_name(node: dict) -> str:
    """'10.0.3.7' and the node id's start (nodes on one machine share an IP)."""
    return f"{node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"


def driver_text(failure: ProbeFailure) -> str:
    return f"the driver cannot {failure.step} {failure.uri}: {_cause_text(failure, DRIVER)}"


def workers_text(where: str, failure: ProbeFailure) -> str:
    return f"workers on node {where} cannot {failure.step} {failure.uri}: {_cause_text(failure, WORKERS)}"


def _cause_text(failure: ProbeFailure, who: str) -> str:
    """Why, and what to do, as the driver or the workers see it (the workers are asked
    only after the driver passed, so their messages say the driver has access)."""
    protocol, _, rest = failure.uri.rpartition("://")
    store = f"{protocol}://{rest.split('/', 1)[0]}" if protocol else "the store"
    driver = who == DRIVER
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    where = f"{store} at {endpoint}" if driver else store  # the workers' endpoint may be another
    if failure.cause == CREDENTIALS:
        if driver:
            return (
                f"no credentials for {where} in the driver's environment: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance or IRSA role"
            )
        return (
            "no credentials in the workers' environment (the driver has them); start the Ray nodes with the "
            "same AWS_* variables or role, or pass them with --storage-options"
        )
    if failure.cause == DENIED:
        if driver:
            return (
                f"access denied to {where}: the credentials in the driver's environment may not "
                f"{failure.step} there"
            )
        return (
            f"access denied to {where} for the workers' credentials (the driver's may {failure.step} there); "
            "start the Ray nodes with the same role or AWS_* variables as the driver"
        )
    if failure.cause == BUCKET:
        return f"no such bucket: {where}, seen by {who} (check the name; tagpipe never creates buckets)"
    if failure.cause == ENDPOINT:
        return (
            f"cannot connect to the S3 endpoint {endpoint}: is it running, and is AWS_ENDPOINT_URL right?"
            if driver
            else "cannot connect to the S3 endpoint from the node (the driver can); set the same "
            "AWS_ENDPOINT_URL on every Ray node"
        )
    return failure.detail + ("" if driver else " (the driver could)")
