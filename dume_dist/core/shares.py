"""Routing shares estimated from statistics alone: how much of each contributor's traffic each
expert would win, which experts take an outlying share of other classes' tokens, and which
classes their own expert rarely wins (signs of inflated or forged statistics, docs/privacy.md). This file: the linear routers' estimate and the record every kind
writes (``shares_record``); the n-gram router's estimate is ``model.ngram_shares``.

For a linear router (logits ``W f̃``) and a class ``j`` whose tokens have Gram ``G_j`` (count
``n``, feature mean ``μ``, covariance ``Σ``), the logits of its tokens have mean ``W μ̃`` and
covariance ``W Σ Wᵀ``; their top-1 shares are estimated by sampling that Gaussian (seeded, so the
estimate is reproducible). Held-out Grams give an honest estimate; fit Grams an optimistic one.

Shapes: ``E`` experts, ``P`` features + 1, ``S`` samples.
"""

from __future__ import annotations

import torch

OUTLIER_OTHERS_SHARE = 0.25  # an expert winning this much of another class's tokens is flagged
# a class whose own expert wins less than this of its tokens is flagged: a contributor that
# claims others' text as its own (mimicry: 45-49% in the poisoning bench under equal priors, where
# the others-share rule misses it), or a domain the routers cannot tell apart (honest founders:
# 88-100%)
MIN_OWN_SHARE = 0.6


def class_shares(
    weight_EF: torch.Tensor, bias_E: torch.Tensor | None, gram_PP: torch.Tensor, samples: int = 4096
) -> torch.Tensor:
    """``[E]``: the estimated top-1 share of each expert among the tokens behind ``gram_PP``."""
    n = float(gram_PP[-1, -1])
    mean_F = gram_PP[:-1, -1] / n
    cov_FF = gram_PP[:-1, :-1] / n - torch.outer(mean_F, mean_F)
    w_EF = weight_EF.double()
    mean_E = w_EF @ mean_F + (0.0 if bias_E is None else bias_E.double())
    cov_EE = w_EF @ cov_FF @ w_EF.T
    cov_EE = (cov_EE + cov_EE.T) / 2
    evals, evecs = torch.linalg.eigh(cov_EE)
    root_EE = evecs * evals.clamp_min(0).sqrt()
    gen = torch.Generator().manual_seed(0)
    z_SE = torch.randn(samples, mean_E.shape[0], dtype=torch.float64, generator=gen)
    winners = (mean_E + z_SE @ root_EE.T).argmax(dim=1)
    return torch.bincount(winners, minlength=mean_E.shape[0]).double() / samples


def routing_shares(routers, class_grams_LEPP: torch.Tensor) -> dict:
    """Per class ``j`` the estimated share of its tokens each expert wins (mean over layers),
    each expert's share of all tokens, and the experts flagged as outliers (winning more than
    ``OUTLIER_OTHERS_SHARE`` of some other class's tokens)."""
    num_l, num_e = class_grams_LEPP.shape[:2]
    share_EE = torch.zeros(num_e, num_e, dtype=torch.float64)
    for layer in range(num_l):
        r = routers[layer]
        for j in range(num_e):
            share_EE[j] += class_shares(r.weight_EF, r.bias_E, class_grams_LEPP[layer, j]) / num_l
    return shares_record(share_EE, class_grams_LEPP[0, :, -1, -1].double())


def shares_record(share_EE: torch.Tensor, count_E: torch.Tensor) -> dict:
    """The manifest's ``routing.shares`` from ``share_EE[j, k]`` (the share of class ``j``'s
    tokens expert ``k`` wins) and each class's token count: by class, overall (token-weighted)
    and the outliers."""
    num_e = share_EE.shape[0]
    overall_E = (count_E[:, None] * share_EE).sum(0) / count_E.sum()
    off = share_EE.clone().fill_diagonal_(0)
    flagged = [k for k in range(num_e) if float(off[:, k].max()) > OUTLIER_OTHERS_SHARE]
    unrouted = [j for j in range(num_e) if float(share_EE[j, j]) < MIN_OWN_SHARE]
    return {
        "by_class": share_EE.tolist(),
        "overall": overall_E.tolist(),
        "outliers": flagged,
        "rule": f"an expert winning over {OUTLIER_OTHERS_SHARE:.0%} of another class's tokens",
        "unrouted": unrouted,
        "unrouted_rule": f"a class whose own expert wins under {MIN_OWN_SHARE:.0%} of its tokens "
        "(its statistics claim another domain's text, or the routers cannot tell it apart)",
    }
