"""Choosing the n-gram router's smoothing ``mu`` from held-out statistics: no data moves.

Two criteria (the routing option ``mu_criterion``):

* ``likelihood`` (the default): each contributor computes on its own node its **held-out
  curve** (``heldout_curve``): for every ``mu`` of the grid, the log-likelihood of its held-out
  bigrams under the bigram model of its own fit counts (``routing_dume.ngram_log_probs``, the
  formula the router uses). The coordinator sums the curves of each expert's contributors and
  takes the ``mu`` with the largest mean over experts of the per-bigram log-likelihood
  (``select_mu_likelihood``). What leaves the node: a dozen numbers, no text.
* ``bigrams``: each contributor sends the exact bigrams of its held-out slice
  (``core.ngram.NgramStats.pairs_K3``) and the coordinator scores, for every ``mu``, the mean
  over experts of the per-bigram log-loss of the expert posterior (equal priors), i.e. how well
  single bigrams tell the domains apart (``select_mu``).

The switch rate of the fixed-share posterior (``select_switch``) is chosen on sequences simulated
from each expert's held-out counts (what a node sends by default), single-domain and switching.

It lives in ``model`` rather than ``core`` because the formula belongs to the model file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from dume_dist.core.ngram import DEFAULT_ALPHA, NgramStats, NgramTables, ngram_tables
from dume_dist.core.select import Selection
from dume_dist.model.ngram_shares import plain_counts, sequence_log_probs, simulate
from dume_dist.model.routing_dume import fixed_share_posterior, ngram_log_probs

DEFAULT_MU_GRID = tuple(10.0 ** (k / 2) for k in range(0, 9))  # 1 .. 1e4


def bigram_log_probs(
    tables: NgramTables, prev_K: torch.Tensor, cur_K: torch.Tensor, mu: float | None = None
) -> torch.Tensor:
    """``log p_j(cur | prev)`` [K, E] (fp64), the formula of ``DumeNgramRouter``."""
    mu = tables.mu if mu is None else mu
    has_prev = torch.ones_like(cur_K, dtype=torch.bool)
    return ngram_log_probs(
        tables.unigram_EV, tables.context_EV, tables.bigram_EH, prev_K, cur_K, has_prev, mu,
        tables.alpha,
    ).T  # fmt: skip


def heldout_curve(
    fit: NgramStats, pairs_K3: torch.Tensor, mu_grid: Sequence[float], alpha: float,
    clip: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """``[M]`` (fp64): per ``mu`` of ``mu_grid``, the summed log-likelihood of the bigrams
    ``pairs_K3`` (sorted, distinct, with counts) under the bigram model of ``fit``'s counts. A
    deterministic function of its inputs: any sharding of the same data gives the same bits.
    Hashed bigram counts are not normalised: buckets shared by other bigrams raise ``p`` most at
    small ``mu``, so with many more bigrams than buckets the maximum drifts to smaller ``mu``.
    ``clip``: each bigram's log-probability counts at least ``-clip`` (differential privacy)."""
    out = torch.zeros(len(mu_grid), dtype=torch.float64)
    if pairs_K3.numel() == 0:
        return out
    counts = (fit.unigram_V[None], fit.context_V[None], fit.bigram_H[None])
    has_prev = torch.ones(pairs_K3.shape[0], dtype=torch.bool)
    weight_K = pairs_K3[:, 2].double()
    for m, mu in enumerate(mu_grid):
        logp_K = ngram_log_probs(
            *counts, pairs_K3[:, 0], pairs_K3[:, 1], has_prev, float(mu), alpha
        )
        if clip is not None:
            logp_K = logp_K.clamp_min(-clip)
        out[m] = (logp_K[0] * weight_K).sum()
    return out


def with_heldout_curve(
    held: NgramStats, fit: NgramStats, mu_grid: Sequence[float], alpha: float,
    keep_pairs: bool = False,
) -> NgramStats:  # fmt: skip
    """Held-out statistics as a node sends them for ``mu_criterion: likelihood``: ``held``'s
    counts and its held-out curve under ``fit`` (``heldout_curve`` of ``held``'s exact bigrams,
    which stay on the node unless ``keep_pairs``)."""
    if held.pairs_K3 is None:
        raise ValueError("a held-out curve needs the held-out bigrams")
    grid = torch.tensor([float(m) for m in mu_grid], dtype=torch.float64)
    curve = heldout_curve(fit, held.pairs_K3, grid.tolist(), alpha)
    pairs = held.pairs_K3 if keep_pairs else None
    count = torch.tensor([float(held.num_bigrams)], dtype=torch.float64)
    return held.with_meta(pairs_K3=pairs, curve_M=curve, curve_mu_M=grid, curve_count_1=count,
                          feature_map="")  # fmt: skip


