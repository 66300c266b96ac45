"""The node agent: a contributor's side of a join (DESIGN §4).

A plain class; `dume_dist.distributed.cluster.launch_agent` runs it as a Ray actor pinned to the node
it is launched from (``NodeAffinitySchedulingStrategy(node_id, soft=False)``), so the data paths
it reads are that node's files. What leaves the node: the expert's MLP weights (once per expert)
and the summed statistics. Never the data.

Steps of `join` (each one thing, each safe to repeat):

``authenticate``  the coordinator checks the credential; returns the backbone record, settings
                  and the submission ids it already counted
``fetch_backbone`` backbone files into the node's cache (sha256 verified), once per fingerprint
``check_expert``  the expert fits the backbone (config, MLP shapes, tokenizer)
``upload_expert`` MLP weights as one safetensors blob (a no-op when already registered)
``compute``       one `StatsWorker` per local GPU (else one CPU worker); all_reduce; rank 0's sum:
                  fit statistics of the coordinator's router kind (Grams, token counts, ...)
                  and, when its routing chooses a setting on held-out data, held-out
                  statistics (same split as a build)
``submit``        with a submission id = hash(data files, expert, backbone, settings, routing's
                  statistics settings): a rerun after a crash is recognised and counted once

The agent talks to the coordinator through a *transport*: `ActorTransport` (the coordinator
actor's handle, inside one trust domain; or a plain `Coordinator` in tests) or
`dume_dist.distributed.client.HttpTransport` (the signed HTTP API, from the contributor's own Ray
cluster). Each transport counts the bytes it sent by kind (``sent``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from dume_dist.core.digest import file_sha256
from dume_dist.distributed.calls import call
from dume_dist.distributed.jobs import StatsJob

STAGES = (
    "authenticate",
    "fetch_backbone",
    "check_expert",
    "upload_expert",
    "compute",
    "submit",
    "done",
)


class ActorTransport:
    """The node's side of the coordinator in one trust domain: the coordinator actor's handle
    (or a plain `Coordinator` in tests) and the node's secret. `client.HttpTransport` is the
    other one: the same calls over the signed HTTP API."""

    kind = "ray"

    def __init__(self, coordinator, name: str, domain: str, secret: str):
        self.coordinator = coordinator
        self._who = (secret, name, domain)
        self.sent = {"expert": 0, "stats": 0, "holdout": 0}
        self.received = 0

    def node_info(self) -> dict:
        return call(self.coordinator, "node_info", *self._who)

    def download_backbone(self, record: dict, dest: Path) -> None:
        for rel, data in call(self.coordinator, "backbone_files", *self._who).items():
            write_checked(dest, rel, data, record)
            self.received += len(data)

    def register_expert(self, blob: bytes, fingerprint: str) -> dict:
        self.sent["expert"] += len(blob)
        return call(self.coordinator, "register_expert", *self._who, self._put(blob), fingerprint)

    def submit_stats(self, stats: bytes, submission_id: str, num_tokens: int, holdout: dict):
        self.sent["stats"] += len(stats)
        self.sent["holdout"] += sum(len(b) for b in holdout.values())
        args = [*self._who, self._put(stats), submission_id, num_tokens]
        if holdout:  # (a coordinator of the paper's routing is called as it always was)
            args.append(self._put(holdout))
        return call(self.coordinator, "submit_stats", *args)

    def leave(self) -> dict:
        return call(self.coordinator, "leave", *self._who)

    def settle(self) -> dict:
        return call(self.coordinator, "settle", *self._who)

    def _put(self, data):
        """Large payloads go to the coordinator actor as one object ref (stored once)."""
        if NodeAgent._in_ray() and hasattr(getattr(self.coordinator, "ping", None), "remote"):
            import ray

            return ray.put(data)
        return data


def write_checked(dest: Path, rel: str, data: bytes, record: dict) -> None:
    """One backbone file into ``dest``, refused unless the record lists it with this sha256."""
    want = record["files"].get(rel)
    if want is None or hashlib.sha256(data).hexdigest() != want["sha256"]:
        raise ValueError(f"backbone file {rel} from the coordinator fails its checksum")
    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
    (dest / rel).write_bytes(data)


def check_heldout_policy(job: StatsJob, send_heldout_bigrams: bool, dp: dict | None) -> None:
    """Held-out statistics that release more than sums (the n-gram kind's exact held-out
    bigrams, text fragments) leave the node only when the contributor says so, and never with
    differential privacy."""
    from dume_dist.model.routing import resolve_routing

    spec = resolve_routing(job.routing)
    release = spec.router_kind.heldout_release(spec)
    if release is None or not job.holdout_smoothings:
        return
    if dp is not None:
        raise ValueError(
            f"this coordinator chooses its routing on {release.split(' (')[0]}, which cannot be "
            "released with differential privacy: ask the operator for a fixed setting (--lam)"
        )
    if not send_heldout_bigrams:
        raise ValueError(
            f"this coordinator chooses its routing on {release}: pass --send-heldout-bigrams to "
            "send them, or ask the operator for routing that needs none (--mu-criterion "
            "likelihood, or a fixed --mu)"
        )


def _dp_job(backbone_dir: Path, spec, dp: dict) -> dict:
    """The collection bounds of ``dp`` for the workers (the router kind's: feature clip, count
    cap)."""
    from dume_dist.core.dp import DpSpec
    from dume_dist.model.backbone import Backbone

    backbone = Backbone.load(Path(backbone_dir), verify=False)
    clip, cap = spec.router_kind.dp_bounds(spec, backbone, DpSpec(**dp))
    return {"dp_clip": clip, "dp_count_cap": cap}


def submission_id(data_hashes: list[str], expert_fp: str, backbone_fp: str, settings: dict) -> str:
    """Names a contribution by what determines it: a rerun gets the same id."""
    blob = json.dumps([data_hashes, expert_fp, backbone_fp, settings], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def local_workers(requested: int | None, gpus: int) -> tuple[int, str]:
    """(number of workers, backend): one per GPU of the node with NCCL, else one CPU worker."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--workers must be >= 1, got {requested}")
        if gpus and requested > gpus:
            raise ValueError(f"--workers {requested} but this node has {gpus} GPUs")
        return requested, "nccl" if gpus else "gloo"
    return (gpus, "nccl") if gpus else (1, "gloo")


