"""Prototype (a bound, not a router to ship): routing on the experts' own likelihoods.

Every router measured for mixed text so far scores each token by n-gram statistics of the
contributors' text. This one asks the experts themselves: before each forward it runs the model
once per expert with every layer forced to that expert, reads ``e_t(j) = log p_j(x_t | x_<t)``
(the probability expert j, as a whole language model on the shared backbone, gave the token
that came), and feeds those numbers to the same switching filter `follow` uses
(``switch_mixture_posterior``: rates averaged, evidence scaled by β). Position t is routed on
x_1..x_t only, so it is causal; it costs E extra forwards, so it is a ceiling for what evidence
from the experts could give, not a speed any product would accept.

``src=expert`` (the experts' likelihoods), ``src=ngram`` (the build's own n-gram evidence, the
`follow` default's) or ``src=both`` (their sum, each with its own scale: ``beta`` for the
experts', ``nbeta`` for the n-grams'); ``mix=R1,R2,..`` the switch rates; ``beta=B``.

Run: python scripts/expert_evidence_proto.py MODEL_DIR OUT.json NAME=TRAIN,VALID ...
       --config src=expert:mix=0,1e-4,1e-3,1e-2:beta=1
"""

from __future__ import annotations

import json
import time

import torch
from proto_bench import ProtoBench, count_second_expert, proto_parser

from dume_dist.model.evaluate import load_causal_lm
from dume_dist.model.routing_dume import _real_mask, switch_mixture_posterior
from dume_dist.model.tokenizer import load_tokenizer


def parse_config(text: str) -> dict:
    out = {"name": text, "src": "expert", "rates": (0.0, 1e-4, 1e-3, 1e-2), "beta": 1.0,
           "nbeta": 0.3}  # fmt: skip
    for part in text.split(":"):
        key, value = part.split("=", 1)
        if key == "src":
            if value not in ("expert", "ngram", "both"):
                raise ValueError(f"src must be expert, ngram or both, got {value!r}")
            out["src"] = value
        elif key in ("mix", "rho"):
            out["rates"] = tuple(float(v) for v in value.split(","))
        elif key in ("beta", "nbeta"):
            out[key] = float(value)
        else:
            raise ValueError(f"unknown config key {key!r}")
    return out


def expert_evidence(model, ids_BT: torch.Tensor) -> torch.Tensor:
    """``log p_j(x_t | x_<t)`` [B, T, E] under each expert forced in every layer (0 at t = 0)."""
    num = len(model.config.expert_names)
    out = torch.zeros(*ids_BT.shape, num, dtype=torch.float64)
    for j in range(num):
        model.set_forced_expert(j)
        try:
            logits = model(input_ids=ids_BT, use_cache=False).logits
        finally:
            model.set_forced_expert(None)
        logp = logits[:, :-1].float().log_softmax(-1)
        out[:, 1:, j] = logp.gather(-1, ids_BT[:, 1:, None])[..., 0].double()
    return out


def patch(model, config: dict) -> None:
    router = model.ngram_router
    inside = [False]

    def scores(ids_BT, real_BT=None, state=None):
        real_BT = _real_mask(ids_BT[..., None], real_BT)
        num = len(model.config.expert_names)
        if inside[0]:  # the forced forwards below: their routing is not read
            return torch.zeros(*ids_BT.shape, num, dtype=torch.float64), None
        if state is not None:
            raise ValueError("the prototype scores whole sequences only")
        inside[0] = True
        try:
            with torch.no_grad():
                ev = expert_evidence(model, ids_BT) if config["src"] != "ngram" else 0.0
        finally:
            inside[0] = False
        logp = 0.0
        if config["src"] != "expert":
            logp_EBT, _, _ = router.log_probs(ids_BT, real_BT, None)
            logp = logp_EBT.permute(1, 2, 0) * config["nbeta"]
        evidence = (ev * config["beta"] + logp) * real_BT[..., None]
        joint = switch_mixture_posterior(evidence, real_BT, config["rates"], None)
        post = joint.logsumexp(dim=2)
        post = post - post.logsumexp(-1, keepdim=True)
        count_second_expert(model, post, real_BT)
        return post, None

    router.scores = scores
    router.two_experts = [0, 0]


def main():
    ap = proto_parser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    valid = {}
    for item in args.data:
        name, paths = item.split("=", 1)
        valid[name] = [paths.split(",")[-1]]
    tok = load_tokenizer(args.model_dir, trust_remote_code=True)
    model = load_causal_lm(args.model_dir)
    bench = ProtoBench.prepare(model, tok, valid, args.tokens, args.sequences)
    rows = []
    for config in map(parse_config, args.config):
        t0 = time.time()
        patch(model, config)
        keep = bench.single(model)
        single_two = model.ngram_router.two_experts[0] / model.ngram_router.two_experts[1]
        mixed = bench.mixed_keeps(model)
        row = {
            "config": config["name"],
            "keep": keep,
            "worst": min(keep.values()),
            "mixed": mixed["routing"],
            "delay4": mixed["oracle, 4 tokens late"],
            "two_experts_single": single_two,
        }
        rows.append(row)
        print(json.dumps(row), f"{time.time() - t0:.0f}s", flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
