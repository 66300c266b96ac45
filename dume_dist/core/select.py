"""Choosing λ and the smoothing decay β from held-out statistics: no data moves.

Every contributor also computes Gram matrices on a held-out slice of its own data, one per
candidate smoothing decay β: the Gram of its causally smoothed features ``f̄ = EMA_β(f)``
(β = 0: the plain features). Smoothing is linear and keeps the constant 1, so smoothing a linear
router's logits equals applying the router to smoothed features, and every candidate
``(λ, β)`` is scored from these matrices alone. Routers are solved on the fit statistics (never
the held-out ones) for each λ of a grid, then scored on each β's held-out statistics:

* ``ridge_loss`` (the ridge solver's criterion): ``‖F̄ W − Y‖² = tr(Wᵀ G_h W) − 2 tr(Wᵀ B_h) +
  N_h`` with ``Y`` the one-hot labels, ``G_h`` the summed held-out Gram and ``B_h`` its per-class
  last columns; reported per held-out token and layer.
* ``error`` (the lda solver's criterion, whose logits are not fitted to 0/1 targets): the
  estimated top-1 routing error. For a token of class ``j`` and a rival ``k`` the logit gap
  ``d = (w_j - w_k)ᵀ f̄`` has held-out mean ``m`` and variance ``v`` from class ``j``'s held-out
  Gram; ``P(d < 0) ≈ Φ(-m / √v)``; ``error_j = 1 - Π_k (1 - P_jk)``; averaged over classes and
  layers.

Shapes: ``P = F + 1``, ``E`` experts, ``L`` layers, ``Λ`` grid of λ, ``S`` grid of β.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from dume_dist.core.solve import PRIORS, SOLVERS, normal_equations, solve_layer
from dume_dist.core.stats import RouterStats

CRITERIA = ("ridge_loss", "error")
DEFAULT_CRITERION = {"ridge": "ridge_loss", "lda": "error"}
# λ grids: ridge λ is absolute (A sums N tokens), lda λ is a relative shrinkage in (0, 1].
DEFAULT_LAM_GRID = {
    "ridge": tuple(10.0 ** (k / 2) for k in range(-6, 15)),  # 1e-3 .. 1e7
    "lda": tuple(10.0 ** (k / 2) for k in range(-12, 1)),  # 1e-6 .. 1
}
# With equal priors A sums E unit-weight experts (their moments), not N tokens: ridge λ is relative.
EQUAL_PRIORS_LAM_GRID = {
    "ridge": tuple(10.0 ** (k / 2) for k in range(-18, 3)),  # 1e-9 .. 10
    "lda": DEFAULT_LAM_GRID["lda"],
}


def default_lam_grid(solver: str, priors: str = "tokens") -> tuple[float, ...]:
    """The λ grid of ``auto`` for ``solver`` under ``priors``."""
    return (EQUAL_PRIORS_LAM_GRID if priors == "equal" else DEFAULT_LAM_GRID)[solver]


Contributions = Mapping[str, tuple[int, RouterStats]]


@dataclass(frozen=True)
class Selection:
    """The chosen ``lam`` and ``smoothing``, and the scores of every candidate:
    ``curves[criterion][s][l]`` for ``smoothing_grid[s]`` and ``lam_grid[l]``."""

    lam: float
    smoothing: float
    criterion: str
    lam_grid: list[float]
    smoothing_grid: list[float]
    curves: dict[str, list[list[float]]]
    num_holdout_tokens: int

    def to_json(self) -> dict:
        return asdict(self)


def ridge_loss(w_PE: torch.Tensor, g_PP: torch.Tensor, b_PE: torch.Tensor) -> float:
    """``tr(Wᵀ G W) - 2 tr(Wᵀ B) + N``: the squared error of ``W`` on the data behind ``G``."""
    return float((w_PE * (g_PP @ w_PE)).sum() - 2 * (w_PE * b_PE).sum() + g_PP[-1, -1])


def estimated_error(w_PE: torch.Tensor, class_gram_EPP: torch.Tensor) -> float:
    """Mean over classes of the Gaussian estimate of the top-1 routing error (module docstring)."""
    num_e = w_PE.shape[1]
    errors = []
    for j in range(num_e):
        gram_PP = class_gram_EPP[j]
        count = gram_PP[-1, -1]
        if not count > 0:
            continue
        gap_PK = w_PE[:, j, None] - w_PE[:, [k for k in range(num_e) if k != j]]
        mean_K = gap_PK.T @ gram_PP[:, -1] / count
        second_K = (gap_PK * (gram_PP @ gap_PK)).sum(dim=0) / count
        std_K = (second_K - mean_K**2).clamp_min(1e-300).sqrt()
        lose_K = torch.special.ndtr(-mean_K / std_K)
        errors.append(float(1 - (1 - lose_K).prod()))
    return sum(errors) / len(errors)


def class_grams(contributions: Contributions, num_experts: int) -> torch.Tensor:
    """``[L, E, P, P]``: the held-out Gram of each class (sorted-name order: reproducible)."""
    first = next(iter(contributions.values()))[1].gram_LPP
    out = torch.zeros(first.shape[0], num_experts, *first.shape[1:], dtype=torch.float64)
    for name in sorted(contributions):
        expert, stats = contributions[name]
        out[:, expert] += stats.gram_LPP
    return out


def select_routing(
    fit: Contributions,
    holdout: Mapping[float, Contributions],
    num_experts: int,
    *,
    solver: str = "ridge",
    lam_grid: Sequence[float] | None = None,
    criterion: str | None = None,
    priors: str = "tokens",
) -> Selection:
    """The ``(λ, β)`` on ``lam_grid × holdout`` that minimises the held-out ``criterion``
    (default: the solver's own, ``DEFAULT_CRITERION``); ties go to the first candidate. The
    routers are solved with ``priors`` (``core.solve``), and the ridge loss is weighted alike."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if priors not in PRIORS:
        raise ValueError(f"priors must be one of {PRIORS}, got {priors!r}")
    criterion = criterion or DEFAULT_CRITERION[solver]
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not holdout:
        raise ValueError("selecting lam or smoothing needs held-out statistics")
    lam_grid = [float(x) for x in (lam_grid or default_lam_grid(solver, priors))]
    betas = sorted(float(b) for b in holdout)
    a_LPP, b_LPE = normal_equations(fit, num_experts, priors)
    held = {}
    for beta in betas:
        ga_LPP, gb_LPE = normal_equations(holdout[beta], num_experts, priors)
        if ga_LPP.shape != a_LPP.shape:
            raise ValueError(
                f"held-out statistics have shape {tuple(ga_LPP.shape)}, the fit ones "
                f"{tuple(a_LPP.shape)}"
            )
        held[beta] = (ga_LPP, gb_LPE, class_grams(holdout[beta], num_experts))
    num_layers = a_LPP.shape[0]
    num_held = int(round(float(held[betas[0]][2][0, :, -1, -1].sum())))
    weight = num_held if priors == "tokens" else num_experts  # what G_h sums: tokens or classes
    curves = {c: [[0.0] * len(lam_grid) for _ in betas] for c in CRITERIA}
    for li, lam in enumerate(lam_grid):
        for layer in range(num_layers):
            try:
                w_PE = solve_layer(a_LPP[layer], b_LPE[layer], lam, solver)
            except ValueError:  # λ too small for this A: not a candidate
                w_PE = None
            for si, beta in enumerate(betas):
                ga_LPP, gb_LPE, cls_LEPP = held[beta]
                if w_PE is None:
                    curves["ridge_loss"][si][li] = curves["error"][si][li] = math.inf
                    continue
                loss = ridge_loss(w_PE, ga_LPP[layer], gb_LPE[layer])
                curves["ridge_loss"][si][li] += loss / (weight * num_layers)
                curves["error"][si][li] += estimated_error(w_PE, cls_LEPP[layer]) / num_layers
    chosen = curves[criterion]
    best = min(
        ((si, li) for si in range(len(betas)) for li in range(len(lam_grid))),
        key=lambda sl: chosen[sl[0]][sl[1]],
    )
    if not math.isfinite(chosen[best[0]][best[1]]):
        raise ValueError("no lam on the grid gives a solvable system")
    return Selection(
        lam=lam_grid[best[1]],
        smoothing=betas[best[0]],
        criterion=criterion,
        lam_grid=lam_grid,
        smoothing_grid=betas,
        curves=curves,
        num_holdout_tokens=num_held,
    )