def select_mu_likelihood(heldout: Mapping[str, tuple[int, NgramStats]], num_experts: int,
                         mu_grid: Sequence[float]):  # fmt: skip
    """The ``mu`` of ``mu_grid`` with the largest mean over experts of the per-bigram held-out
    log-likelihood (each expert's contributors' curves and bigram counts summed in canonical
    order), and the curve of that mean, as a ``core.select.Selection``."""
    grid = torch.tensor([float(m) for m in mu_grid], dtype=torch.float64)
    sums: dict[int, list] = {}
    for name in sorted(heldout):
        expert, stats = heldout[name]
        if stats.curve_M is None:
            raise ValueError(f"held-out statistics of {name!r} carry no held-out curve")
        if not torch.equal(stats.curve_mu_M, grid):
            raise ValueError(f"held-out curve of {name!r} is over another mu grid")
        if not 0 <= expert < num_experts:
            raise ValueError(f"contribution {name!r} names expert {expert}, have {num_experts}")
        total, count = sums.get(expert, (torch.zeros_like(grid), 0.0))
        sums[expert] = (total + stats.curve_M, count + float(stats.curve_count_1))
    per_expert = [total / count for total, count in (sums[j] for j in sorted(sums)) if count > 0]
    if not per_expert:
        raise ValueError("held-out statistics hold no bigrams")
    mean_M = torch.stack(per_expert).mean(dim=0)
    best = int(torch.argmax(mean_M))
    return Selection(
        lam=float(grid[best]), smoothing=0.0, criterion="heldout_loglik", lam_grid=grid.tolist(),
        smoothing_grid=[0.0], curves={"heldout_loglik": [mean_M.tolist()]},
        num_holdout_tokens=int(round(sum(count for _, count in sums.values()))),
    )  # fmt: skip


def heldout_logloss(
    tables: NgramTables, heldout: Mapping[str, tuple[int, NgramStats]], mu: float
) -> float:
    """Mean over experts of the per-bigram log-loss of the expert posterior (equal priors) on
    the held-out bigrams of that expert's contributors: how well single bigrams tell the
    domains apart under ``mu``."""
    logp_KE, expert_K, weight_K = _heldout_bigrams(tables, heldout, mu)
    nll_K = -torch.log_softmax(logp_KE, dim=1).gather(1, expert_K[:, None]).squeeze(1)
    means = []
    for j in sorted(set(expert_K.tolist())):
        mine = expert_K == j
        means.append(float((nll_K[mine] * weight_K[mine]).sum()) / float(weight_K[mine].sum()))
    return sum(means) / len(means)


def select_mu(
    fit: Mapping[str, tuple[int, NgramStats]],
    heldout: Mapping[str, tuple[int, NgramStats]],
    num_experts: int,
    mu_grid: Sequence[float] = DEFAULT_MU_GRID,
    alpha: float = DEFAULT_ALPHA,
):
    """The ``mu`` of ``mu_grid`` with the least held-out log-loss (tables from ``fit``) and the
    whole curve, as a ``core.select.Selection``."""
    grid = [float(m) for m in mu_grid]
    if not grid or any(not (m > 0 and math.isfinite(m)) for m in grid):
        raise ValueError(f"mu grid must be positive numbers, got {list(mu_grid)}")
    tables = ngram_tables(fit, num_experts, grid[0], alpha)
    curve = [heldout_logloss(tables, heldout, m) for m in grid]
    best = min(range(len(grid)), key=curve.__getitem__)
    tokens = sum(int(s.pairs_K3[:, 2].sum()) for _, s in heldout.values() if s.pairs_K3 is not None)
    return Selection(
        lam=grid[best],
        smoothing=0.0,
        criterion="nb_logloss",
        lam_grid=grid,
        smoothing_grid=[0.0],
        curves={"nb_logloss": [curve]},
        num_holdout_tokens=tokens,
    )


DEFAULT_SWITCH_GRID = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
SWITCH_SIM = {"sequences": 64, "length": 256, "segment": 64, "seed": 0}


