"""A contributor's statistics made differentially private before they leave its node.

``privatize`` takes one contributor's statistics (its fit part and its held-out parts, computed
with each token's features clipped to ``clip`` and each unit's counts capped, see ``core.dp``),
calibrates one noise multiplier for the contributor's (ε, δ) over every Gaussian release they
make, adds the noise, post-processes the result into well-formed statistics and records the
guarantee in each statistic's ``extra["dp"]``. The noisy contribution is what the coordinator
sums, so removing it later subtracts exactly what was added: unlearning stays exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dume_dist.core import dp
from dume_dist.core.stats import RouterStats


def privatize(
    fit,
    held: Mapping[float, object],
    spec: dp.DpSpec,
    *,
    tokens_per_unit: int,
    clip: float | None = None,
    seed: int | None = None,
    **options,
) -> tuple[object, dict, dp.Guarantee]:
    """``(noisy fit, {β: noisy held-out}, guarantee)`` for one contributor's statistics. Each
    statistics type owns its mechanism (``privatized``: its releases, sensitivity and
    post-processing); this calibrates nothing itself and never asks which type it holds.
    ``options``: what the mechanism needs from the model layer (``RouterKind.dp_mechanism_options``)."""
    if tokens_per_unit < 1:
        raise ValueError("tokens_per_unit must be positive")
    mechanism = getattr(fit, "privatized", None)
    if mechanism is None:
        raise ValueError(f"no differential privacy for statistics of type {type(fit).__name__}")
    return mechanism(
        dict(held),
        spec,
        tokens_per_unit=tokens_per_unit,
        clip=clip,
        gen=dp.generator(seed),
        **options,
    )


def guarantee_of(stats) -> dp.Guarantee | None:
    """The guarantee recorded in a statistic (validated), or None."""
    raw = (getattr(stats, "extra", None) or {}).get("dp")
    return None if raw is None else dp.Guarantee.from_json(raw)


def noise_sigmas(
    contributions: Mapping[str, tuple[int, object]], priors: str = "tokens"
) -> list[float]:
    """The Gram noise scales of the private contributions (empty when none is private), as they
    enter the solve: with equal priors each divided by its expert's token count."""
    out, count_E = [], {}
    for name in sorted(contributions):
        expert, stats = contributions[name]
        if priors == "equal":
            count_E[expert] = count_E.get(expert, 0.0) + float(stats.gram_LPP[0, -1, -1])
        g = guarantee_of(stats)
        if g is not None and "gram" in g.sigma:
            out.append((expert, float(g.sigma["gram"])))
    return [s / count_E[e] if priors == "equal" else s for e, s in out]


def lam_floor(
    contributions: Mapping[str, tuple[int, RouterStats]],
    num_experts: int,
    solver: str,
    priors: str = "tokens",
):
    """The smallest λ the solve may use with these contributions: for ridge ``core.dp.min_ridge_lam``
    of their noise (as it enters ``A`` under ``priors``), for lda the same bound relative to the
    pooled covariance's mean variance (its shrinkage is relative), 0 when no contribution is
    private."""
    from dume_dist.core.solve import normal_equations

    sigmas = noise_sigmas(contributions, priors)
    if not sigmas:
        return 0.0
    a_LPP, b_LPE = normal_equations(contributions, num_experts, priors)
    floor = dp.min_ridge_lam(sigmas, a_LPP.shape[-1])
    if solver != "lda":
        return floor
    rel = 0.0
    for a_PP, b_PE in zip(a_LPP, b_LPE):
        count_E = b_PE[-1]
        scatter = torch.diagonal(a_PP[:-1, :-1]).sum() - ((b_PE[:-1] ** 2).sum(0) / count_E).sum()
        mean_var = float(scatter) / (a_PP.shape[0] - 1)  # N (E: equal priors) × the mean variance
        rel = max(rel, floor / mean_var if mean_var > 0 else 1.0)
    return min(1.0, rel)


def privacy_record(guarantees: list[dict | None]) -> dict | None:
    """What a contributor's submissions (their ``dp`` records, None for a non-private one) spend
    together: the composed ε at the largest δ, or ``epsilon: None`` when any was not private."""
    private = [dp.Guarantee.from_json(g) for g in guarantees if g is not None]
    if not private:
        return None
    delta = max(g.delta for g in private)
    all_private = len(private) == len(guarantees)
    return {
        "epsilon": dp.total_epsilon(private, delta) if all_private else None,
        "delta": delta,
        "unit": sorted({g.unit for g in private}),
        "private_submissions": len(private),
        "submissions": len(guarantees),
        "accountant": private[0].accountant,
    }
