"""Statistics workers of one node agent: one per local GPU (NCCL), or one CPU worker (gloo).

A plain class; the agent launches it with ``ray.remote`` pinned to its own node. The group
rendezvouses through a ``torch.distributed.TCPStore`` that rank 0 opens on port 0 (no free-port
race; the port reaches the others through Ray), then every rank:

1. splits the node's documents into a fit part and, when the coordinator's routing chooses a
   setting on held-out statistics, a held-out part (`model.build.split_holdout`, the same hash
   split as a single-machine build);
2. builds the same token batches of each part from the node's local data (deterministic) and
   takes its round-robin share of the *batches* (`data.shard`), so any number of workers sees
   exactly the batches one worker would;
3. collects partial statistics of the routing's features with `collect_smoothed_stats` on
   `dense_model_for(backbone, own expert)`: the fit Gram and one held-out Gram per decay of
   ``job["holdout_smoothings"]``;
4. one ``all_reduce(SUM)`` of the stacked fp64 Grams; rank 0 returns the summed statistics as
   bytes: ``{"stats": fit, "holdout": {β: held-out}}``.

With ``world_size == 1`` there is no process group at all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from dume_dist.core.stats import RouterStats, stats_to_bytes


def _symmetrised(gram_LPP: torch.Tensor) -> torch.Tensor:
    return torch.triu(gram_LPP) + torch.triu(gram_LPP, diagonal=1).transpose(1, 2)


class StatsWorker:
    """Rank ``rank`` of ``world_size``; ``backend`` is "gloo" or "nccl"."""

    def __init__(
        self, rank: int, world_size: int, backend: str = "gloo", threads: int | None = None
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self._store = None
        self._lock = threading.Lock()
        self._done, self._total = 0, 0
        self.threads = threads

    def open_rendezvous(self) -> tuple[str, int]:
        """Rank 0 only: listen on an ephemeral port; returns (host, port) for the other ranks."""
        import torch.distributed as dist

        assert self.rank == 0, "only rank 0 opens the rendezvous"
        try:
            import ray

            host = ray.util.get_node_ip_address()
        except Exception:  # not in Ray (a test drives the class directly)
            host = "127.0.0.1"
        self._store = dist.TCPStore(host, 0, self.world_size, True, wait_for_workers=False)
        return host, self._store.port

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def progress(self) -> tuple[int, int]:
        with self._lock:
            return self._done, self._total

    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.backend == "nccl" else torch.device("cpu")

    def compute(self, job: dict, rendezvous: tuple[str, int] | None = None) -> dict | None:
        """Run the job (see `NodeAgent.job`); rank 0 returns the group's summed statistics
        ``{"stats": bytes, "holdout": {β: bytes}}`` (``holdout`` empty unless the job asks)."""
        group = self.world_size > 1
        if group:
            self._init_group(rendezvous)
        threads_before = torch.get_num_threads()
        try:
            if self.threads:  # restored below: an in-process worker must not change its host
                torch.set_num_threads(self.threads)
            partial = self._partial_grams(job)
            if group:
                import torch.distributed as dist

                grams = partial.to(self.device())
                dist.all_reduce(grams, op=dist.ReduceOp.SUM)
                partial = grams.cpu()
        finally:
            torch.set_num_threads(threads_before)
            if group:
                import torch.distributed as dist

                dist.destroy_process_group()
        if self.rank != 0:
            return None
        from dume_dist.model.routing import feature_map_name

        features = job.get("features", "token")
        meta = dict(
            backbone_fingerprint=job["backbone_fingerprint"],
            expert_fingerprint=job["expert_fingerprint"],
        )
        extra = {"submission_id": job["submission_id"], "workers": self.world_size}
        stats = RouterStats(
            _symmetrised(partial[0]), feature_map=feature_map_name(features), **meta, extra=extra
        )
        stats.validate()
        holdout = {}
        for i, beta in enumerate(job.get("holdout_smoothings", ())):
            held = RouterStats(
                _symmetrised(partial[1 + i]), feature_map=feature_map_name(features, beta),
                **meta, extra={**extra, "split": "holdout"},
            )  # fmt: skip
            held.validate()
            holdout[float(beta)] = stats_to_bytes(held)
        return {"stats": stats_to_bytes(stats), "holdout": holdout}

    def _init_group(self, rendezvous: tuple[str, int] | None) -> None:
        import torch.distributed as dist

        if self.rank == 0:
            assert self._store is not None, "open_rendezvous() first"
            store = self._store
        else:
            host, port = rendezvous
            store = dist.TCPStore(host, port, self.world_size, False)
        dist.init_process_group(
            self.backend, store=store, rank=self.rank, world_size=self.world_size
        )

    def _partial_grams(self, job: dict) -> torch.Tensor:
        """``[1 + len(holdout_smoothings), L, P, P]``: this rank's fit Gram, then its held-out
        Gram of each decay (fp64; zeros for a part of which it has no batch)."""
        from transformers import AutoTokenizer

        from dume_dist.model.backbone import Backbone
        from dume_dist.model.build import split_holdout
        from dume_dist.model.collect import collect_smoothed_stats, dense_model_for
        from dume_dist.model.data import load_domain_texts, shard, token_batches
        from dume_dist.model.experts import load_expert_spec
        from dume_dist.model.modeling_dume import routing_feature_dim

        features = job.get("features", "token")
        smoothings = [float(b) for b in job.get("holdout_smoothings", ())]
        backbone = Backbone.load(Path(job["backbone_dir"]), verify=False)
        spec = load_expert_spec(job["name"], job["expert_dir"])
        tokenizer = AutoTokenizer.from_pretrained(job["backbone_dir"])
        texts = load_domain_texts(job["domain"], job["data"])
        fit_texts, held_texts = split_holdout(texts, job.get("holdout_fraction", 0.0), job["name"])

        def my_batches(part):
            batches = list(token_batches(tokenizer, part, job["batch_size"], job["seq_len"],
                                         job["max_tokens_per_seq"], job["max_tokens"]))  # fmt: skip
            return shard(batches, self.rank, self.world_size)

        parts = [(my_batches(fit_texts), (0.0,))]
        if smoothings:
            parts.append((my_batches(held_texts), tuple(smoothings)))
        num_layers = backbone.config.num_hidden_layers
        size = routing_feature_dim(features, backbone.config.hidden_size) + 1
        out = torch.zeros(1 + len(smoothings), num_layers, size, size, dtype=torch.float64)
        with self._lock:
            self._total = sum(int(m.sum()) for mine, _ in parts for _, m in mine)
        if not any(mine for mine, _ in parts):  # more workers than batches: this rank adds nothing
            return out
        device = self.device()
        model = dense_model_for(backbone, spec, dtype=torch.float32, device=device)
        slot = 0
        for mine, betas in parts:
            if mine:
                grams = collect_smoothed_stats(
                    model, self._counted(mine), max_tokens_per_seq=job["max_tokens_per_seq"],
                    smoothings=betas, features=features, device=device, progress=False,
                )  # fmt: skip
                for i, beta in enumerate(betas):
                    out[slot + i] = grams[beta].gram_LPP.cpu()
            slot += len(betas)
        return out

    def _counted(self, batches) -> Iterator:
        for ids_BT, mask_BT in batches:
            yield ids_BT, mask_BT
            with self._lock:
                self._done += int(mask_BT.sum())
