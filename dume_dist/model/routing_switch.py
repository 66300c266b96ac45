"""The switching posteriors of the n-gram router (remote code, imported by ``routing_dume``).

A text's domain may change: the router's posterior over experts is the forward filter of a hidden
Markov chain whose domain may switch before any token, with one rate (``fixed_share_posterior``)
or averaged over several rates, each weighted by how well it predicted the text so far
(``switch_mixture_posterior``). Imports only the standard library and torch.

Shape legend: B batch, T positions, R switch rates, E experts; N = B * blocks, C block positions.
"""

from __future__ import annotations

import functools
import math

import torch


def fixed_share_posterior(
    logp_BTE: torch.Tensor,
    real_BT: torch.Tensor,
    switch: float,
    state_BE: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log posterior [B, T, E] (fp64, normalised) of "which expert's domain is the text in at t",
    when the domain may switch before any token with probability ``switch`` (to each other
    expert alike): the forward filter of that hidden Markov chain, ``a_t ∝ p_t ⊙ (M a_{t-1})``
    (``switch_mixture_posterior`` with one rate). ``switch`` 0 is the cumulative naive Bayes
    posterior. ``state_BE``: the log posterior before the first position (None: uniform)."""
    state = None if state_BE is None else state_BE[:, None]
    return switch_mixture_posterior(logp_BTE, real_BT, (switch,), state)[:, :, 0]


def switch_mixture_posterior(
    logp_BTE: torch.Tensor,
    real_BT: torch.Tensor,
    rates: tuple[float, ...],
    state_BRE: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log joint posterior [B, T, R, E] (fp64, normalised over rate and expert) of "the text
    switches domain at rate ``rates[r]`` and is in expert j's domain at t", the rate fixed for
    the sequence (prior uniform over ``rates``) and the domain free to switch before any token
    with that probability (to each other expert alike); token t has log-likelihoods ``logp_BTE``
    under each expert. It is the forward filter of R switching chains side by side, whose joint
    normalisation weighs each chain by how well it predicted the tokens so far (Bayesian model
    averaging over the rates); one rate is the fixed-share posterior, rate 0 the cumulative
    naive Bayes. ``state_BRE``: the log joint before the first position (None: the prior).
    Padding neither updates nor switches. The products of the per-position matrices
    ``diag(p_t) M_r`` come from a blocked log-depth scan, rescaled by one factor per position
    for all rates alike (their relative weights stay); one position (decoding) is one step."""
    log_BTRE = _log(_mixture_filter(logp_BTE, real_BT, rates, state_BRE))
    return log_BTRE - log_BTRE.logsumexp(dim=(-2, -1), keepdim=True)


def _log(a: torch.Tensor) -> torch.Tensor:
    """log of a non-negative tensor, 0 read as its dtype's smallest normal number."""
    return a.clamp_min(torch.finfo(a.dtype).tiny).log()


def _mixture_filter(logp_BTE, real_BT, rates, state_BRE) -> torch.Tensor:
    """The joint filter's states [B, T, R, E] in linear space, each position's rescaled by one
    factor (``switch_mixture_posterior`` before its log and normalisation)."""
    batch, length, num = logp_BTE.shape
    stay_R, off_R = _switch_rates(rates, num, logp_BTE)
    if state_BRE is None:
        state_BRE = logp_BTE.new_full((batch, len(rates), num), -math.log(num * len(rates)))
    prior_BRE = (state_BRE - state_BRE.amax(dim=(-2, -1), keepdim=True)).exp()
    p_BTE = (logp_BTE - logp_BTE.amax(dim=-1, keepdim=True)).exp()
    if length == 1:  # one decoding step: a_t = p_t * (M a_{t-1}), no scan
        new_BRE = p_BTE[:, 0, None, :] * _moved(prior_BRE, stay_R[:, None], off_R[:, None], -1)
        return torch.where(real_BT[:, 0, None, None], new_BRE, prior_BRE)[:, None]
    return _blocked_scan(p_BTE, real_BT, stay_R, off_R, prior_BRE)


def _scan_block(length: int) -> int:
    """Positions per block of the scan: about sqrt(T) / 2, from 4 to 16 (measured fastest on CPU
    at T = 64, 256 and 4096)."""
    return min(16, max(4, 1 << round(math.log2(max(length, 1)) / 2 - 1)))


def sequence_scores(logp_BTE, real_BT, *, switch: float = 0.0, switch_rates=None,
                    evidence_scale: float = 1.0, state: dict | None = None):  # fmt: skip
    """The n-gram router's scores [B, T, E] from each position's log-likelihoods: evidence scaled,
    then the mixture over ``switch_rates``, the fixed-share posterior of ``switch``, or the
    cumulative sum; with the carried ``state`` of a previous call (``cum``, ``joint``). Returns
    the scores and what of the state this function carries (``joint``, for a mixture)."""
    if evidence_scale != 1.0:
        logp_BTE = logp_BTE * evidence_scale
    if switch_rates:  # posteriors of several switch rates, weighted by their evidence
        carried = None if state is None else state["joint"]
        post_BTRE = _mixture_filter(logp_BTE, real_BT, tuple(switch_rates), carried)
        marginal_BTE = post_BTRE.sum(dim=2)  # over the rates, in linear space
        last_BRE = post_BTRE[:, -1]
        return (
            _log(marginal_BTE / marginal_BTE.sum(dim=-1, keepdim=True)),
            {"joint": _log(last_BRE / last_BRE.sum(dim=(-2, -1), keepdim=True))},
        )
    if switch > 0:  # the fixed-share posterior: evidence before a switch fades
        carried = None if state is None else state["cum"]
        return fixed_share_posterior(logp_BTE, real_BT, switch, carried), {}
    cum_BTE = logp_BTE.cumsum(dim=1)
    return (cum_BTE if state is None else cum_BTE + state["cum"][:, None]), {}


def _blocked_scan(p_BTE, real_BT, stay_R, off_R, prior_BRE) -> torch.Tensor:
    """The filter's states [B, T, R, E] (each rescaled) from the positions' likelihoods
    ``p_BTE``: each block of ``_scan_block(T)`` positions' product of steps ``diag(p_t) M_r``, a
    log-depth prefix product across the blocks, then each block's positions stepped from the
    state entering it. ``M_r = stay_r I + off_r J`` (J all ones), so a step is
    ``a -> (p_t stay_r) a + (p_t off_r) sum(a)`` and never needs a matrix product; padding is the
    identity step (1 and 0)."""
    batch, length, num = p_BTE.shape
    rates = len(stay_R)
    size = _scan_block(length)
    blocks = -(-length // size)
    real_BT11 = real_BT[..., None, None]
    diag_BTRE = torch.where(real_BT11, p_BTE[:, :, None] * stay_R[:, None], 1.0)
    ones_BTRE = torch.where(real_BT11, p_BTE[:, :, None] * off_R[:, None], 0.0)
    pad = blocks * size - length
    if pad:  # identity steps at the end
        diag_BTRE = torch.cat([diag_BTRE, diag_BTRE.new_ones(batch, pad, rates, num)], 1)
        ones_BTRE = torch.cat([ones_BTRE, ones_BTRE.new_zeros(batch, pad, rates, num)], 1)
    # [C, K, B, R, E]: position c of block k, contiguous so each step reads one slab
    diag_CKBRE = diag_BTRE.view(batch, blocks, size, rates, num).permute(2, 1, 0, 3, 4).contiguous()
    ones_CKBRE = ones_BTRE.view(batch, blocks, size, rates, num).permute(2, 1, 0, 3, 4).contiguous()
    eye = torch.eye(num, dtype=p_BTE.dtype, device=p_BTE.device)
    total_KBREE = diag_CKBRE[0, ..., None] * eye + ones_CKBRE[0, ..., None]  # step 1 on I
    for c in range(1, size):  # the block's product so far, step_c @ ... @ step_1
        summed = total_KBREE.sum(dim=-2, keepdim=True)
        total_KBREE = diag_CKBRE[c, ..., None] * total_KBREE + ones_CKBRE[c, ..., None] * summed
        total_KBREE = _rescaled(total_KBREE)
    totals_KBREE = _prefix_products(total_KBREE)
    state_KBRE = torch.cat([prior_BRE[None], (totals_KBREE[:-1] @ prior_BRE[..., None])[..., 0]])
    state_KBRE = _rescaled(state_KBRE)
    out_CKBRE = torch.empty_like(diag_CKBRE)
    for c in range(size):  # each position's state: its step applied to the one before
        summed = state_KBRE.sum(dim=-1, keepdim=True)
        state_KBRE = _rescaled(diag_CKBRE[c] * state_KBRE + ones_CKBRE[c] * summed)
        out_CKBRE[c] = state_KBRE
    out_BKCRE = out_CKBRE.permute(2, 1, 0, 3, 4)
    return out_BKCRE.reshape(batch, blocks * size, rates, num)[:, :length]


def _moved(a: torch.Tensor, stay: torch.Tensor, off: torch.Tensor, dim: int) -> torch.Tensor:
    """``M a`` along ``dim`` (the experts' axis of a state or of a product's rows), for
    ``M = stay I + off J`` (stay and off broadcast over the rates' axis)."""
    return stay * a + off * a.sum(dim, keepdim=True)


def _rescaled(a: torch.Tensor) -> torch.Tensor:
    """``a`` divided by its largest entry over the rates and experts (the last two axes of a
    state, the last three of a product): one factor for all rates alike."""
    dims = (-2, -1) if a.dim() == 4 else (-3, -2, -1)
    return a / a.amax(dim=dims, keepdim=True)


def _prefix_products(step_TNREE: torch.Tensor) -> torch.Tensor:
    """Hillis-Steele prefix products along dim 0 (step_t <- step_t @ step_{t-shift}), each
    rescaled by its largest entry over (R, E, E)."""
    length, shift = step_TNREE.shape[0], 1
    while shift < length:
        prod = torch.empty_like(step_TNREE)
        prod[:shift] = step_TNREE[:shift]
        torch.matmul(step_TNREE[shift:], step_TNREE[:-shift], out=prod[shift:])
        step_TNREE = prod.div_(prod.flatten(2).amax(-1)[..., None, None, None])
        shift *= 2
    return step_TNREE


def _switch_rates(rates, num: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``stay`` [R] and ``off`` [R] of each rate's switch matrix ``M = stay I + off J``: 1 - rate
    on the diagonal, rate / (E - 1) elsewhere (cached: a decoding step would otherwise spend more
    on building them than on the filter)."""
    return _cached_switch_rates(tuple(float(r) for r in rates), num, like.dtype, like.device)


@functools.lru_cache(maxsize=32)
def _cached_switch_rates(rates, num, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    rate_R = torch.tensor(rates, dtype=dtype, device=device)
    off_R = rate_R / (num - 1) if num > 1 else torch.zeros_like(rate_R)
    return 1 - rate_R - off_R, off_R