def node_gpus(node_id: str | None) -> int:
    """GPUs of a Ray node (from Ray's resources: an actor without GPUs sees none itself), or of
    this machine outside Ray."""
    if node_id is None:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    import ray

    for node in ray.nodes():
        if node["NodeID"] == node_id and node["Alive"]:
            return int(node["Resources"].get("GPU", 0))
    return 0


class NodeAgent:
    def __init__(
        self, coordinator, name: str, domain: str, secret: str | None, cache_dir: str | None = None
    ):
        """``coordinator``: a transport (`ActorTransport`, `client.HttpTransport`), or the
        coordinator actor's handle / a plain `Coordinator`, used with ``secret``."""
        if not hasattr(coordinator, "submit_stats") or not hasattr(coordinator, "kind"):
            coordinator = ActorTransport(coordinator, name, domain, secret)
        self.transport = coordinator
        self.name, self.domain = name, domain
        self.cache_dir = Path(cache_dir or os.path.join(tempfile.gettempdir(), "dume-node-cache"))
        self._lock = threading.Lock()
        self._stage = "idle"
        self._workers: list = []
        self._info: dict | None = None
        self.worker_nodes: list[str] = []  # where the last compute ran (tests check pinning)

    # -- observation ------------------------------------------------------------------------

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def progress(self) -> dict:
        """Current stage and statistics tokens done/total over all workers (polled by the CLI)."""
        with self._lock:
            stage, workers = self._stage, list(self._workers)
        done = total = 0
        if workers:
            import ray

            for d, t in ray.get([w.progress.remote() for w in workers]):
                done, total = done + d, total + t
        return {"stage": stage, "tokens_done": done, "tokens_total": total}

    def _enter(self, stage: str) -> None:
        with self._lock:
            self._stage = stage

    # -- steps ------------------------------------------------------------------------------

    def authenticate(self) -> dict:
        self._enter("authenticate")
        self._info = self.transport.node_info()
        return self._info

    def fetch_backbone(self) -> Path:
        """The backbone directory in the node's cache; downloaded once, checksums verified."""
        self._enter("fetch_backbone")
        record = self._info["backbone"]
        local = self.cache_dir / "backbones" / record["fingerprint"]
        if local.is_dir():
            return local
        tmp = local.with_name(f".tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            self.transport.download_backbone(record, tmp)
            os.rename(tmp, local)
        except FileExistsError:
            pass  # another agent on this node got there first
        except OSError as exc:
            if not local.is_dir():
                raise ValueError(f"cannot cache the backbone in {local}: {exc}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return local

    def check_expert(self, expert_dir: str, data: list[str] | None = None):
        """Load the expert, check it fits the backbone and tokenizes like it (on sample text and
        the head of ``data``); returns (spec, fingerprint)."""
        from dume_dist.distributed.artifacts import check_expert_fits
        from dume_dist.model.data import load_domain_texts
        from dume_dist.model.experts import expert_fingerprint, load_expert_spec
        from dume_dist.model.tokenizer import check_expert_tokenizer

        self._enter("check_expert")
        spec = load_expert_spec(self.name, expert_dir)
        check_expert_fits(spec, self._info["backbone"])
        backbone_dir = self.cache_dir / "backbones" / self._info["backbone"]["fingerprint"]
        if backbone_dir.is_dir():
            texts = load_domain_texts(self.domain, data) if data else []
            check_expert_tokenizer(backbone_dir, spec.path, texts)
        return spec, expert_fingerprint(spec)

    def upload_expert(self, spec, fingerprint: str, blob: bytes | None = None) -> dict:
        from dume_dist.distributed.artifacts import mlp_blob

        self._enter("upload_expert")
        registered = self._info.get("expert")
        if registered is not None and registered["fingerprint"] == fingerprint:
            return {"expert": registered, "changed": False}
        blob = mlp_blob(spec) if blob is None else blob
        result = self.transport.register_expert(blob, fingerprint)
        self._info["submissions"] = [] if result["changed"] else self._info["submissions"]
        return result

    def job(
        self,
        backbone_dir: Path,
        expert_dir: str,
        fingerprint: str,
        data: list[str],
        opts: dict,
        dp: dict | None = None,
    ) -> StatsJob:
        from dume_dist.distributed.artifacts import routing_of

        settings = self._info["settings"]
        max_tps = settings["max_tokens_per_seq"]
        spec = routing_of(settings)
        stats_settings = {
            "batch_size": opts.get("batch_size", 8),
            "seq_len": opts.get("seq_len") or max_tps,
            "max_tokens_per_seq": max_tps,
            "max_tokens": opts.get("max_tokens"),
        }
        # What the statistics depend on is part of the submission id; the paper's token
        # statistics without a held-out part keep the ids they had before routing options.
        own = spec.router_kind.statistics_settings(spec)
        routing = {
            **(own or {}),
            "holdout_fraction": spec.holdout_fraction if spec.needs_holdout else 0.0,
            "holdout_smoothings": list(spec.holdout_smoothings()),
        }
        id_settings = dict(stats_settings)
        if own is not None or spec.needs_holdout:
            id_settings["routing"] = routing
        if dp is not None:  # private statistics: features clipped, counts capped while collected
            id_settings["dp"] = dp
            routing.update(_dp_job(backbone_dir, spec, dp))
        for path in data:
            if not Path(path).is_file():
                raise ValueError(f"data file {path} does not exist on node {self.name}")
        if dp is None:  # the expert can write the sample the routing asks for (before any work)
            from dume_dist.model.experts import load_expert_spec

            spec.router_kind.check_sampling(spec, load_expert_spec(self.name, expert_dir))
        hashes = [file_sha256(p) for p in data]
        backbone_fp = self._info["backbone"]["fingerprint"]
        return StatsJob(
            name=self.name,
            domain=self.domain,
            backbone_dir=str(backbone_dir),
            expert_dir=str(expert_dir),
            data=[str(p) for p in data],
            backbone_fingerprint=backbone_fp,
            expert_fingerprint=fingerprint,
            submission_id=submission_id(hashes, fingerprint, backbone_fp, id_settings),
            **stats_settings,
            holdout_fraction=routing["holdout_fraction"],
            holdout_smoothings=routing["holdout_smoothings"],
            dp_clip=routing.get("dp_clip"),
            dp_count_cap=routing.get("dp_count_cap"),
            private=dp is not None,
            routing=spec.to_json(),
            statistics=own or {},
        )

    def compute(
        self, job: StatsJob, workers: int | None = None, threads: int | None = None
    ) -> dict:
        """Summed statistics of the node's data from its worker group:
        ``{"stats": fit bytes, "holdout": {β: held-out bytes}}``."""
        self._enter("compute")
        num, backend = local_workers(workers, node_gpus(self.node_id() if self._in_ray() else None))
        if not self._in_ray():
            from dume_dist.distributed.workers import StatsWorker

            if num != 1:
                raise ValueError("more than one worker needs Ray")
            return StatsWorker(0, 1, backend, threads).compute(job)
        return self._compute_in_ray(job, num, backend, threads)

    def _compute_in_ray(self, job: StatsJob, num: int, backend: str, threads: int | None) -> dict:
        import ray

        from dume_dist.distributed.cluster import get, remote_worker

        node = self.node_id()
        workers = [
            remote_worker(node, backend).remote(r, num, backend, threads) for r in range(num)
        ]
        with self._lock:
            self._workers = workers
        try:
            self.worker_nodes = get([w.node_id.remote() for w in workers])
            rendezvous = get(workers[0].open_rendezvous.remote()) if num > 1 else None
            results = get([w.compute.remote(job, rendezvous) for w in workers])
            return results[0]
        finally:
            with self._lock:
                self._workers = []
            for w in workers:
                ray.kill(w)

    def submit(self, job: StatsJob, computed: dict) -> dict:
        """Push ``compute``'s statistics (fit, and held-out when the routing needs them)."""
        from dume_dist.model.kinds import stats_from_bytes

        self._enter("submit")
        stats, holdout = computed["stats"], computed.get("holdout") or {}
        num_tokens = stats_from_bytes(stats).num_tokens
        return self.transport.submit_stats(stats, job.submission_id, num_tokens, holdout)

    # -- the whole join ---------------------------------------------------------------------

    def join(
        self,
        expert_dir: str,
        data: list[str],
        workers: int | None = None,
        max_tokens: int | None = None,
        batch_size: int = 8,
        seq_len: int | None = None,
        threads: int | None = None,
        crash_after: str | None = None,
        dp: dict | None = None,
        send_heldout_bigrams: bool = False,
        dry_run: bool = False,
    ) -> dict:
        """Every step of a join; ``crash_after`` (tests) kills the process after that step.

        Nothing leaves the node before the statistics are computed (and made private with ``dp``,
        a ``core.dp.DpSpec`` as a dict): ``outbound`` of the result lists what is sent, by kind
        and bytes. With ``dry_run`` the join stops there and keeps what it computed;
        `send_prepared` then sends exactly that."""
        t0 = time.perf_counter()
        seconds = {}
        self.authenticate()
        backbone_dir = self.fetch_backbone()
        spec, fingerprint = self.check_expert(expert_dir, data)
        opts = {"max_tokens": max_tokens, "batch_size": batch_size, "seq_len": seq_len}
        job = self.job(backbone_dir, expert_dir, fingerprint, list(data), opts, dp)
        check_heldout_policy(job, send_heldout_bigrams, dp)
        seconds["prepare"] = time.perf_counter() - t0
        computed = None
        if job.submission_id not in self._info["submissions"]:
            t1 = time.perf_counter()
            computed = self._private(job, self.compute(job, workers, threads), dp)
            seconds["compute"] = time.perf_counter() - t1
            self._maybe_crash(crash_after, "compute")
        prepared = dict(spec=spec, fingerprint=fingerprint, job=job, computed=computed,
                        seconds=seconds, crash_after=crash_after,
                        expert_blob=self._expert_blob(spec, fingerprint))  # fmt: skip
        if dry_run:
            self._prepared = prepared
            self._enter("prepared")
            return {"status": "dry-run", "node": self.name, "submission_id": job.submission_id,
                    "outbound": self.outbound(spec, fingerprint, computed,
                                              prepared["expert_blob"])}  # fmt: skip
        return self._send(prepared)

    def _expert_blob(self, spec, fingerprint: str) -> bytes | None:
        """The MLP blob the join will upload (None when the expert is registered): shown by
        its exact size before it is sent, and sent as shown."""
        from dume_dist.distributed.artifacts import mlp_blob

        if (self._info.get("expert") or {}).get("fingerprint") == fingerprint:
            return None
        return mlp_blob(spec)

    def send_prepared(self) -> dict:
        """Send what the last ``join(dry_run=True)`` computed (and showed)."""
        prepared, self._prepared = getattr(self, "_prepared", None), None
        if prepared is None:
            raise ValueError("nothing prepared to send: run the join first")
        return self._send(prepared)

    def outbound(self, spec, fingerprint: str, computed: dict | None,
                 expert_blob: bytes | None = None) -> list[dict]:  # fmt: skip
        """What leaves the node, by kind and bytes (the expert only when not yet registered:
        its safetensors blob, header included, as `upload_expert` sends it)."""
        from dume_dist.model.kinds import stats_from_bytes

        out = []
        registered = (self._info.get("expert") or {}).get("fingerprint") == fingerprint
        if not registered:
            blob = expert_blob if expert_blob is not None else self._expert_blob(spec, fingerprint)
            out.append({"what": "expert MLP weights", "kind": "weights", "bytes": len(blob)})
        if computed is None:
            return out
        stats = stats_from_bytes(computed["stats"])
        private = " (differentially private)" if "dp" in stats.extra else ""
        sampled = stats.extra.get("sampled_tokens", 0)
        sampled = f" incl. counts of {sampled:,} tokens your expert wrote" if sampled else ""
        out.append({"what": f"fit statistics{sampled}{private}", "kind": stats.feature_map,
                    "bytes": len(computed["stats"]), "tokens": stats.num_tokens})  # fmt: skip
        for _, blob in sorted((computed.get("holdout") or {}).items()):
            held = stats_from_bytes(blob)
            what = "held-out statistics"
            if getattr(held, "curve_M", None) is not None:
                what += f" incl. a held-out log-likelihood curve ({len(held.curve_M)} values of mu)"
            if getattr(held, "pairs_K3", None) is not None:
                what += f" incl. {len(held.pairs_K3):,} exact held-out bigrams (prev, next, count)"
            out.append({"what": what + private, "kind": held.feature_map, "bytes": len(blob)})
        return out

    def _private(self, job: StatsJob, computed: dict, dp: dict | None) -> dict:
        """``computed`` made differentially private (rank 0's sum, before anything is sent)."""
        if dp is None:
            return computed
        from dume_dist.core.dp import DpSpec
        from dume_dist.core.private import privatize
        from dume_dist.model.kinds import stats_from_bytes, stats_to_bytes
        from dume_dist.model.routing import resolve_routing

        fit = stats_from_bytes(computed["stats"])
        held = {float(b): stats_from_bytes(x) for b, x in (computed.get("holdout") or {}).items()}
        spec = resolve_routing(job.routing)
        fit, held, _ = privatize(
            fit, held, DpSpec(**dp), clip=job.dp_clip,
            tokens_per_unit=min(job.seq_len, job.max_tokens_per_seq),
            **spec.router_kind.dp_mechanism_options(spec),
        )  # fmt: skip
        return {"stats": stats_to_bytes(fit),
                "holdout": {b: stats_to_bytes(h) for b, h in held.items()}}  # fmt: skip

    def _send(self, prepared: dict) -> dict:
        spec, fingerprint, job = prepared["spec"], prepared["fingerprint"], prepared["job"]
        computed, seconds, crash_after = (
            prepared["computed"],
            prepared["seconds"],
            prepared["crash_after"],
        )
        blob = prepared.get("expert_blob")
        outbound = self.outbound(spec, fingerprint, computed, blob)
        uploaded = self.upload_expert(spec, fingerprint, blob)
        self._maybe_crash(crash_after, "upload_expert")
        if computed is None:
            # Counted before, but perhaps never published (the publish after it failed): ask
            # the coordinator to publish what is pending rather than report the old version.
            settled = self.transport.settle()
            result = {"status": "duplicate", "version": settled["version"], "skipped_compute": True}
        else:
            t2 = time.perf_counter()
            result = self.submit(job, computed)
            seconds["submit"] = time.perf_counter() - t2
            result["stats_bytes"] = len(computed["stats"])
            result["holdout_bytes"] = sum(len(b) for b in computed["holdout"].values())
            self._maybe_crash(crash_after, "submit")
        self._enter("done")
        result.update(
            node=self.name,
            expert_fingerprint=fingerprint,
            expert_uploaded=uploaded["changed"],
            expert_bytes=uploaded["expert"]["size"],
            worker_nodes=self.worker_nodes,
            submission_id=job.submission_id,
            seconds=seconds,
            sent_bytes=dict(self.transport.sent),
            outbound=outbound,
            received_bytes=self.transport.received,
        )
        return result

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _in_ray() -> bool:
        try:
            import ray

            return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        except Exception:
            return False

    @staticmethod
    def _maybe_crash(crash_after: str | None, step: str) -> None:
        if crash_after == step:
            os._exit(17)  # simulate a node dying mid-join (tests)
