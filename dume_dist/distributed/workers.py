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
   ``job.holdout_smoothings``;
4. one ``all_reduce(SUM)`` of the stacked fp64 Grams; rank 0 returns the summed statistics as
   bytes: ``{"stats": fit, "holdout": {β: held-out}}``.

``ngram`` routing needs no model: step 3 counts token ids with `collect_ngram_stats` (fit
counts, and held-out counts with their exact bigrams when the routing chooses ``mu`` on held-out
data; ``job.ngram_buckets`` buckets, the backbone's vocabulary); step 4 all_reduces the
stacked fp64 count vectors (integers: the sum is exact in any order) and gathers the held-out
bigram lists, of different lengths per rank, to rank 0, which merges them (`coalesce_pairs`).

With ``world_size == 1`` there is no process group at all.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from dume_dist.core.ngram import NgramStats, coalesce_pairs
from dume_dist.core.stats import RouterStats, stats_to_bytes
from dume_dist.distributed.jobs import StatsJob


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

    def compute(self, job: StatsJob, rendezvous: tuple[str, int] | None = None) -> dict | None:
        """Run the job (see `NodeAgent.job`); rank 0 returns the group's summed statistics
        ``{"stats": bytes, "holdout": {β: bytes}}`` (``holdout`` empty unless the job asks)."""
        if job.features == "ngram":
            return self._compute_ngram(job, rendezvous)
        with self._group(rendezvous) as group:
            partial = self._partial_grams(job)
            if group:
                import torch.distributed as dist

                grams = partial.to(self.device())
                dist.all_reduce(grams, op=dist.ReduceOp.SUM)
                partial = grams.cpu()
        if self.rank != 0:
            return None
        from dume_dist.model.routing import feature_map_name

        features = job.features
        meta = dict(
            backbone_fingerprint=job.backbone_fingerprint,
            expert_fingerprint=job.expert_fingerprint,
        )
        extra = {"submission_id": job.submission_id, "workers": self.world_size}
        stats = RouterStats(
            _symmetrised(partial[0]), feature_map=feature_map_name(features), **meta, extra=extra
        )
        stats.validate()
        holdout = {}
        for i, beta in enumerate(job.holdout_smoothings):
            held = RouterStats(
                _symmetrised(partial[1 + i]), feature_map=feature_map_name(features, beta),
                **meta, extra={**extra, "split": "holdout"},
            )  # fmt: skip
            held.validate()
            holdout[float(beta)] = stats_to_bytes(held)
        return {"stats": stats_to_bytes(stats), "holdout": holdout}

    def _compute_ngram(self, job: StatsJob, rendezvous: tuple[str, int] | None) -> dict | None:
        """`compute` for ``ngram`` routing: the group's summed token counts (see the module)."""
        with self._group(rendezvous) as group:
            counts, pairs = self._partial_counts(job)
            if group:
                counts, pairs = self._combine_counts(counts, pairs)
        if self.rank != 0:
            return None
        from dume_dist.model.routing import feature_map_name

        buckets = int(job.ngram_buckets)
        meta = dict(
            backbone_fingerprint=job.backbone_fingerprint,
            expert_fingerprint=job.expert_fingerprint,
        )
        extra = {"submission_id": job.submission_id, "workers": self.world_size}

        def stats_of(part, held: bool) -> NgramStats:
            vocab = (counts.shape[1] - buckets) // 2
            uni, ctx, big = part[:vocab], part[vocab : 2 * vocab], part[2 * vocab :]
            out = NgramStats(
                uni.clone(), ctx.clone(), big.clone(),
                feature_map=feature_map_name("ngram", buckets=buckets, heldout=held), **meta,
                extra={**extra, "split": "holdout"} if held else extra,
                pairs_K3=pairs if held else None,
            )  # fmt: skip
            if job.dp_count_cap is None:  # capped counts are made whole by the noise step
                out.validate(vocab_size=vocab, buckets=buckets)
            return out

        holdout = {}
        if counts.shape[0] > 1:
            (beta,) = job.holdout_smoothings
            holdout[float(beta)] = stats_to_bytes(stats_of(counts[1], True))
        return {"stats": stats_to_bytes(stats_of(counts[0], False)), "holdout": holdout}

    def _my_batches(self, job: StatsJob, held_out: bool) -> list[list]:
        """This rank's share of the token batches of the node's fit documents and, with
        ``held_out``, of its held-out documents (the build's document split, ``split_holdout``):
        any number of workers sees exactly the batches one worker would."""
        from transformers import AutoTokenizer

        from dume_dist.model.build import split_holdout
        from dume_dist.model.data import load_domain_texts, shard, token_batches

        tokenizer = AutoTokenizer.from_pretrained(job.backbone_dir)
        texts = load_domain_texts(job.domain, job.data)
        fit_texts, held_texts = split_holdout(texts, job.holdout_fraction, job.name)
        parts = [fit_texts] + ([held_texts] if held_out else [])
        return [
            shard(list(token_batches(tokenizer, part, job.batch_size, job.seq_len,
                                     job.max_tokens_per_seq, job.max_tokens)),
                  self.rank, self.world_size)
            for part in parts
        ]  # fmt: skip

    def _partial_counts(self, job: StatsJob) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[1 or 2, 2V + H]`` (fp64): this rank's fit counts, then (when the job asks for
        held-out statistics) its held-out counts, each ``[unigram_V, context_V, bigram_H]``
        (zeros for a part of which it has no batch); and its held-out bigrams ``[K, 3]``."""
        from dume_dist.model.collect import collect_ngram_stats
        from dume_dist.model.experts import load_config

        held_out = bool(job.holdout_smoothings)
        if held_out and [float(b) for b in job.holdout_smoothings] != [0.0]:
            raise ValueError("ngram routing takes held-out statistics for smoothing 0 only")
        buckets = int(job.ngram_buckets)
        vocab = int(load_config(Path(job.backbone_dir)).vocab_size)
        parts = self._my_batches(job, held_out)
        out = torch.zeros(len(parts), 2 * vocab + buckets, dtype=torch.float64)
        pairs = torch.zeros(0, 3, dtype=torch.int64) if held_out else None
        with self._lock:
            self._total = sum(int(m.sum()) for mine in parts for _, m in mine)
        for slot, mine in enumerate(parts):
            if not mine:  # more workers than batches: this rank adds nothing to this part
                continue
            counted = collect_ngram_stats(
                self._counted(mine), vocab_size=vocab, buckets=buckets,
                max_tokens_per_seq=job.max_tokens_per_seq, pairs=slot == 1, progress=False,
                count_cap=job.dp_count_cap,
            )  # fmt: skip
            out[slot] = torch.cat([counted.unigram_V, counted.context_V, counted.bigram_H])
            if slot == 1:
                pairs = counted.pairs_K3
        return out, pairs

    def _combine_counts(
        self, counts: torch.Tensor, pairs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The group's summed counts (all_reduce, fp64) and, on rank 0, every rank's held-out
        bigrams merged (sizes gathered first: the lists differ in length)."""
        import torch.distributed as dist

        device = self.device()
        summed = counts.to(device)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        counts = summed.cpu()
        if pairs is None:
            return counts, None
        size = torch.tensor([pairs.shape[0]], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = max(int(n) for n in sizes)
        if longest == 0:  # every rank knows: no rank found a held-out bigram
            return counts, pairs
        padded = torch.zeros(longest, 3, dtype=torch.int64, device=device)
        padded[: pairs.shape[0]] = pairs.to(device)
        gathered = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        merged = torch.cat([g[: int(n)].cpu() for g, n in zip(gathered, sizes)])
        return counts, coalesce_pairs(merged)

    @contextlib.contextmanager
    def _group(self, rendezvous: tuple[str, int] | None):
        """The process group of the job (none for one worker) and this worker's thread count;
        yields whether there is a group. Both are undone on the way out: an in-process worker
        must not change its host."""
        group = self.world_size > 1
        if group:
            self._init_group(rendezvous)
        threads_before = torch.get_num_threads()
        try:
            if self.threads:
                torch.set_num_threads(self.threads)
            yield group
        finally:
            torch.set_num_threads(threads_before)
            if group:
                import torch.distributed as dist

                dist.destroy_process_group()

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

    def _partial_grams(self, job: StatsJob) -> torch.Tensor:
        """``[1 + len(holdout_smoothings), L, P, P]``: this rank's fit Gram, then its held-out
        Gram of each decay (fp64; zeros for a part of which it has no batch)."""
        from dume_dist.model.backbone import Backbone
        from dume_dist.model.collect import (
            collect_smoothed_stats,
            dense_model_for,
            stats_compute_dtype,
        )
        from dume_dist.model.experts import load_expert_spec
        from dume_dist.model.modeling_dume import routing_feature_dim

        features = job.features
        smoothings = [float(b) for b in job.holdout_smoothings]
        backbone = Backbone.load(Path(job.backbone_dir), verify=False)
        spec = load_expert_spec(job.name, job.expert_dir)
        parts = list(zip(self._my_batches(job, bool(smoothings)), [(0.0,), tuple(smoothings)]))
        num_layers = backbone.config.num_hidden_layers
        size = routing_feature_dim(features, backbone.config.hidden_size) + 1
        out = torch.zeros(1 + len(smoothings), num_layers, size, size, dtype=torch.float64)
        with self._lock:
            self._total = sum(int(m.sum()) for mine, _ in parts for _, m in mine)
        if not any(mine for mine, _ in parts):  # more workers than batches: this rank adds nothing
            return out
        device = self.device()
        model = dense_model_for(
            backbone, spec, dtype=stats_compute_dtype(spec, device), device=device
        )
        slot = 0
        for mine, betas in parts:
            if mine:
                grams = collect_smoothed_stats(
                    model, self._counted(mine), max_tokens_per_seq=job.max_tokens_per_seq,
                    smoothings=betas, features=features, device=device, progress=False,
                    clip=job.dp_clip,
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
