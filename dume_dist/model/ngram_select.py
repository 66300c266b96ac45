"""Choosing the n-gram router's smoothing ``mu`` from held-out statistics: no data moves.

Each contributor's held-out statistics carry the exact bigrams of its held-out slice
(``core.ngram.NgramStats.pairs_K3``). For every ``mu`` of a grid the bigram model of the fit
counts (``modeling_dume.ngram_log_probs``, the formula the router itself uses) scores them: the
criterion is the mean over experts of the per-bigram log-loss of the expert posterior (equal
priors), i.e. how well single bigrams tell the domains apart.

It lives in ``model`` rather than ``core`` because the formula belongs to the model file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from dume_dist.core.ngram import DEFAULT_ALPHA, NgramStats, NgramTables, ngram_tables
from dume_dist.core.select import Selection
from dume_dist.model.modeling_dume import ngram_log_probs

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


def heldout_logloss(
    tables: NgramTables, heldout: Mapping[str, tuple[int, NgramStats]], mu: float
) -> float:
    """Mean over experts of the per-bigram log-loss of the expert posterior (equal priors) on
    the held-out bigrams of that expert's contributors: how well single bigrams tell the
    domains apart under ``mu``."""
    losses: dict[int, list[float]] = {}
    for name in sorted(heldout):
        expert, stats = heldout[name]
        pairs = stats.pairs_K3
        if pairs is None:
            raise ValueError(f"held-out statistics of {name!r} carry no bigrams")
        if pairs.numel() == 0:
            continue
        logp_KE = bigram_log_probs(tables, pairs[:, 0], pairs[:, 1], mu)
        nll_K = -torch.log_softmax(logp_KE, dim=1)[:, expert]
        total, count = losses.setdefault(expert, [0.0, 0.0])
        losses[expert] = [
            total + float((nll_K * pairs[:, 2]).sum()),
            count + float(pairs[:, 2].sum()),
        ]
    if not losses:
        raise ValueError("held-out statistics hold no bigrams")
    return sum(t / c for t, c in losses.values()) / len(losses)


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
