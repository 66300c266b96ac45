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
3. feeds them to the routing's router kind's collectors (``dume_dist.model.kinds``: Grams on
   `dense_model_for(backbone, own expert)`, token counts, ...), one per part;
4. one ``all_reduce(SUM)`` of the collectors' flat fp64 states, and the rows a collector keeps
   that do not add (held-out bigrams) gathered to every rank and merged; rank 0 returns the
   summed statistics as bytes: ``{"stats": fit, "holdout": {part: held-out}}``.

With ``world_size == 1`` there is no process group at all.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from dume_dist.distributed.jobs import StatsJob


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
        ``{"stats": bytes, "holdout": {part: bytes}}`` (``holdout`` empty unless the job asks)."""
        from dume_dist.model.backbone import Backbone
        from dume_dist.model.kinds import BackboneShape, stats_to_bytes
        from dume_dist.model.routing import resolve_routing

        spec = resolve_routing(job.routing)
        backbone = Backbone.load(Path(job.backbone_dir), verify=False)
        with self._group(rendezvous) as group:
            collectors, sampled_tokens = self._collect(job, spec, backbone)
            if group:
                self._reduce(collectors)
        if self.rank != 0:
            return None
        meta = dict(
            backbone_fingerprint=job.backbone_fingerprint,
            expert_fingerprint=job.expert_fingerprint,
        )
        extra = {"submission_id": job.submission_id, "workers": self.world_size}
        shape = BackboneShape.of_config(backbone.config)
        sampled = {"sampled_tokens": sampled_tokens} if sampled_tokens else {}
        out = {}
        for collector, held in zip(collectors, (False, True)):
            for key, stats in collector.result().items():
                stats = stats.with_meta(
                    **meta, extra={**extra, "split": "holdout"} if held else {**extra, **sampled}
                )
                if job.dp_clip is None and job.dp_count_cap is None:  # bounded: whole after noise
                    spec.router_kind.validate(stats, spec, shape)
                out[(held, float(key))] = stats_to_bytes(stats)
        holdout = {key: blob for (held, key), blob in out.items() if held}
        return {"stats": out[(False, 0.0)], "holdout": holdout}

    def _collect(self, job: StatsJob, spec, backbone) -> tuple[list, int]:
        """This rank's collectors (fit, then held-out when the job asks), fed its batches, and
        the tokens of the whole sample its expert writes (all ranks' batches; 0: none)."""
        from dume_dist.model.data import shard
        from dume_dist.model.experts import load_expert_spec
        from dume_dist.model.kinds import feed_sample

        held_out = bool(job.holdout_smoothings)
        expert = load_expert_spec(job.name, job.expert_dir)
        private = {"private": True} if job.private else {}  # kinds without DP never see it
        collectors = spec.router_kind.collectors(
            spec, backbone, expert, holdout=held_out, max_tokens_per_seq=job.max_tokens_per_seq,
            device=self.device(), clip=job.dp_clip, count_cap=job.dp_count_cap, **private,
        )  # fmt: skip
        parts, fit_tokens = self._my_batches(job, held_out)
        sample = spec.router_kind.sampled(
            spec, backbone, expert, real_tokens=fit_tokens,
            max_tokens_per_seq=job.max_tokens_per_seq, fingerprint=job.expert_fingerprint,
            device=self.device(), private=job.private,
        )  # fmt: skip
        # the sample's batches round-robin too: each batch is seeded by its index alone
        my_sample = shard(range(sample.num_batches), self.rank, self.world_size) if sample else []
        with self._lock:
            self._total = sum(int(m.sum()) for mine in parts for _, m in mine)
            self._total += sum(sample.tokens_of(b) for b in my_sample)
        for collector, mine_part in zip(collectors, parts):
            for ids_BT, mask_BT in self._counted(mine_part):
                collector.add(ids_BT, mask_BT)
        sampled = feed_sample(
            collectors[0], sample, progress=False, batches=my_sample, on_batch=self._count
        )  # fmt: skip
        return collectors, sampled

    def _reduce(self, collectors: list) -> None:
        """The group's sums (one all_reduce of every collector's flat fp64 state) and, on every
        rank, every rank's rows merged (sizes gathered first: the lists differ in length)."""
        import torch.distributed as dist

        device = self.device()
        flats = [c.flat() for c in collectors]
        summed = torch.cat([f.to(device, torch.float64) for f in flats])
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        for collector, part in zip(collectors, summed.cpu().split([f.numel() for f in flats])):
            collector.load_flat(part)
        for collector in collectors:
            rows = collector.rows()
            if rows is None:
                continue
            size = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
            sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
            dist.all_gather(sizes, size)
            longest = max(int(n) for n in sizes)
            if longest == 0:  # every rank knows: no rank found a row
                continue
            padded = torch.zeros(longest, rows.shape[1], dtype=torch.int64, device=device)
            padded[: rows.shape[0]] = rows.to(device)
            gathered = [torch.zeros_like(padded) for _ in range(self.world_size)]
            dist.all_gather(gathered, padded)
            collector.load_rows(torch.cat([g[: int(n)].cpu() for g, n in zip(gathered, sizes)]))

    def _my_batches(self, job: StatsJob, held_out: bool) -> list[list]:
        """This rank's share of the token batches of the node's fit documents and, with
        ``held_out``, of its held-out documents (the build's document split, ``split_holdout``):
        any number of workers sees exactly the batches one worker would; and the tokens all
        fit batches keep (what a sample's size follows)."""
        from dume_dist.model.build import split_holdout
        from dume_dist.model.data import keep_mask, load_domain_texts, shard, token_batches
        from dume_dist.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(job.backbone_dir)
        texts = load_domain_texts(job.domain, job.data)
        fit_texts, held_texts = split_holdout(texts, job.holdout_fraction, job.name)
        parts = [fit_texts] + ([held_texts] if held_out else [])
        batches = [
            list(token_batches(tokenizer, part, job.batch_size, job.seq_len,
                               job.max_tokens_per_seq, job.max_tokens))
            for part in parts
        ]  # fmt: skip
        fit_tokens = sum(int(keep_mask(m, job.max_tokens_per_seq).sum()) for _, m in batches[0])
        return [shard(b, self.rank, self.world_size) for b in batches], fit_tokens

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

    def _count(self, tokens: int) -> None:
        with self._lock:
            self._done += tokens

    def _counted(self, batches) -> Iterator:
        for ids_BT, mask_BT in batches:
            yield ids_BT, mask_BT
            self._count(int(mask_BT.sum()))
