"""Closed-form routers from summed statistics (DESIGN §2, steps 3-4).

``A = Σ_c G_c`` over every contribution; column ``j`` of ``B`` is ``Σ_{c: e(c)=j} G_c[:, F]``
(the feature sums of the tokens whose label is expert ``j``). Two solvers read only ``A`` and
``B``, so both stay additive per contributor:

* ``ridge`` (the paper): ``W = (A + λI)⁻¹ B`` by Cholesky in fp64. The router of a layer is
  ``weight = W[:F]ᵀ`` and ``bias = W[F]``, each expert's row divided by the L2 norm of its
  weight part.
* ``lda`` (linear discriminant): class counts ``n_j = B[F, j]``, means ``μ_j = B[:F, j] / n_j``,
  pooled within-class covariance ``Σ = (A[:F, :F] - Σ_j n_j μ_j μ_jᵀ) / N`` shrunk towards its
  mean variance, ``Σ_λ = (1-λ) Σ + λ (tr Σ / F) I`` (``λ`` in (0, 1]); router row ``j`` is
  ``Σ_λ⁻¹ μ_j`` with bias ``-½ μ_jᵀ Σ_λ⁻¹ μ_j`` (equal priors: a contributor's amount of data
  does not buy it traffic). Logits are Gaussian log-likelihoods up to a shared constant; rows are
  not normalised.

**Priors** (``priors``): ``tokens`` (the paper) sums every contribution as it is, so an expert
weighs in the solve by the tokens it claims — for ridge its share of the tokens acts as a prior,
for lda it shapes the pooled covariance. ``equal`` first sums each expert's contributions
(sorted names), then divides that sum by the expert's token count ``n_j``: every expert enters
``A`` as its mean Gram (its moments, weight 1) and column ``j`` of ``B`` is ``[μ_j, 1]``. An
expert's weight no longer depends on how many tokens it claims (``×k`` statistics solve to the
same routers), and it is still a function of per-expert sums of additive statistics, so removing a
contribution and solving again equals a solve that never had it. Under ``equal`` ridge's λ is
relative to one expert's moments (``A`` sums ``E`` unit-weight experts, not ``N`` tokens); lda's
shrinkage is relative under both, and with ``equal`` its pooled covariance is the mean of the
class covariances.

Shapes: ``P = F + 1`` (features and the constant), ``E`` experts, ``L`` layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from dume_dist.core.stats import RouterStats, add_stats

SOLVERS = ("ridge", "lda")
PRIORS = ("tokens", "equal")


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
    contributions: Mapping[str, tuple[int, RouterStats]], num_experts: int, priors: str = "tokens"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum contributions in canonical (sorted-name) order into ``A_LPP`` and ``B_LPE``.

    One pass, one contribution read at a time (``contributions`` may load lazily): memory is
    the running sums plus one contribution. ``A`` is bit-identical to ``sum_stats``. With
    ``priors="equal"`` each expert's contributions are summed first and divided by its token
    count (``_balanced_equations``)."""
    if priors not in PRIORS:
        raise ValueError(f"priors must be one of {PRIORS}, got {priors!r}")
    if not contributions:
        raise ValueError("no contributions to solve routers from")
    if priors == "equal":
        return _balanced_equations(contributions, num_experts)
    total, b_LPE = None, None
    for name in sorted(contributions):
        expert, stats = contributions[name]
        _check_expert(name, expert, num_experts)
        total = add_stats(total, stats)
        if b_LPE is None:
            b_LPE = torch.zeros(*stats.gram_LPP.shape[:2], num_experts, dtype=torch.float64)
        b_LPE[:, :, expert] += stats.gram_LPP[:, :, -1]
        del stats
    a_LPP = total.gram_LPP
    _check_all_present([j for j in range(num_experts) if not b_LPE[0, -1, j] > 0])
    return a_LPP, b_LPE


def _check_expert(name: str, expert: int, num_experts: int) -> None:
    if not 0 <= expert < num_experts:
        raise ValueError(f"contribution {name!r} names expert {expert}, have {num_experts}")


def _check_all_present(missing: list[int]) -> None:
    if missing:
        raise ValueError(f"experts {missing} have no statistics: every expert needs data")


def experts_of(
    contributions: Mapping[str, tuple[int, object]], num_experts: int
) -> list[list[str]]:
    """Per expert the names of its contributions, sorted. A mapping that loads statistics lazily
    may offer ``expert_of(name)`` so that this reads no statistics."""
    expert_of = getattr(contributions, "expert_of", None)
    groups: list[list[str]] = [[] for _ in range(num_experts)]
    for name in sorted(contributions):
        expert = expert_of(name) if expert_of is not None else contributions[name][0]
        _check_expert(name, expert, num_experts)
        groups[expert].append(name)
    return groups


