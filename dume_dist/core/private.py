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
from dume_dist.core.ngram import NgramStats
from dume_dist.core.stats import RouterStats


def gram_releases(num_layers: int, num_held_parts: int) -> int:
    """Gaussian releases of a Gram contribution: every layer of every part, one count per part."""
    fit = num_layers + 1
    held = num_held_parts * num_layers + 1 if num_held_parts else 0
    return fit + held


def _with_dp(stats, guarantee: dp.Guarantee):
    return stats.with_meta(extra={**stats.extra, "dp": guarantee.to_json()})


def privatize(
    fit,
    held: Mapping[float, object],
    spec: dp.DpSpec,
    *,
    tokens_per_unit: int,
    clip: float | None = None,
    seed: int | None = None,
) -> tuple[object, dict, dp.Guarantee]:
    """``(noisy fit, {β: noisy held-out}, guarantee)`` for one contributor's statistics."""
    if tokens_per_unit < 1:
        raise ValueError("tokens_per_unit must be positive")
    gen = dp.generator(seed)
    if isinstance(fit, NgramStats):
        return _privatize_ngram(fit, dict(held), spec, tokens_per_unit, gen)
    if isinstance(fit, RouterStats):
        if clip is None:
            raise ValueError("Gram statistics need the feature clip they were collected with")
        return _privatize_grams(fit, dict(held), spec, tokens_per_unit, clip, gen)
    raise ValueError(f"no differential privacy for statistics of type {type(fit).__name__}")


def _privatize_grams(fit, held, spec, tokens_per_unit, clip, gen):
    if spec.unit != "sequence":
        raise ValueError(
            "--dp-unit token does not hold for Gram statistics (one token changes the hidden "
            "states of every later token of its window): use --dp-unit sequence"
        )
    num_l = fit.num_layers
    releases = gram_releases(num_l, len(held))
    z = dp.calibrate(spec.epsilon, spec.delta, releases)
    sens_gram, sens_count = dp.gram_sensitivity(clip, tokens_per_unit)
    sigma = {"gram": z * sens_gram, "count": z * sens_count}
    guarantee = dp.Guarantee(
        epsilon=spec.epsilon, delta=spec.delta, unit=spec.unit, noise_multiplier=z,
        num_releases=releases, sensitivity={"gram": sens_gram, "count": sens_count},
        sigma=sigma, clip=float(clip), count_cap=None,
    )  # fmt: skip
    (noisy_fit,) = dp.noisy_grams([fit.gram_LPP], sigma["gram"], sigma["count"], gen)
    betas = sorted(held)
    noisy_held = dp.noisy_grams(
        [held[b].gram_LPP for b in betas], sigma["gram"], sigma["count"], gen
    ) if betas else []  # fmt: skip
    out_fit = _with_dp(fit.with_meta(gram_LPP=noisy_fit), guarantee)
    out_held = {
        b: _with_dp(held[b].with_meta(gram_LPP=g), guarantee) for b, g in zip(betas, noisy_held)
    }
    return out_fit, out_held, guarantee


def _privatize_ngram(fit, held, spec, tokens_per_unit, gen):
    if any(h.pairs_K3 is not None for h in held.values()):
        raise ValueError(
            "exact held-out bigrams cannot be released with differential privacy: use a fixed "
            "mu (--lam) for ngram routing"
        )
    releases = 1 + len(held)
    z = dp.calibrate(spec.epsilon, spec.delta, releases)
    sens = dp.ngram_sensitivity(spec.unit, tokens_per_unit, spec.count_cap)
    guarantee = dp.Guarantee(
        epsilon=spec.epsilon, delta=spec.delta, unit=spec.unit, noise_multiplier=z,
        num_releases=releases, sensitivity={"counts": sens}, sigma={"counts": z * sens},
        clip=None, count_cap=spec.count_cap if spec.unit == "sequence" else None,
    )  # fmt: skip
    noisy = {b: noisy_ngram(h, z * sens, gen) for b, h in sorted(held.items())}
    return (
        _with_dp(noisy_ngram(fit, z * sens, gen), guarantee),
        {b: _with_dp(h, guarantee) for b, h in noisy.items()},
        guarantee,
    )


def noisy_ngram(stats: NgramStats, sigma: float, gen: torch.Generator) -> NgramStats:
    """Noise on the three count vectors, post-processed into counts that pass validation: a
    context count never above its unigram count, bigram counts summing to the context counts."""
    uni_V = dp.noisy_counts(stats.unigram_V, sigma, gen)
    ctx_V = torch.minimum(dp.noisy_counts(stats.context_V, sigma, gen), uni_V)
    big_H = dp.noisy_counts(stats.bigram_H, sigma, gen)
    if not float(uni_V.sum()) > 0:  # everything under the threshold: one count, anywhere
        uni_V[int(torch.argmax(stats.unigram_V + dp.gaussian(uni_V.shape, sigma, gen)))] = 1.0
    if float(big_H.sum()) > 0:
        big_H = dp.rescale_to_total(big_H, float(ctx_V.sum()))
    else:
        ctx_V = torch.zeros_like(ctx_V)
    return stats.with_meta(unigram_V=uni_V, context_V=ctx_V, bigram_H=big_H)


def guarantee_of(stats) -> dp.Guarantee | None:
    """The guarantee recorded in a statistic (validated), or None."""
    raw = (getattr(stats, "extra", None) or {}).get("dp")
    return None if raw is None else dp.Guarantee.from_json(raw)


def noise_sigmas(contributions: Mapping[str, tuple[int, object]]) -> list[float]:
    """The Gram noise scales of the private contributions (empty when none is private)."""
    out = []
    for name in sorted(contributions):
        g = guarantee_of(contributions[name][1])
        if g is not None and "gram" in g.sigma:
            out.append(float(g.sigma["gram"]))
    return out


def lam_floor(contributions: Mapping[str, tuple[int, RouterStats]], num_experts: int, solver: str):
    """The smallest λ the solve may use with these contributions: for ridge ``core.dp.min_ridge_lam``
    of their noise, for lda the same bound relative to the pooled covariance's mean variance
    (its shrinkage is relative), 0 when no contribution is private."""
    from dume_dist.core.solve import normal_equations

    sigmas = noise_sigmas(contributions)
    if not sigmas:
        return 0.0
    a_LPP, b_LPE = normal_equations(contributions, num_experts)
    floor = dp.min_ridge_lam(sigmas, a_LPP.shape[-1])
    if solver != "lda":
        return floor
    rel = 0.0
    for a_PP, b_PE in zip(a_LPP, b_LPE):
        count_E = b_PE[-1]
        scatter = torch.diagonal(a_PP[:-1, :-1]).sum() - ((b_PE[:-1] ** 2).sum(0) / count_E).sum()
        mean_var = float(scatter) / (a_PP.shape[0] - 1)  # N × the mean variance
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
