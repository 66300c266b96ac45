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
    batch, length, num = logp_BTE.shape
    move_REE = _switch_matrices(rates, num, logp_BTE)
    if state_BRE is None:
        state_BRE = logp_BTE.new_full((batch, len(rates), num), -math.log(num * len(rates)))
    prior_BRE = (state_BRE - state_BRE.amax(dim=(-2, -1), keepdim=True)).exp()
    p_BTE = (logp_BTE - logp_BTE.amax(dim=-1, keepdim=True)).exp()
    if length == 1:  # one decoding step: a_t = p_t * (M a_{t-1}), no scan
        new_BRE = p_BTE[:, 0, None, :] * (move_REE @ prior_BRE[..., None]).squeeze(-1)
        post_BTRE = torch.where(real_BT[:, 0, None, None], new_BRE, prior_BRE)[:, None]
    else:
        eye = torch.eye(num, dtype=p_BTE.dtype, device=p_BTE.device)
        step_TBREE = torch.where(
            real_BT.T[..., None, None, None], p_BTE.transpose(0, 1)[..., None, :, None] * move_REE,
            eye,
        )  # fmt: skip
        post_BTRE = _blocked_scan(step_TBREE, prior_BRE).transpose(0, 1)
    log_BTRE = post_BTRE.clamp_min(torch.finfo(post_BTRE.dtype).tiny).log()
    return log_BTRE - log_BTRE.logsumexp(dim=(-2, -1), keepdim=True)


_SCAN_BLOCK = 4  # positions per block of the scan (measured fastest on CPU at T = 256)


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
        joint_BTRE = switch_mixture_posterior(logp_BTE, real_BT, tuple(switch_rates), carried)
        return joint_BTRE.logsumexp(dim=2), {"joint": joint_BTRE[:, -1]}
    if switch > 0:  # the fixed-share posterior: evidence before a switch fades
        carried = None if state is None else state["cum"]
        return fixed_share_posterior(logp_BTE, real_BT, switch, carried), {}
    cum_BTE = logp_BTE.cumsum(dim=1)
    return (cum_BTE if state is None else cum_BTE + state["cum"][:, None]), {}


def _blocked_scan(step_TBREE: torch.Tensor, prior_BRE: torch.Tensor) -> torch.Tensor:
    """``step_t @ ... @ step_1 @ prior`` [T, B, R, E] (each position rescaled): prefix products
    within blocks of _SCAN_BLOCK positions, then across the blocks' totals, then each position's
    in-block product applied to the state entering its block."""
    length, batch, rates, num = step_TBREE.shape[:4]
    blocks = -(-length // _SCAN_BLOCK)
    pad = blocks * _SCAN_BLOCK - length
    if pad:  # identity steps at the end
        eye = torch.eye(num, dtype=step_TBREE.dtype, device=step_TBREE.device)
        step_TBREE = torch.cat([step_TBREE, eye.expand(pad, *step_TBREE.shape[1:])])
    step_CNREE = step_TBREE.reshape(blocks, _SCAN_BLOCK, batch, rates, num, num).transpose(0, 1)
    within_CNREE = _prefix_products(
        step_CNREE.reshape(_SCAN_BLOCK, blocks * batch, rates, num, num)
    )
    totals_KBREE = _prefix_products(within_CNREE[-1].view(blocks, batch, rates, num, num))
    enter_KBRE1 = torch.cat([prior_BRE[None, ..., None], totals_KBREE[:-1] @ prior_BRE[..., None]])
    enter_KBRE1 = enter_KBRE1 / enter_KBRE1.flatten(2).amax(-1)[..., None, None, None]
    out_CNRE = (within_CNREE @ enter_KBRE1.view(1, blocks * batch, rates, num, 1)).squeeze(-1)
    out_TBRE = out_CNRE.view(_SCAN_BLOCK, blocks, batch, rates, num).transpose(0, 1)
    return out_TBRE.reshape(blocks * _SCAN_BLOCK, batch, rates, num)[:length]


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


def _switch_matrices(rates, num: int, like: torch.Tensor) -> torch.Tensor:
    """[R, E, E]: 1 - rate on the diagonal, rate / (E - 1) elsewhere, for each rate (cached:
    a decoding step would otherwise spend more on building them than on the filter)."""
    return _cached_switch_matrices(tuple(float(r) for r in rates), num, like.dtype, like.device)


@functools.lru_cache(maxsize=32)
def _cached_switch_matrices(rates, num, dtype, device) -> torch.Tensor:
    rate_R = torch.tensor(rates, dtype=dtype, device=device)
    off_R = rate_R / max(num - 1, 1)
    eye = torch.eye(num, dtype=dtype, device=device)
    return off_R[:, None, None] * (1 - eye) + (1 - rate_R)[:, None, None] * eye
