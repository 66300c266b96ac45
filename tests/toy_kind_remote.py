"""Inference code of the toy ``hashvote`` router kind (see ``toy_kind.py``): what a checkpoint's
remote code imports by the name in ``routing.module``.

One sequence-level router for every layer: token t of a sequence goes to the experts with the
largest ``log_probs[:, h(id_t)]`` — a fixed hash of the token's own id, no context.
"""

from __future__ import annotations

import torch
from torch import nn

HASH = 2_654_435_761


def bucket_of(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """The one definition statistics and inference share."""
    return (ids.long() * HASH) % buckets


class HashRouter(nn.Module):
    def __init__(self, num_experts: int, buckets: int):
        super().__init__()
        self.buckets = buckets
        self.log_probs = nn.Parameter(torch.zeros(num_experts, buckets), requires_grad=False)

    def scores(self, ids_BT, real_BT=None, state=None):
        """Logits [B, T, E] of every position (no running state)."""
        return self.log_probs.double()[:, bucket_of(ids_BT, self.buckets)].permute(1, 2, 0), {}

    def randomise_(self, generator: torch.Generator) -> None:
        self.log_probs.data = torch.randn(self.log_probs.shape, generator=generator)


class HashVoteInference:
    name = "hashvote"
    config_keys = ("buckets",)
    sequence_router_name = "hash_router"

    @staticmethod
    def validate(routing: dict) -> None:
        buckets = routing.get("buckets")
        if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 1:
            raise ValueError(f"routing.buckets must be an integer >= 1, got {buckets!r}")

    @staticmethod
    def stateful(routing: dict) -> bool:
        return True  # a sequence-level router: the model gives it the token ids

    @staticmethod
    def layer_router(routing, hidden_size, num_experts, bias):
        return None

    @staticmethod
    def sequence_router(routing, num_experts, vocab_size):
        return HashRouter(num_experts, routing["buckets"])


KIND_INFERENCE = HashVoteInference
