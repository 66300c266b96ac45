"""Prototype: switching posteriors over the n-gram router's per-token evidence.

Loads an ``ngram`` DUME build (of this version: it asks the router for ``log_probs``), replaces its sequence scores by the posterior of a config —
``rho=R`` (the fixed-share filter with switch rate R; 0: the cumulative naive Bayes), ``mix=R1,..``
(the posterior averaged over those rates, ``switch_mixture_posterior``), with ``:beta=B`` (evidence
weighted by B) and ``:clip=C`` appended as wanted; several such posteriors pooled with fixed
weights, ``A:w=0.8|B:w=0.2`` (scores = log of the weighted sum of their posteriors) — and measures single-domain ppl against the
oracle, mixed-domain keep against the segment oracle, and how many tokens run a second expert.

Run: python scripts/switch_proto.py MODEL_DIR NAME=VALID ... --config rho=0 mix=0,1e-3:beta=0.2
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from proto_bench import ProtoBench, count_second_expert

from dume_dist.model.evaluate import load_causal_lm
from dume_dist.model.routing_dume import (
    _real_mask,
    switch_mixture_posterior,
)
from dume_dist.model.tokenizer import load_tokenizer


def parse_config(text: str) -> dict:
    """``rho=R`` (one rate), ``mix=R1,R2,...`` (the mixture over rates), with ``:beta=B``
    (evidence tempered by B), ``:clip=C`` (per-token evidence against an expert clipped at C
    nats) and ``:w=W`` (its weight in a pool) optionally appended; ``|`` separates the pooled
    posteriors."""
    return {"name": text, "parts": [_parse_part(p) for p in text.split("|")]}


def _parse_part(text: str) -> dict:
    out = {"rates": (0.0,), "beta": 1.0, "clip": None, "w": 1.0}
    for part in text.split(":"):
        key, value = part.split("=", 1)
        if key in ("rho", "mix"):
            out["rates"] = tuple(float(v) for v in value.split(","))
        elif key in ("beta", "clip", "w"):
            out[key] = float(value)
        else:
            raise ValueError(f"unknown config key {key!r}")
    return out


def _posterior(logp_BTE, real_BT, part, state):
    """One pooled part's log posterior [B, T, E] and its carried joint."""
    logp_BTE = logp_BTE * part["beta"]
    if part["clip"] is not None:  # no token says more than `clip` nats against an expert
        logp_BTE = (logp_BTE - logp_BTE.amax(-1, keepdim=True)).clamp_min(-part["clip"])
    joint = switch_mixture_posterior(logp_BTE, real_BT, part["rates"], state)
    return joint.logsumexp(dim=2), joint[:, -1]


def patch(model, parts):
    router = model.ngram_router

    def scores(ids_BT, real_BT=None, state=None):
        real_BT = _real_mask(ids_BT[..., None], real_BT)
        logp, prev, has_prev = router.log_probs(ids_BT, real_BT, state)
        logp_BTE = logp.permute(1, 2, 0)
        posts, joints = [], []
        for i, part in enumerate(parts):
            post, joint = _posterior(
                logp_BTE, real_BT, part, None if state is None else state["joints"][i]
            )
            posts.append(post + math.log(part["w"]))
            joints.append(joint)
        new_state = {
            "joints": joints,
            "last": torch.where(real_BT[:, -1], ids_BT[:, -1], prev[:, -1]),
            "has_last": has_prev[:, -1] | real_BT[:, -1],
        }
        post_BTE = torch.stack(posts).logsumexp(0)
        post_BTE = post_BTE - post_BTE.logsumexp(-1, keepdim=True)
        count_second_expert(model, post_BTE, real_BT)
        return post_BTE, new_state

    router.scores = scores
    router.two_experts = [0, 0]  # tokens whose second expert runs (k = 2), real tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--config", nargs="+", default=["rho=0", "rho=1e-3", "mix=0,1e-4,1e-3,1e-2"])
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = dict(d.split("=", 1) for d in args.data)
    data = {k: [v] for k, v in data.items()}
    tok = load_tokenizer(args.model, trust_remote_code=True)
    model = load_causal_lm(args.model)
    bench = ProtoBench.prepare(model, tok, data, args.eval_tokens, args.sequences)
    rows = []
    for config in map(parse_config, args.config):
        t0 = time.time()
        patch(model, config["parts"])
        keep = bench.single(model)
        two = model.ngram_router.two_experts
        two_single = two[0] / two[1]
        mixed = bench.mixed_keeps(model)
        row = {
            "config": config["name"],
            "single_keep": keep,
            "worst": min(keep.values()),
            "mixed_keep": mixed["routing"],
            "delay4": mixed["oracle, 4 tokens late"],
            "two_experts": {"single": two_single, "all": two[0] / two[1]},
        }
        rows.append(row)
        print(json.dumps(row), f"{time.time() - t0:.0f}s", flush=True)
    if args.out:
        open(args.out, "w").write(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
