"""Prototype: fixed-share (switching) posterior over the n-gram router's per-token evidence.

Loads an ``ngram`` DUME build, replaces its sequence scores by the fixed-share filter with switch
rate rho (rho = 0: today's cumulative naive Bayes), and measures single-domain ppl against the
oracle and mixed-domain keep against the segment oracle.

Run: python scripts/switch_proto.py MODEL_DIR NAME=VALID ... --rho 0 1e-3 1e-2
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from dume_dist.model.data import eval_windows, load_texts
from dume_dist.model.evaluate import evaluate_model, load_causal_lm
from dume_dist.model.mixed import (
    MixedSettings,
    domain_streams,
    evaluate_mixed,
    mixed_batch,
    oracle_nll,
)
from dume_dist.model.modeling_dume import _real_mask, ngram_log_probs, previous_real_tokens
from dume_dist.model.tokenizer import load_tokenizer


def fixed_share(logp_BTE, real_BT, rho, state=None):
    """Normalised log posterior [B, T, E] of the switching model, and the last one [B, E]."""
    batch, length, num = logp_BTE.shape
    if state is None:
        state = torch.full((batch, num), -math.log(num), dtype=torch.float64)
    a, b = 1.0 - rho, rho / (num - 1)
    m_EE = torch.full((num, num), b, dtype=torch.float64)
    m_EE.fill_diagonal_(a)
    p_BTE = (logp_BTE - logp_BTE.amax(dim=-1, keepdim=True)).exp()
    c = p_BTE[..., :, None] * m_EE  # alpha_t = A_t alpha_{t-1}
    eye = torch.eye(num, dtype=torch.float64)
    c = torch.where(real_BT[..., None, None], c, eye)
    k = 1
    while k < length:
        nxt = c.clone()
        nxt[:, k:] = c[:, k:] @ c[:, :-k]
        c = nxt / nxt.amax(dim=(-2, -1), keepdim=True)
        k *= 2
    alpha = (c @ state.exp()[:, None, :, None]).squeeze(-1)
    log_alpha = alpha.clamp_min(1e-300).log()
    log_alpha = log_alpha - log_alpha.logsumexp(dim=-1, keepdim=True)
    return log_alpha, log_alpha[:, -1]


def patch(model, rho):
    router = model.ngram_router

    def scores(ids_BT, real_BT=None, state=None):
        real_BT = _real_mask(ids_BT[..., None], real_BT)
        uni, ctx, big, denom = router._tables()
        prev, has_prev = previous_real_tokens(ids_BT, real_BT, state)
        logp = ngram_log_probs(
            uni, ctx, big, prev, ids_BT, has_prev, router.mu, router.alpha, denom
        )
        logp_BTE = logp.permute(1, 2, 0)
        post, last = fixed_share(logp_BTE, real_BT, rho, None if state is None else state["cum"])
        new_state = {
            "cum": last,
            "last": torch.where(real_BT[:, -1], ids_BT[:, -1], prev[:, -1]),
            "has_last": has_prev[:, -1] | real_BT[:, -1],
        }
        return post, new_state

    router.scores = scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--rho", type=float, nargs="+", default=[0.0, 1e-3, 1e-2])
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = dict(d.split("=", 1) for d in args.data)
    data = {k: [v] for k, v in data.items()}
    tok = load_tokenizer(args.model, trust_remote_code=True)
    model = load_causal_lm(args.model)
    names = list(model.config.expert_names)
    cached = {
        d: list(eval_windows(tok, load_texts(p), 256, 8, args.eval_tokens)) for d, p in data.items()
    }
    batches = {d: (lambda b=b: b) for d, b in cached.items()}
    forced = {d: names.index(d) for d in data}
    oracle = {d: r.ppl for d, r in evaluate_model(model, batches, forced=forced).items()}
    settings = MixedSettings(sequences=args.sequences, delays=(4,))
    mbatch = mixed_batch(domain_streams(tok, data), settings)
    onll = oracle_nll(model, mbatch, settings)
    rows = []
    for rho in args.rho:
        t0 = time.time()
        patch(model, rho)
        ppl = {d: r.ppl for d, r in evaluate_model(model, batches).items()}
        keep = {d: oracle[d] / ppl[d] for d in ppl}
        mixed = evaluate_mixed(model, mbatch, settings, oracle=onll)
        row = {
            "rho": rho,
            "single_keep": keep,
            "worst": min(keep.values()),
            "mixed_keep": mixed["keep"]["routing"],
            "delay4": mixed["keep"]["oracle, 4 tokens late"],
        }
        rows.append(row)
        print(json.dumps(row), f"{time.time() - t0:.0f}s", flush=True)
    if args.out:
        open(args.out, "w").write(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
