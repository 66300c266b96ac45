"""Differential privacy of a contributor's statistics: clipping, Gaussian noise, accounting.

What leaves a node are sums over its data (Gram matrices, token counts). Each is released with the
Gaussian mechanism: every *unit* of data (a statistics window, ``sequence``; or one ``token``) has
a bounded effect on the sum (its L2 *sensitivity* ``Δ``), and noise ``N(0, (z Δ)²)`` is added to
every released entry before the statistics leave the node. ``z`` is the noise multiplier; the
privacy loss of all the releases of a contributor (every layer, the token count, held-out parts,
repeated submissions) is composed by Google's ``dp_accounting`` (privacy loss distributions).

Sensitivities (``T`` counted tokens per unit at most, ``C`` the per-token feature clip):

* a Gram layer ``Σ f̃ f̃ᵀ`` without its count entry: a token adds ``f̃ f̃ᵀ - e eᵀ`` whose Frobenius
  norm is ``√(‖f‖⁴ + 2‖f‖²) ≤ C √(C² + 2)``; a unit at most ``T`` times that. The noise is
  symmetric (the upper triangle drawn once, mirrored: the release is the upper triangle, whose
  sensitivity is at most the Frobenius one), and the count entry is released once for all layers
  (sensitivity ``T``). ``token`` units are unsound for Grams of a transformer's hidden states
  (one token changes every later token's features), so only ``sequence`` is offered there.
* n-gram counts ``[unigram, context, bigram]``: a unit's per-entry counts are capped at ``m``, so
  each vector moves by at most ``√(m T)`` in L2 and the three by ``√(3 m T)``; a single token
  (``token`` units) moves them by ``√5`` (its unigram, its context, and the bigrams around it).

Noisy statistics are post-processed (free under DP) into well-formed ones: integer counts,
non-negative, symmetric positive semi-definite Grams.

Shapes: ``L`` layers, ``P`` features + 1, ``N`` tokens, ``F`` features, ``K`` entries.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

UNITS = ("sequence", "token")
DEFAULT_COUNT_CAP = 4
MAX_EPSILON = 50.0


@dataclass(frozen=True)
class DpSpec:
    """What a contributor asks for: an (ε, δ) budget for one submission, the unit it protects,
    the feature clip (``clip``: absolute L2 bound, or None for the kind's default) and the per-unit
    cap on each count (n-gram kinds)."""

    epsilon: float
    delta: float
    unit: str = "sequence"
    clip: float | None = None
    count_cap: int = DEFAULT_COUNT_CAP

    def __post_init__(self):
        if not (isinstance(self.epsilon, (int, float)) and 0 < self.epsilon <= MAX_EPSILON):
            raise ValueError(f"dp epsilon must be in (0, {MAX_EPSILON:g}], got {self.epsilon!r}")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ValueError(f"dp delta must be in (0, 1), got {self.delta!r}")
        if self.unit not in UNITS:
            raise ValueError(f"dp unit must be one of {UNITS}, got {self.unit!r}")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"dp clip must be a positive number, got {self.clip!r}")
        if isinstance(self.count_cap, bool) or not (
            isinstance(self.count_cap, int) and self.count_cap >= 1
        ):
            raise ValueError(f"dp count cap must be a positive integer, got {self.count_cap!r}")

    def to_json(self) -> dict:
        return asdict(self)


# -- bounding each unit ------------------------------------------------------------------------


def clip_rows(feats_NF: torch.Tensor, clip: float) -> torch.Tensor:
    """Each row scaled down to L2 norm ``clip`` at most (rows already within are unchanged)."""
    norm_N1 = feats_NF.double().norm(dim=1, keepdim=True)
    scale_N1 = (clip / norm_N1.clamp_min(1e-300)).clamp(max=1.0)
    return (feats_NF.double() * scale_N1).to(feats_NF.dtype)


def add_capped_counts(
    target: torch.Tensor, ids_K: torch.Tensor, unit_K: torch.Tensor, cap: int | None
) -> None:
    """``target += bincount(ids_K)`` (fp64, in place, touching only the bins hit: a table of
    millions of bins costs nothing per batch) where each unit (``unit_K``: a unit index per
    entry) adds at most ``cap`` to any one bin (None: uncapped)."""
    if ids_K.numel() == 0:
        return
    if cap is None:
        target.index_add_(0, ids_K, torch.ones(ids_K.shape, dtype=target.dtype))
        return
    size = target.shape[0]
    keys, counts = torch.unique(unit_K.long() * size + ids_K.long(), return_counts=True)
    target.index_add_(0, keys % size, counts.clamp(max=cap).to(target.dtype))


def gram_sensitivity(clip: float, tokens_per_unit: int) -> tuple[float, float]:
    """``(Δ of one layer's Gram without its count entry, Δ of the token count)`` per unit."""
    return tokens_per_unit * clip * math.sqrt(clip * clip + 2.0), float(tokens_per_unit)


def ngram_sensitivity(unit: str, tokens_per_unit: int, count_cap: int) -> float:
    """L2 sensitivity of the concatenated ``[unigram, context, bigram]`` counts per unit."""
    if unit == "token":
        return math.sqrt(5.0)
    return math.sqrt(3.0 * count_cap * tokens_per_unit)


# -- noise --------------------------------------------------------------------------------------


def generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator: ``seed`` for tests, else seeded from the operating system's entropy."""
    gen = torch.Generator()
    if seed is None:
        seed = int.from_bytes(__import__("os").urandom(8), "little") >> 1
    gen.manual_seed(seed)
    return gen


def gaussian(shape: Sequence[int], sigma: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=gen) * sigma


def symmetric_gaussian(num: int, p: int, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """``[num, p, p]`` symmetric noise: each upper-triangle entry ``N(0, σ²)``, mirrored."""
    rows, cols = torch.triu_indices(p, p)
    noise_LPP = torch.zeros(num, p, p, dtype=torch.float64)
    upper_LK = gaussian((num, rows.numel()), sigma, gen)
    noise_LPP[:, rows, cols] = upper_LK
    noise_LPP[:, cols, rows] = upper_LK
    return noise_LPP


def noisy_grams(
    grams: Sequence[torch.Tensor], sigma_gram: float, sigma_count: float, gen: torch.Generator
) -> list[torch.Tensor]:
    """Gaussian noise on Gram stacks ``[L, P, P]`` that share one token count (a fit part, or a
    held-out part's Grams for several smoothings): symmetric noise of ``sigma_gram`` on every
    entry but the count, the count released once (``sigma_count``), rounded and at least 1, and
    each layer made a Gram matrix again (``psd_gram``)."""
    count = float(grams[0][0, -1, -1]) + float(gaussian((1,), sigma_count, gen)[0])
    count = max(1.0, float(round(count)))
    out = []
    for gram_LPP in grams:
        num_l, p, _ = gram_LPP.shape
        noisy_LPP = gram_LPP.double() + symmetric_gaussian(num_l, p, sigma_gram, gen)
        noisy_LPP[:, -1, -1] = count
        out.append(torch.stack([psd_gram(g_PP) for g_PP in noisy_LPP]))
    return out


def psd_gram(g_PP: torch.Tensor) -> torch.Tensor:
    """The nearest Gram matrix with the same count ``n`` and feature sum ``s``: the scatter
    ``S − s sᵀ / n`` projected onto the positive semi-definite cone (negative eigenvalues set to
    0), so ``[[S', s], [sᵀ, n]]`` is positive semi-definite; exactly symmetric."""
    n, s_F = g_PP[-1, -1], g_PP[:-1, -1]
    scatter_FF = g_PP[:-1, :-1] - torch.outer(s_F, s_F) / n
    evals, evecs = torch.linalg.eigh((scatter_FF + scatter_FF.T) / 2)
    proj_FF = (evecs * evals.clamp_min(0)) @ evecs.T + torch.outer(s_F, s_F) / n
    out_PP = g_PP.clone()
    out_PP[:-1, :-1] = proj_FF
    return torch.triu(out_PP) + torch.triu(out_PP, diagonal=1).T


def noisy_counts(counts_K: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Counts plus ``N(0, σ²)``, rounded; counts below ``3σ`` are dropped (without the threshold
    every empty bin of a large histogram would gain ``≈0.4σ`` of spurious mass)."""
    noisy_K = (counts_K.double() + gaussian(counts_K.shape, sigma, gen)).round()
    return torch.where(noisy_K >= 3.0 * sigma, noisy_K, torch.zeros_like(noisy_K))


def rescale_to_total(counts_K: torch.Tensor, total: float) -> torch.Tensor:
    """Non-negative integer counts proportional to ``counts_K`` that sum to ``total`` exactly
    (largest remainders get the leftover units)."""
    total = int(round(total))
    mass = float(counts_K.sum())
    if total <= 0 or mass <= 0:
        return torch.zeros_like(counts_K)
    exact_K = counts_K.double() * (total / mass)
    floor_K = exact_K.floor()
    short = total - int(floor_K.sum())
    if short > 0:
        top = torch.topk(exact_K - floor_K, short).indices
        floor_K[top] += 1
    return floor_K


# -- accounting ---------------------------------------------------------------------------------


def _accountant():
    from dp_accounting.pld import PLDAccountant

    return PLDAccountant(value_discretization_interval=1e-3)


def effective_multiplier(releases: Sequence[tuple[float, int]]) -> float:
    """The noise multiplier of the one Gaussian mechanism equivalent to composing ``count``
    mechanisms of multiplier ``z`` for each ``(z, count)``: ``(Σ count / z²)^(-1/2)`` (exact: the
    privacy loss of a Gaussian mechanism is Gaussian, and Gaussian losses add)."""
    inv = sum(int(count) / float(z) ** 2 for z, count in releases)
    if not inv > 0:
        raise ValueError("no releases to account")
    return inv**-0.5


def epsilon_of(releases: Sequence[tuple[float, int]], delta: float) -> float:
    """ε at ``delta`` of composing ``count`` Gaussian mechanisms of noise multiplier ``z`` for each
    ``(z, count)`` of ``releases`` (every release of a contributor, all its submissions), from the
    library's privacy loss distribution of their equivalent single mechanism."""
    from dp_accounting import GaussianDpEvent

    if not releases:
        return 0.0
    acc = _accountant()
    acc.compose(GaussianDpEvent(effective_multiplier(releases)))
    return float(acc.get_epsilon(delta))


def calibrate(epsilon: float, delta: float, num_releases: int) -> float:
    """The noise multiplier ``z`` such that ``num_releases`` Gaussian mechanisms of multiplier
    ``z`` compose to (``epsilon``, ``delta``). Composing ``k`` Gaussian mechanisms of multiplier
    ``z`` is exactly one of multiplier ``z / √k``, so the library calibrates that one (bisection on
    its ε) and the result is scaled back."""
    if num_releases < 1:
        raise ValueError("nothing to release")
    if not 0 < epsilon <= MAX_EPSILON:
        raise ValueError(f"dp epsilon must be in (0, {MAX_EPSILON:g}], got {epsilon!r}")
    return _single_multiplier(float(epsilon), float(delta)) * math.sqrt(num_releases)


@functools.lru_cache(maxsize=64)
def _single_multiplier(epsilon: float, delta: float) -> float:
    """The multiplier of one Gaussian mechanism that is (``epsilon``, ``delta``)-DP: a pure
    function of the two, computed once per pair (each bisection takes about a second)."""
    from dp_accounting import GaussianDpEvent
    from dp_accounting.mechanism_calibration import ExplicitBracketInterval, calibrate_dp_mechanism

    z1 = calibrate_dp_mechanism(
        _accountant, GaussianDpEvent, epsilon, delta, ExplicitBracketInterval(0.08, 1e3), tol=1e-5
    )
    return float(z1)


@dataclass(frozen=True)
class Guarantee:
    """The record of one private release: its (ε, δ), unit, noise multiplier, number of composed
    Gaussian mechanisms and the noise scales actually used (for the solve's lower bound on λ)."""

    epsilon: float
    delta: float
    unit: str
    noise_multiplier: float
    num_releases: int
    sensitivity: dict
    sigma: dict
    clip: float | None = None
    count_cap: int | None = None
    accountant: str = "dp_accounting.pld"

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(obj: dict) -> Guarantee:
        if not isinstance(obj, dict):
            raise ValueError("dp guarantee must be a JSON object")
        try:
            g = Guarantee(**obj)
        except TypeError as exc:
            raise ValueError(f"dp guarantee has bad fields: {exc}") from None
        for key in ("epsilon", "delta", "noise_multiplier"):
            v = getattr(g, key)
            if not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"dp guarantee {key} must be a positive number, got {v!r}")
        if not isinstance(g.num_releases, int) or g.num_releases < 1:
            raise ValueError("dp guarantee num_releases must be a positive integer")
        for scales in (g.sigma, g.sensitivity):
            if not isinstance(scales, dict) or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in scales.values()
            ):
                raise ValueError("dp guarantee noise scales must be non-negative numbers")
        return g


def total_epsilon(guarantees: Sequence[Guarantee], delta: float | None = None) -> float:
    """ε of every release together (all submissions of a contributor) at ``delta`` (default: the
    largest δ asked for)."""
    if not guarantees:
        return 0.0
    delta = max(g.delta for g in guarantees) if delta is None else delta
    return epsilon_of([(g.noise_multiplier, g.num_releases) for g in guarantees], delta)


def min_ridge_lam(sigmas: Sequence[float], p: int, margin: float = 2.0) -> float:
    """Smallest ridge λ that keeps ``A + λI`` positive definite under the summed symmetric noise of
    the contributions (noise scales ``sigmas``): ``margin`` × the noise's expected spectral norm
    ``2σ√P`` (Wigner), with ``σ² = Σ σ_c²``."""
    sigma = math.sqrt(sum(s * s for s in sigmas))
    return margin * 2.0 * sigma * math.sqrt(p)


def with_guarantee(stats, guarantee: Guarantee):
    """``stats`` with the guarantee it was released under recorded in ``extra["dp"]``."""
    return stats.with_meta(extra={**stats.extra, "dp": guarantee.to_json()})
