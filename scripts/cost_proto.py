"""Prototype: a cost-aware routing decision from held-out cross-expert losses (docs/routing.md,
"Tables from every sent token; two more ideas that did not pay").

On one n-gram DUME build (MODEL_DIR: its tokenizer, expert order and mu): bigram tables from each
contributor's fit documents (``split_holdout``, 90%), and from its held-out documents (10%) the
cost statistics a contributor would send, 2E sums: C[d][j] = sum_t P_t(j) (l_j - l_d) /
sum_t P_t(j), P_t the `follow` filter's posterior on d's held-out text and l_j the loss with every
layer forced to expert j. Routing scores: log P(j) + s * log kappa_j, kappa_j =
sum_{i!=j} P(i) C[j][i] / sum_{i!=j} P(i) (for two candidates and s = 1, the Bayes decision).
Measures single-domain and mixed keep as scripts/proto_bench.py does.

Run: python scripts/cost_proto.py MODEL_DIR OUT.json NAME=TRAIN,VALID ... \
         --config beta=0.2 beta=0.2:s=1 beta=0.6:s=0.5
"""

from __future__ import annotations

import json
import time

import torch
from proto_bench import ProtoBench, proto_parser
from subtopic_proto import (
    Components,
    component_logp,
    domain_filter,
    load_build,
    nll,
    parse_config,
    routed,
    set_gates,
)

from dume_dist.model.build import split_holdout
from dume_dist.model.data import eval_windows, load_texts
from dume_dist.model.routing_dume import _real_mask


def posterior(tables, mu, cfg, share, ids, real):
    lp = component_logp(tables, mu, ids, real) * real[..., None, None] * cfg["beta"]
    return domain_filter(lp, real, cfg["rates"], 0.05, share)


def forced_losses(model, windows, E):
    out = []
    for ids, mask in windows:
        real = mask.bool()
        per = []
        for j in range(E):
            model.set_forced_expert(j)
            per.append(nll(model, ids, real))
        model.set_forced_expert(None)
        out.append((ids, real, torch.stack(per, -1).double()))  # [B, T-1, E]
    return out


def cost_matrix(held, order, tables, mu, cfg, share, floor):
    E = len(order)
    num = torch.zeros(E, E, dtype=torch.float64)
    den = torch.zeros(E, E, dtype=torch.float64)
    for d, items in held.items():
        me = order.index(d)
        for ids, real, loss in items:
            P = posterior(tables, mu, cfg, share, ids, real).exp()[:, :-1]  # [B, T-1, E]
            m = real[:, 1:, None].double()
            diff = loss - loss[..., me : me + 1]
            num[me] += (P * diff * m).sum((0, 1))
            den[me] += (P * m).sum((0, 1))
    C = num / den.clamp_min(1e-12)
    return C.clamp_min(floor), num, den


def install(model, tables, mu, cfg, C, s, counter):
    router = model.ngram_router
    share = tables[3] / tables[3].sum(1, keepdim=True)
    E = C.shape[0]
    off = ~torch.eye(E, dtype=torch.bool)
    logC = C.log()
    set_gates(model, cfg)

    def scores(ids_BT, real_BT=None, state=None):
        real_BT = _real_mask(ids_BT[..., None], real_BT)
        post = posterior(tables, mu, cfg, share, ids_BT, real_BT)
        if s:
            # log kappa_j = lse_{i!=j}(log P(i) + log C[j][i]) - lse_{i!=j}(log P(i))
            lp = post[..., None, :].expand(*post.shape, E)  # [..., j, i]
            neg = torch.tensor(-torch.inf, dtype=post.dtype)
            a = torch.where(off, lp + logC, neg).logsumexp(-1)
            b = torch.where(off, lp, neg).logsumexp(-1)
            post = post + s * (a - b)
        return routed(post, ids_BT, real_BT, cfg, counter)

    router.scores = scores


def main():
    ap = proto_parser()
    ap.add_argument("--held-tokens", type=int, default=65536)
    ap.add_argument("--floor", type=float, default=0.005)
    args = ap.parse_args()
    paths, tok, model, order, vocab, mu = load_build(args.model_dir, args.data)
    fit, heldout = {}, {}
    for n in order:
        fit[n], heldout[n] = split_holdout(load_texts(paths[n][0]), 0.1, n)
    comps = Components(tok, order, fit, vocab, mu, chunk=64, em=0)
    tables = comps(1)
    share = tables[3] / tables[3].sum(1, keepdim=True)
    t0 = time.time()
    held = {
        n: forced_losses(
            model, list(eval_windows(tok, heldout[n], 256, 8, args.held_tokens)), len(order)
        )
        for n in order
    }
    ntok = {n: sum(int(r[:, 1:].sum()) for _, r, _ in held[n]) for n in order}
    print("held-out tokens", ntok, f"{time.time() - t0:.0f}s", flush=True)
    valid = {n: [paths[n][1]] for n in paths}
    bench = ProtoBench.prepare(model, tok, valid, args.tokens, args.sequences)
    rows = []
    for text in args.config:
        kv = dict(x.split("=", 1) for x in text.split(":"))
        s = float(kv.pop("s", 0))
        floor = float(kv.pop("floor", args.floor))
        cfg = parse_config(":".join(f"{k}={v}" for k, v in kv.items()) or "k=1")
        C, num, den = cost_matrix(held, order, tables, mu, cfg, share, floor)
        counter, t0 = [0, 0], time.time()
        install(model, tables, mu, cfg, C, s, counter)
        keep = bench.single(model)
        row = {"config": text, "mu": mu, "C": C.tolist(), "den": den.tolist(), "keep": keep,
               "worst": min(keep.values()), "two_experts": counter[0] / max(counter[1], 1),
               "mixed": bench.mixed_keeps(model)["routing"]}  # fmt: skip
        rows.append(row)
        print(text, f"worst {row['worst']:.4f}", {k: round(v, 4) for k, v in keep.items()},
              "mixed", {k: round(v, 3) for k, v in row["mixed"].items()},
              f"two {row['two_experts']:.3f}", f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
        print("C", [[round(x, 3) for x in r] for r in C.tolist()], flush=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "held_tokens": ntok}, f, indent=1)


if __name__ == "__main__":
    main()
