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

from dume_dist.store.objectstore import absolute_url

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
            f"cannot reach a Ray cluster at {address!r}: {str(exc).splitlines()[0]}" + _auth_hint()
        ) from None


def _auth_hint() -> str:
    """What to try when the cluster may want a token this process did not send: `ray start`
    turns token authentication on by default, while a client sends a token only when
    $RAY_AUTH_MODE says so (Ray logs the refusal, the connection error does not say it)."""
    if os.environ.get("RAY_AUTH_MODE") == "token":
        return ""
    return (
        " (if the cluster uses token authentication, as `ray start` does by default, set "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, default "
        "~/.ray/auth_token)"
    )


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
    resources: dict | None = None,
):
    """The named detached coordinator actor (created, or found if it already runs).
    ``resources`` (e.g. ``{"dume_coordinator": 0.01}``) places it on a node that has them."""
    # Threads: a slow call (a credential check, a publish) does not hold up the others; registry
    # changes are serialised by the coordinator's own lock. Reads and operator calls have
    # threads of their own: wrong node secrets queued by the dozen (scrypt each) delay neither
    # `status` nor the operator.
    actor = ray.remote(max_concurrency=8, concurrency_groups={"reads": 2, "operator": 2})(
        coordinator_actor_class()
    ).options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
        resources=resources or {},
    )
    # A local store's path is the caller's: the actor runs in the cluster's working directory.
    handle = actor.remote(absolute_url(store_url), storage_options, work_dir)
    get(handle.ping.remote())
    get(handle.recover.remote())  # versions a crashed predecessor left unrecorded or unmarked
    return handle


READ_METHODS = ("status", "ping")
OPERATOR_METHODS = ("found", "add_node", "set_hold", "publish", "unlearn", "rebase",
                    "rotate_credential", "recover")  # fmt: skip


def coordinator_actor_class():
    """`Coordinator` with its methods placed in the actor's concurrency groups (the plain class
    stays free of Ray; tests drive it directly)."""
    from dume_dist.distributed.coordinator import Coordinator

    def in_group(group: str, fn):
        def method(self, *args, **kwargs):
            return fn(self, *args, **kwargs)

        # (not functools.wraps: with the base class's __qualname__ Ray ignores the group)
        method.__name__, method.__doc__ = fn.__name__, fn.__doc__
        return ray.method(concurrency_group=group)(method)

    methods = {n: in_group("reads", getattr(Coordinator, n)) for n in READ_METHODS}
    methods.update({n: in_group("operator", getattr(Coordinator, n)) for n in OPERATOR_METHODS})
    return type("CoordinatorActor", (Coordinator,), methods)


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
    from dume_dist.distributed.agent import NodeAgent

    actor = ray.remote(NodeAgent).options(
        scheduling_strategy=pinned(node_id or current_node_id()),
        num_cpus=0,
        max_concurrency=2,
        max_restarts=0,
    )
    return actor.remote(coordinator, name, domain, secret, cache_dir)


def remote_worker(node_id: str, backend: str):
    from dume_dist.distributed.workers import StatsWorker

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
    return run_joins({"join": (agent, join_kwargs)}, show_progress, poll_s)["join"]


def run_joins(jobs: dict, show_progress: bool = True, poll_s: float = 0.5) -> dict:
    """Run several ``{label: (agent, join kwargs)}`` joins at once, one progress bar each."""
    refs = {label: agent.join.remote(**kwargs) for label, (agent, kwargs) in jobs.items()}
    if show_progress:
        _show_progress(jobs, refs, poll_s)
    return {label: get(ref) for label, ref in refs.items()}


def _show_progress(jobs: dict, refs: dict, poll_s: float) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description:<32}"),
        BarColumn(),
        TextColumn("{task.fields[tokens]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        tasks = {label: bar.add_task(label, total=None, tokens="") for label in jobs}
        pending = dict(refs)
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=poll_s)
            for label in [lab for lab, ref in pending.items() if ref in ready]:
                bar.update(tasks[label], description=f"{label}: done")
                del pending[label]
            for label in pending:
                try:
                    p = get(jobs[label][0].progress.remote(), timeout=poll_s * 4)
                except Exception:
                    continue
                done, total = p["tokens_done"], p["tokens_total"]
                bar.update(tasks[label], description=f"{label}: {p['stage']}", completed=done,
                           total=total or None, tokens=f"{done:,}/{total:,} tokens" if total else "")  # fmt: skip


def wait_for(predicate, timeout_s: float = 30.0, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False


class _LocalInstance:
    """A Ray instance this process started (`start_local_instance`); `shutdown` stops it."""

    def __init__(self, tmp: str, saved: str | None):
        self._tmp, self._saved = tmp, saved

    def shutdown(self) -> None:
        import shutil

        try:
            ray.shutdown()
        finally:
            if self._saved is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = self._saved
            shutil.rmtree(self._tmp, ignore_errors=True)


def start_local_instance(namespace: str = NAMESPACE, num_cpus: int | None = None) -> _LocalInstance:
    """A new single-node Ray instance on this machine (its own GCS; token auth as the
    environment says, see `auth`), in a short fresh temp dir (socket paths are limited to 107
    bytes), connected to this process. A contributor's agent runs there in the federated
    deployment."""
    import tempfile

    tmp = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    os.makedirs(os.path.join(tmp, "ray"))
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    instance = _LocalInstance(tmp, saved)
    try:
        ray.init(address="local", namespace=namespace, num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")  # fmt: skip
    except BaseException:
        instance.shutdown()
        raise
    return instance


class LocalCluster:
    """A multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): a head and
    ``num_nodes`` nodes, node *i* carrying the custom resource ``dume_node_<i>``. Connects this
    process to it; `shutdown` stops exactly what it started. Ray's temp dir is a short fresh dir
    (socket paths are limited to 107 bytes) so nothing lands in the shared /tmp/ray. Token
    authentication follows the environment: see `dume_dist.distributed.auth`."""

    def __init__(self, num_nodes: int, cpus_per_node: int = 1, namespace: str = NAMESPACE):
        import tempfile

        from ray.cluster_utils import Cluster

        self._tmp = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
        os.makedirs(os.path.join(self._tmp, "ray"))
        self._saved_env = {"RAY_TMPDIR": os.environ.get("RAY_TMPDIR")}
        os.environ["RAY_TMPDIR"] = self._tmp
        head = {"num_cpus": 1, "include_dashboard": False, "resources": {"dume_coordinator": 1}}
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args=head)
        except BaseException:
            self._restore_env()
            raise
        self.cpus_per_node = cpus_per_node
        self.nodes = []
        for _ in range(num_nodes):
            self.add_node()
        ray.init(
            address=self.cluster.address,
            namespace=namespace,
            log_to_driver=False,
            logging_level="ERROR",
        )
        self.cluster.wait_for_nodes()

    @property
    def node_ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]

    def add_node(self) -> str:
        node = self.cluster.add_node(
            num_cpus=self.cpus_per_node, resources={f"dume_node_{len(self.nodes)}": 1}
        )
        self.nodes.append(node)
        return node.node_id

    def remove_node(self, node_id: str) -> None:
        node = next(n for n in self.nodes if n.node_id == node_id)
        self.cluster.remove_node(node)

    def shutdown(self) -> None:
        import shutil

        try:
            ray.shutdown()
            self.cluster.shutdown()
        finally:
            self._restore_env()
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
