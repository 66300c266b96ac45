"""Ray glue: connecting, launching the coordinator, node agents and workers as actors.

Only Ray's public API. The plain classes (`Coordinator`, `NodeAgent`, `StatsWorker`) are wrapped
with ``ray.remote`` here, where they are launched:

* the coordinator is a **named, detached** actor in a namespace (``get_if_exists`` so a second
  ``start`` finds the first; ``max_restarts=-1`` so Ray brings it back after a crash, and
  ``max_task_retries=-1`` so the call in flight is replayed — its methods are idempotent);
* a node agent is pinned to one node (``NodeAffinitySchedulingStrategy(node_id, soft=False)``),
  by default the node of the process that launches it; it is a threaded actor (2 threads) so
  the client can poll its progress while it works;
* its workers are pinned to the same node, one GPU each when there are GPUs.

`get` unwraps Ray's task errors into the original exception, so the CLI prints the one-line
message of a `ValueError`/`PermissionError`/`StoreError` raised inside an actor.
"""

from __future__ import annotations

import os
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

NAMESPACE = "dume"
COORDINATOR_NAME = "dume-coordinator"


def connect(address: str | None = None, namespace: str = NAMESPACE) -> None:
    """Attach to a running Ray cluster (``address`` or $RAY_ADDRESS, else "auto")."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as exc:
        raise ValueError(
            f"cannot reach a Ray cluster at {address!r}: {str(exc).splitlines()[0]}"
        ) from None


def get(refs, timeout: float | None = None):
    """``ray.get`` that re-raises the exception raised inside the task, not Ray's wrapper."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else None
        if cause is not None:
            raise cause from None
        raise
    except ray.exceptions.RayActorError as exc:
        raise RuntimeError(f"actor died: {str(exc).strip().splitlines()[0]}") from None


# -- coordinator ----------------------------------------------------------------------------------


def start_coordinator(
    store_url: str,
    storage_options: dict | None = None,
    *,
    name: str = COORDINATOR_NAME,
    namespace: str = NAMESPACE,
    work_dir: str | None = None,
):
    """The named detached coordinator actor (created, or found if it already runs)."""
    from dume_dist.dist.coordinator import Coordinator

    actor = ray.remote(Coordinator).options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
    )
    handle = actor.remote(store_url, storage_options, work_dir)
    get(handle.ping.remote())
    return handle


def get_coordinator(name: str = COORDINATOR_NAME, namespace: str = NAMESPACE):
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise ValueError(
            f"no coordinator {name!r} in Ray namespace {namespace!r}: start one with `dume coordinator start`"
        ) from None


def stop_coordinator(name: str = COORDINATOR_NAME, namespace: str = NAMESPACE) -> bool:
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True


# -- node agents and workers ----------------------------------------------------------------------


def current_node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def pinned(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def launch_agent(coordinator, name: str, domain: str, secret: str, *, node_id: str | None = None,
                 cache_dir: str | None = None):  # fmt: skip
    """A node agent pinned to ``node_id`` (default: the node this process runs on)."""
    from dume_dist.dist.agent import NodeAgent

    actor = ray.remote(NodeAgent).options(
        scheduling_strategy=pinned(node_id or current_node_id()),
        num_cpus=0,
        max_concurrency=2,
        max_restarts=0,
    )
    return actor.remote(coordinator, name, domain, secret, cache_dir)


def remote_worker(node_id: str, backend: str):
    from dume_dist.dist.workers import StatsWorker

    gpu = backend == "nccl"
    return ray.remote(StatsWorker).options(
        scheduling_strategy=pinned(node_id),
        num_cpus=1,
        num_gpus=1 if gpu else 0,
        max_concurrency=2,
        max_restarts=0,
    )


def run_join(agent, join_kwargs: dict, show_progress: bool = True, poll_s: float = 0.5) -> dict:
    """Run ``agent.join`` and show its stage and statistics progress on this terminal."""
    ref = agent.join.remote(**join_kwargs)
    if not show_progress:
        return get(ref)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} tok"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("join", total=None)
        while True:
            ready, _ = ray.wait([ref], timeout=poll_s)
            if ready:
                break
            try:
                p = get(agent.progress.remote(), timeout=poll_s * 4)
            except Exception:
                continue
            bar.update(task, description=f"{join_kwargs.get('name', '')}{p['stage']}",
                       completed=p["tokens_done"], total=p["tokens_total"] or None)  # fmt: skip
    return get(ref)


def wait_for(predicate, timeout_s: float = 30.0, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False
