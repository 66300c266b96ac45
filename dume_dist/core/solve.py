"""Closed-form ridge routers from summed statistics (DESIGN §2, steps 3-4).

``A = Σ_c G_c`` over every contribution; column ``j`` of ``B`` is ``Σ_{c: e(c)=j} G_c[:, F]``
(the feature sums of the tokens whose label is expert ``j``). ``W = (A + λI)⁻¹ B`` by
Cholesky in fp64. The router of a layer is ``weight = W[:F]ᵀ`` and ``bias = W[F]``, each
expert's row divided by the L2 norm of its weight part.

Shapes: ``P = F + 1`` (features and the constant), ``E`` experts, ``L`` layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from dume_dist.core.stats import RouterStats, sum_stats


@dataclass(frozen=True)
class Router:
    """One layer's router, float64: logits = weight_EF @ f + bias_E."""

    weight_EF: torch.Tensor
    bias_E: torch.Tensor | None


def ridge_solve(a_PP: torch.Tensor, b_PE: torch.Tensor, lam: float) -> torch.Tensor:
    """``(A + λI)⁻¹ B`` in fp64 by Cholesky; A + λI is SPD for λ > 0."""
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    a_PP = a_PP.double()
    reg_PP = a_PP + lam * torch.eye(a_PP.shape[0], dtype=torch.float64, device=a_PP.device)
    chol_PP, info = torch.linalg.cholesky_ex(reg_PP)
    if info.item() != 0:
        raise ValueError(
            "A + lam*I is not positive definite: statistics are corrupt or lam is too small"
        )
    return torch.cholesky_solve(b_PE.double(), chol_PP)


def normal_equations(
    contributions: Mapping[str, tuple[int, RouterStats]], num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum contributions in canonical (sorted-name) order into ``A_LPP`` and ``B_LPE``."""
    if not contributions:
        raise ValueError("no contributions to solve routers from")
    for name, (expert, _) in contributions.items():
        if not 0 <= expert < num_experts:
            raise ValueError(f"contribution {name!r} names expert {expert}, have {num_experts}")
    total = sum_stats({name: stats for name, (_, stats) in contributions.items()})
    a_LPP = total.gram_LPP
    b_LPE = torch.zeros(*a_LPP.shape[:2], num_experts, dtype=torch.float64)
    for name in sorted(contributions):
        expert, stats = contributions[name]
        b_LPE[:, :, expert] += stats.gram_LPP[:, :, -1]
    missing = [j for j in range(num_experts) if not b_LPE[0, -1, j] > 0]
    if missing:
        raise ValueError(f"experts {missing} have no statistics: every expert needs data")
    return a_LPP, b_LPE


def _normalised(w_PE: torch.Tensor, with_bias: bool) -> Router:
    weight_FE = w_PE[:-1] if with_bias else w_PE
    norm_E = weight_FE.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    weight_EF = (weight_FE / norm_E).T.contiguous()
    bias_E = (w_PE[-1] / norm_E).contiguous() if with_bias else None
    return Router(weight_EF, bias_E)


def solve_routers(
    contributions: Mapping[str, tuple[int, RouterStats]],
    num_experts: int,
    lam: float = 1e-2,
    bias: bool = True,
) -> list[Router]:
    """Routers for every layer from ``{contributor: (expert_index, stats)}``.

    ``bias=False`` solves the ridge problem without intercept (the ``F×F`` block of A and
    the feature rows of B), for router formats that have no bias (Mixtral).
    """
    a_LPP, b_LPE = normal_equations(contributions, num_experts)
    routers = []
    for a_PP, b_PE in zip(a_LPP, b_LPE):
        if not bias:
            a_PP, b_PE = a_PP[:-1, :-1], b_PE[:-1]
        routers.append(_normalised(ridge_solve(a_PP, b_PE, lam), bias))
    return routers