def _balanced_equations(contributions, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal priors: ``A = Σ_j S_j / n_j`` and ``B[:, j] = S_j[:, F] / n_j`` with ``S_j`` the sum of
    expert ``j``'s contributions in sorted-name order and ``n_j`` its token count; experts added
    in index order. Memory: ``A``, one expert's running sum and one contribution."""
    groups = experts_of(contributions, num_experts)
    _check_all_present([j for j, names in enumerate(groups) if not names])
    a_total, b_LPE = None, None
    for j, names in enumerate(groups):
        expert_sum = None
        for name in names:
            expert_sum = add_stats(expert_sum, contributions[name][1])
        gram_LPP = expert_sum.gram_LPP
        count = float(gram_LPP[0, -1, -1])
        _check_all_present([] if count > 0 else [j])
        gram_LPP.div_(count)  # the running sum is add_stats' own copy
        if b_LPE is None:
            b_LPE = torch.zeros(*gram_LPP.shape[:2], num_experts, dtype=torch.float64)
        b_LPE[:, :, j] = gram_LPP[:, :, -1]
        a_total = add_stats(a_total, expert_sum)
        del expert_sum, gram_LPP
    return a_total.gram_LPP, b_LPE


def _normalised(w_PE: torch.Tensor, with_bias: bool) -> Router:
    weight_FE = w_PE[:-1] if with_bias else w_PE
    norm_E = weight_FE.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    weight_EF = (weight_FE / norm_E).T.contiguous()
    bias_E = (w_PE[-1] / norm_E).contiguous() if with_bias else None
    return Router(weight_EF, bias_E)


def lda_solve(a_PP: torch.Tensor, b_PE: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Linear discriminant ``W`` [P, E] (weights over the features, bias in the last row) from
    ``A`` and ``B``; see the module docstring."""
    if not 0 < shrinkage <= 1:
        raise ValueError(f"lda shrinkage lam must be in (0, 1], got {shrinkage}")
    a_PP, b_PE = a_PP.double(), b_PE.double()
    num_f = a_PP.shape[0] - 1
    count_E = b_PE[-1]
    total = a_PP[-1, -1]
    mean_FE = b_PE[:-1] / count_E
    scatter_FF = a_PP[:-1, :-1] - (mean_FE * count_E) @ mean_FE.T
    cov_FF = (scatter_FF + scatter_FF.T) / (2 * total)
    scale = cov_FF.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(num_f, dtype=torch.float64, device=a_PP.device)
    shrunk_FF = (1 - shrinkage) * cov_FF + shrinkage * scale * eye
    chol_FF, info = torch.linalg.cholesky_ex(shrunk_FF)
    if info.item() != 0:
        raise ValueError("the pooled covariance is not positive definite: raise the shrinkage lam")
    weight_FE = torch.cholesky_solve(mean_FE, chol_FF)
    bias_E = -0.5 * (mean_FE * weight_FE).sum(dim=0)
    return torch.cat([weight_FE, bias_E[None]], dim=0)


def solve_layer(
    a_PP: torch.Tensor, b_PE: torch.Tensor, lam: float, solver: str = "ridge", bias: bool = True
) -> torch.Tensor:
    """The unnormalised solution ``W`` [P, E] (or [F, E] without bias) of one layer."""
    if solver == "ridge":
        if not bias:
            a_PP, b_PE = a_PP[:-1, :-1], b_PE[:-1]
        return ridge_solve(a_PP, b_PE, lam)
    if solver == "lda":
        if not bias:
            raise ValueError("the lda solver needs a router bias")
        return lda_solve(a_PP, b_PE, lam)
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def router_from_solution(w_PE: torch.Tensor, solver: str = "ridge", bias: bool = True) -> Router:
    """Router of a layer: ridge rows normalised (the paper), lda rows as they are."""
    if solver == "ridge":
        return _normalised(w_PE, bias)
    return Router(w_PE[:-1].T.contiguous(), w_PE[-1].contiguous())


def solve_routers(
    contributions: Mapping[str, tuple[int, RouterStats]],
    num_experts: int,
    lam: float = 1e-2,
    bias: bool = True,
    solver: str = "ridge",
    priors: str = "tokens",
) -> list[Router]:
    """Routers for every layer from ``{contributor: (expert_index, stats)}``.

    ``bias=False`` solves the ridge problem without intercept (the ``F×F`` block of A and
    the feature rows of B), for router formats that have no bias (Mixtral). ``solver`` is
    ``ridge`` (the paper; ``lam`` = λ) or ``lda`` (``lam`` = covariance shrinkage in (0, 1]);
    ``priors`` ``tokens`` (the paper) or ``equal`` (module docstring).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    a_LPP, b_LPE = normal_equations(contributions, num_experts, priors)
    return [
        router_from_solution(solve_layer(a_PP, b_PE, lam, solver, bias), solver, bias)
        for a_PP, b_PE in zip(a_LPP, b_LPE)
    ]
