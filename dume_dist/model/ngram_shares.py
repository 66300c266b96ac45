"""Routing shares of the n-gram router estimated from statistics alone (docs/privacy.md).

The coordinator has no text, and the n-gram router routes whole sequences, so the shares are
measured on **simulated sequences**: for each expert ``j``, ``SHARES_SIM["sequences"]``
sequences of ``SHARES_SIM["length"]`` tokens drawn from the bigram model of ``j``'s counts (the
router's own formula, ``routing_dume.ngram_log_probs``, with the routing's ``mu``; the first token
from its unigram model). The held-out counts are used when there are (an honest estimate: that
text is not in the tables), the fit counts otherwise (optimistic: the tables saw it). Each
sequence is routed by the router's posterior (``routing_switch.sequence_scores``, which
``DumeNgramRouter.scores`` uses too) and every position's top-1 expert is counted. Seeded: the
same statistics give the same shares on every machine.

A draw covers the tokens the generating counts saw (their unigram support); the rest of the
vocabulary, whose probability is only the ``alpha`` smoothing, is left out. Shapes: ``E``
experts, ``V`` vocabulary, ``S`` support, ``B`` sequences, ``T`` positions.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dume_dist.core.ngram import NgramStats, NgramTables, per_expert_counts
from dume_dist.core.shares import shares_record
from dume_dist.model.routing_dume import ngram_log_probs
from dume_dist.model.routing_switch import sequence_scores

SHARES_SIM = {"sequences": 32, "length": 128, "seed": 0}


def simulate(counts: NgramStats, mu: float, alpha: float, gen: torch.Generator,
             num: int | None = None, length: int | None = None) -> torch.Tensor:  # fmt: skip
    """``[B, T]`` token ids drawn from the bigram model of ``counts`` (``num`` sequences of
    ``length`` tokens; ``SHARES_SIM``'s when not given)."""
    num = SHARES_SIM["sequences"] if num is None else num
    length = SHARES_SIM["length"] if length is None else length
    support_S = (counts.unigram_V > 0).nonzero().squeeze(1)
    tables = (counts.unigram_V[None], counts.context_V[None], counts.bigram_H[None])
    first_S = counts.unigram_V[support_S] + alpha
    ids_BT = torch.empty(num, length, dtype=torch.long)
    ids_BT[:, 0] = support_S[torch.multinomial(first_S, num, replacement=True, generator=gen)]
    cur_BS = support_S.expand(num, -1)
    has_prev = torch.ones_like(cur_BS, dtype=torch.bool)
    for t in range(1, length):
        prev_BS = ids_BT[:, t - 1 : t].expand_as(cur_BS)
        logp_BS = ngram_log_probs(*tables, prev_BS, cur_BS, has_prev, mu, alpha)[0]
        pick_B = torch.multinomial((logp_BS - logp_BS.amax(1, keepdim=True)).exp(), 1,
                                   generator=gen)  # fmt: skip
        ids_BT[:, t] = support_S[pick_B[:, 0]]
    return ids_BT


def plain_counts(stats: Mapping[str, tuple[int, NgramStats]], num_experts: int) -> list:
    """Each expert's summed counts (its contributors' held-out curves and bigrams left out)."""
    return per_expert_counts({n: (j, s.counts_only()) for n, (j, s) in stats.items()}, num_experts)


def sequence_log_probs(tables: NgramTables, ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, T, E]: each position's log-probability under every expert's bigram model given the
    position before it (the first: the unigram model), as the router computes it."""
    prev_BT = torch.cat([ids_BT[:, :1], ids_BT[:, :-1]], dim=1)
    has_prev = torch.ones_like(ids_BT, dtype=torch.bool)
    has_prev[:, 0] = False
    logp_EBT = ngram_log_probs(tables.unigram_EV, tables.context_EV, tables.bigram_EH, prev_BT,
                               ids_BT, has_prev, tables.mu, tables.alpha)  # fmt: skip
    return logp_EBT.permute(1, 2, 0)


def top1_shares(tables: NgramTables, ids_BT: torch.Tensor, **routing) -> torch.Tensor:
    """``[E]``: the share of the positions of ``ids_BT`` whose top-1 expert is each expert
    (``routing``: the keyword options of ``routing_switch.sequence_scores``)."""
    real_BT = torch.ones_like(ids_BT, dtype=torch.bool)
    post_BTE, _ = sequence_scores(sequence_log_probs(tables, ids_BT), real_BT, **routing)
    winners = post_BTE.argmax(dim=-1).flatten()
    return torch.bincount(winners, minlength=tables.unigram_EV.shape[0]).double() / winners.numel()


def ngram_routing_shares(
    tables: NgramTables,
    fit: Mapping[str, tuple[int, NgramStats]],
    heldout: Mapping[str, tuple[int, NgramStats]] | None,
    num_experts: int,
    **routing,
) -> dict | None:
    """The manifest's ``routing.shares`` (``core.shares.shares_record``) for the n-gram router
    ``tables`` with ``routing`` (``switch``, ``switch_rates``, ``evidence_scale``), on sequences
    simulated from each expert's held-out counts (fit counts when there are none); None with one
    expert."""
    if num_experts < 2:
        return None
    counts = plain_counts(heldout or fit, num_experts)
    gen = torch.Generator().manual_seed(SHARES_SIM["seed"])
    share_EE = torch.stack(
        [top1_shares(tables, simulate(c, tables.mu, tables.alpha, gen), **routing) for c in counts]
    )
    out = shares_record(share_EE, torch.tensor([float(c.num_tokens) for c in counts]))
    out["statistics"] = "held-out" if heldout else "fit"
    out["method"] = (
        f"{SHARES_SIM['sequences']} sequences of {SHARES_SIM['length']} tokens simulated per "
        "expert from its counts' bigram model"
    )
    return out