def select_switch(
    tables: NgramTables,
    heldout: Mapping[str, tuple[int, NgramStats]],
    num_experts: int,
    grid: Sequence[float] = DEFAULT_SWITCH_GRID,
    evidence_scale: float = 1.0,
):
    """The switch rate of ``grid`` whose posterior (``fixed_share_posterior``) puts the least
    log-loss on the true expert along simulated sequences, and the curve (a ``Selection``).

    No text moves: each stretch of a simulated sequence is a chain of tokens drawn from the
    bigram model of one expert's contributors' held-out counts (``ngram_shares.simulate``, the
    counts a node sends by default), scored by ``tables`` across the stretches' joins as text
    would be. Half the sequences stay in one domain, half switch domain every
    ``SWITCH_SIM["segment"]`` tokens (to one not used yet, while there is one), so the rate is
    paid for both by single-domain text and by switches. A bigram chain is less bursty than
    text (no topic within a domain): the choice errs to the larger rates. ``evidence_scale``:
    the router's weight on each token's log-likelihoods."""
    grid = [float(r) for r in grid]
    if not grid or any(not 0 <= r < 0.5 for r in grid):
        raise ValueError(f"switch grid must be values in [0, 0.5), got {list(grid)}")
    if num_experts < 2:
        raise ValueError("choosing a switch rate needs held-out counts of two experts or more")
    counts = plain_counts(heldout, num_experts)
    g = torch.Generator().manual_seed(SWITCH_SIM["seed"])
    truth_BT = _simulated_domains(list(range(num_experts)), g)
    ids_BT = torch.empty_like(truth_BT)
    runs = _runs(truth_BT)
    for j in range(num_experts):
        for length in sorted({n for row, start, n, e in runs if e == j}):
            mine = [(row, start) for row, start, n, e in runs if e == j and n == length]
            drawn = simulate(counts[j], tables.mu, tables.alpha, g, len(mine), length)
            for (row, start), seq in zip(mine, drawn):
                ids_BT[row, start : start + length] = seq
    logp_BTE = sequence_log_probs(tables, ids_BT) * evidence_scale
    real_BT = torch.ones(truth_BT.shape, dtype=torch.bool)
    curve = []
    for rate in grid:
        post_BTE = fixed_share_posterior(logp_BTE, real_BT, rate)
        curve.append(float(-post_BTE.gather(2, truth_BT[..., None]).mean()))
    best = min(range(len(grid)), key=curve.__getitem__)
    return Selection(
        lam=grid[best], smoothing=0.0, criterion="switch_logloss", lam_grid=grid,
        smoothing_grid=[0.0], curves={"switch_logloss": [curve]},
        num_holdout_tokens=int(sum(c.num_tokens for c in counts)),
    )  # fmt: skip


def _runs(truth_BT: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """``(row, start, length, expert)`` of every maximal stretch of one expert in each row."""
    runs = []
    for row, labels in enumerate(truth_BT.tolist()):
        start = 0
        for t in range(1, len(labels) + 1):
            if t == len(labels) or labels[t] != labels[start]:
                runs.append((row, start, t - start, labels[start]))
                start = t
    return runs


def _heldout_bigrams(tables, heldout, mu: float | None = None):
    """Every held-out bigram's log-probabilities [K, E] under ``tables`` (``mu``: the tables'
    own unless given), its expert and count."""
    logps, experts, weights = [], [], []
    for name in sorted(heldout):
        expert, stats = heldout[name]
        pairs = stats.pairs_K3
        if pairs is None:
            raise ValueError(f"held-out statistics of {name!r} carry no bigrams")
        if pairs.numel() == 0:
            continue
        logps.append(bigram_log_probs(tables, pairs[:, 0], pairs[:, 1], mu))
        experts.append(torch.full((pairs.shape[0],), expert, dtype=torch.long))
        weights.append(pairs[:, 2].double())
    if not logps:
        raise ValueError("held-out statistics hold no bigrams")
    return torch.cat(logps), torch.cat(experts), torch.cat(weights)


def _simulated_domains(present: list[int], g: torch.Generator) -> torch.Tensor:
    """[B, T] true expert of every simulated position: single-domain rows, then switching rows."""
    num, length, seg = SWITCH_SIM["sequences"], SWITCH_SIM["length"], SWITCH_SIM["segment"]
    rows = []
    for i in range(num):
        if i < num // 2:
            rows.append(torch.full((length,), present[i % len(present)], dtype=torch.long))
            continue
        order = [present[j] for j in torch.randperm(len(present), generator=g).tolist()]
        segs = [order[k % len(order)] for k in range(-(-length // seg))]
        rows.append(torch.tensor(segs).repeat_interleave(seg)[:length])
    return torch.stack(rows)
