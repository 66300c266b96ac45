"""Statistics workers of one node agent: one per local GPU (NCCL), or one CPU worker (gloo).

A plain class; the agent launches it with ``ray.remote`` pinned to its own node. The group
rendezvouses through a ``torch.distributed.TCPStore`` that rank 0 opens on port 0 (no free-port
race; the port reaches the others through Ray), then every rank:

1. builds the same token batches from the node's local data (deterministic) and takes its
   round-robin share of the *batches* (`data.shard`), so any number of workers sees exactly the
   batches one worker would;
2. collects partial statistics with `collect_stats` on `dense_model_for(backbone, own expert)`;
3. ``all_reduce(SUM)`` of the fp64 Gram; rank 0 returns the summed statistics as bytes.

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

    def compute(self, job: dict, rendezvous: tuple[str, int] | None = None) -> bytes | None:
        """Run the job (see `NodeAgent.job`); rank 0 returns the group's summed statistics."""
        group = self.world_size > 1
        if group:
            self._init_group(rendezvous)
        threads_before = torch.get_num_threads()
        try:
            if self.threads:  # restored below: an in-process worker must not change its host
                torch.set_num_threads(self.threads)
            partial = self._partial_gram(job)
            if group:
                import torch.distributed as dist

                gram = partial.to(self.device())
                dist.all_reduce(gram, op=dist.ReduceOp.SUM)
                partial = gram.cpu()
        finally:
            torch.set_num_threads(threads_before)
            if group:
                import torch.distributed as dist

                dist.destroy_process_group()
        if self.rank != 0:
            return None
        stats = RouterStats(
            _symmetrised(partial),
            feature_map="token",
            backbone_fingerprint=job["backbone_fingerprint"],
            expert_fingerprint=job["expert_fingerprint"],
            extra={"submission_id": job["submission_id"], "workers": self.world_size},
        )
        stats.validate()
        return stats_to_bytes(stats)

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

    def _partial_gram(self, job: dict) -> torch.Tensor:
        from transformers import AutoTokenizer

        from dume_dist.model.backbone import Backbone
        from dume_dist.model.collect import collect_stats, dense_model_for
        from dume_dist.model.data import load_domain_texts, shard, token_batches
        from dume_dist.model.experts import load_expert_spec

        backbone = Backbone.load(Path(job["backbone_dir"]), verify=False)
        spec = load_expert_spec(job["name"], job["expert_dir"])
        tokenizer = AutoTokenizer.from_pretrained(job["backbone_dir"])
        texts = load_domain_texts(job["domain"], job["data"])
        batches = list(
            token_batches(
                tokenizer,
                texts,
                job["batch_size"],
                job["seq_len"],
                job["max_tokens_per_seq"],
                job["max_tokens"],
            )
        )
        mine = shard(batches, self.rank, self.world_size)
        num_layers, dim = backbone.config.num_hidden_layers, backbone.config.hidden_size
        with self._lock:
            self._total = sum(int(m.sum()) for _, m in mine)
        if not mine:  # more workers than batches: this rank adds nothing
            return torch.zeros(num_layers, dim + 1, dim + 1, dtype=torch.float64)
        device = self.device()
        model = dense_model_for(backbone, spec, dtype=torch.float32, device=device)
        stats = collect_stats(
            model,
            self._counted(mine),
            max_tokens_per_seq=job["max_tokens_per_seq"],
            device=device,
            progress=False,
        )
        return stats.gram_LPP

    def _counted(self, batches) -> Iterator:
        for ids_BT, mask_BT in batches:
            yield ids_BT, mask_BT
            with self._lock:
                self._done += int(mask_BT.sum())
