"""A toy router kind defined outside the package, on the ``dume_dist.model.kinds`` interface:
``hashvote`` routes every token by a fixed hash of its own id.

Statistics: each contributor's token counts per hash bucket (``HashCounts``, additive, exact in
fp64). Solve: per expert, ``log((c_jb + prior) / (N_j + prior * B))`` over buckets ``b``, the
counts summed in canonical order. Inference: ``toy_kind_remote.HashVoteInference``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import torch
from safetensors.torch import save as st_save
from toy_kind_remote import HashVoteInference, bucket_of

from dume_dist.model.data import keep_mask
from dume_dist.model.kinds import Collector, RouterKind, register_kind
from dume_dist.model.routing import SolvedRouting
from dume_dist.model.routing_options import Option

SCHEMA = "toy-hashvote-stats/1"


@dataclass(frozen=True)
class HashCounts:
    counts_B: torch.Tensor
    feature_map: str = ""
    backbone_fingerprint: str = ""
    expert_fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.counts_B.sum())

    def _combined(self, other, sign):
        if not isinstance(other, HashCounts) or other.feature_map != self.feature_map:
            raise ValueError("cannot combine statistics of different feature maps")
        return HashCounts(self.counts_B + sign * other.counts_B, self.feature_map,
                          self.backbone_fingerprint or other.backbone_fingerprint)  # fmt: skip

    def __add__(self, other):
        return self._combined(other, 1)

    def __sub__(self, other):
        return self._combined(other, -1)

    def with_meta(self, **kwargs):
        return replace(self, **kwargs)


class HashCollector(Collector):
    def __init__(self, buckets: int, max_tokens_per_seq: int, identity: str):
        self.counts = torch.zeros(buckets, dtype=torch.float64)
        self.max_tokens_per_seq, self.identity = max_tokens_per_seq, identity

    def add(self, ids_BT, mask_BT):
        ids = ids_BT[keep_mask(mask_BT, self.max_tokens_per_seq)]
        self.counts += torch.bincount(bucket_of(ids, len(self.counts)), minlength=len(self.counts))

    def flat(self):
        return self.counts

    def load_flat(self, flat):
        self.counts = flat.double().cpu().clone()

    def result(self):
        return {0.0: HashCounts(self.counts.clone(), self.identity)}


class HashVoteKind(RouterKind):
    name = HashVoteInference.name
    options = (
        Option("hash_buckets", "int", 16, "hash buckets of the token ids", low=1),
        Option("prior", "float", 1.0, "additive smoothing of the counts", low=0.0, low_open=True),
    )
    schema = SCHEMA
    stats_type = HashCounts
    stats_label = "hashed token counts"
    remote_module = "toy_kind_remote"

    def identity(self, spec, part=None):
        return f"hashvote:{spec.hash_buckets}"

    def statistics_settings(self, spec):
        return {"hash_buckets": spec.hash_buckets}

    def encode(self, stats):
        meta = {"schema": SCHEMA, "feature_map": stats.feature_map,
                "backbone_fingerprint": stats.backbone_fingerprint,
                "expert_fingerprint": stats.expert_fingerprint,
                "extra": json.dumps(stats.extra)}  # fmt: skip
        return st_save({"counts": stats.counts_B.contiguous()}, metadata=meta)

    def decode(self, tensors, meta):
        counts = tensors["counts"]
        if counts.dtype != torch.float64 or counts.dim() != 1 or (counts < 0).any():
            raise ValueError("hashed token counts must be a non-negative 1-D float64 tensor")
        return HashCounts(
            counts,
            meta["feature_map"],
            meta.get("backbone_fingerprint", ""),
            meta.get("expert_fingerprint", ""),
            json.loads(meta.get("extra", "{}")),
        )

    def layout(self, spec, backbone):
        return {"counts": ("F64", (spec.hash_buckets,))}, ()

    def validate(self, stats, spec, backbone):
        if stats.counts_B.shape != (spec.hash_buckets,) or stats.num_tokens < 1:
            raise ValueError(f"hashed token counts must be [{spec.hash_buckets}] and count tokens")

    def collectors(
        self, spec, backbone, expert, *, holdout, max_tokens_per_seq, device, dtype=None,
        clip=None, count_cap=None,
    ):  # fmt: skip
        return [HashCollector(spec.hash_buckets, max_tokens_per_seq, self.identity(spec))]

    def solve(self, spec, fit, num_experts, holdout):
        counts_EB = torch.zeros(num_experts, spec.hash_buckets, dtype=torch.float64)
        for name in sorted(fit):  # canonical order
            expert, stats = fit[name]
            counts_EB[expert] += stats.counts_B
        prior = spec.prior
        log_probs = (
            (counts_EB + prior) / (counts_EB.sum(1, keepdim=True) + prior * len(counts_EB[0]))
        ).log()
        return SolvedRouting(log_probs, spec, float(prior), 0.0, None, {})

    def config_routing(self, solved):
        out = {"kind": self.name, "module": self.remote_module,
               "buckets": solved.spec.hash_buckets}  # fmt: skip
        if solved.spec.min_weight and solved.spec.top_k > 1:
            out["min_weight"] = solved.spec.min_weight
        return out

    def check_routers(self, routers, routing, num_experts, backbone_config):
        if tuple(routers.shape) != (num_experts, routing["buckets"]):
            raise ValueError(f"hashvote table has shape {tuple(routers.shape)}")

    def checkpoint_tensors(self, routers, num_layers):
        yield None, f"{HashVoteInference.sequence_router_name}.log_probs", routers.float()

    def config_identity(self, routing):
        return f"hashvote:{routing['buckets']}"


HASHVOTE = register_kind(HashVoteKind())
