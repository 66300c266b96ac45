"""Prototype: higher-order n-gram evidence in the `follow` filter.

Counts unigrams, bigrams, trigrams and 4-grams of each domain's training text (hashed into 2^22
buckets; the tokenizer and expert order of MODEL_DIR, an n-gram DUME build), and routes with a
Dirichlet chain ``p_n = (c_n + mu * p_{n-1}) / (context count + mu)`` down to the smoothed unigram
(mu the build's μ; ``:mu3=`` for the orders above 2), its log-likelihoods weighted by ``beta``
into the posterior averaged over switch rates (``switch_mixture_posterior``). Measures
single-domain keep against the oracle and mixed-domain keep against the segment oracle, as
``switch_proto.py`` does; bigrams (n=2) from the same counts are the comparison.

Run: python scripts/ngram_order_proto.py MODEL_DIR OUT.json NAME=TRAIN,VALID ... \
         --config n=2:beta=0.2 n=3:beta=0.5 n=4:beta=0.4:mu3=100
"""

import argparse
import json
import time

import torch
from proto_bench import ProtoBench

from dume_dist.model.data import load_texts
from dume_dist.model.evaluate import load_causal_lm
from dume_dist.model.routing_dume import _real_mask, ngram_bucket, previous_real_tokens
from dume_dist.model.routing_switch import switch_mixture_posterior
from dume_dist.model.tokenizer import load_tokenizer

H = 1 << 22
P1, P2 = 1_000_003, 999_983
ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("out")
ap.add_argument("data", nargs="+")
ap.add_argument("--config", nargs="+", default=["n=2:beta=0.2", "n=3:beta=0.2"])
args = ap.parse_args()
model_dir, out, configs = args.model_dir, args.out, args.config
paths = {d.split("=", 1)[0]: d.split("=", 1)[1].split(",") for d in args.data}
names = list(paths)
torch.set_num_threads(1)
tok = load_tokenizer(model_dir, trust_remote_code=True)
model = load_causal_lm(model_dir)
order = list(model.config.expert_names)
V = model.ngram_router.unigram_counts.shape[1]
E = len(order)
uni = torch.zeros(E, V, dtype=torch.float64)
ctx1 = torch.zeros(E, V, dtype=torch.float64)
big = torch.zeros(E, H, dtype=torch.float64)
ctx2 = torch.zeros(E, H, dtype=torch.float64)
tri = torch.zeros(E, H, dtype=torch.float64)
ctx3 = torch.zeros(E, H, dtype=torch.float64)
quad = torch.zeros(E, H, dtype=torch.float64)
P3 = 1_000_033


def h4(a, b, c, d):
    return (((a * P1 + b) * P2 + c) * P3 + d) % H


def h2(a, b):  # the router's own bigram hash
    return ngram_bucket(a, b, H)


def h3(a, b, c):
    return ((a * P1 + b) * P2 + c) % H


for j, n in enumerate(order):
    for doc in load_texts(paths[n][0]):
        ids = torch.tensor(tok(doc)["input_ids"], dtype=torch.long)
        if len(ids) == 0:
            continue
        uni[j].index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
        if len(ids) > 1:
            ctx1[j].index_add_(0, ids[:-1], torch.ones(len(ids) - 1, dtype=torch.float64))
            big[j].index_add_(
                0, h2(ids[:-1], ids[1:]), torch.ones(len(ids) - 1, dtype=torch.float64)
            )
        if len(ids) > 2:
            ctx2[j].index_add_(
                0, h2(ids[:-2], ids[1:-1]), torch.ones(len(ids) - 2, dtype=torch.float64)
            )
            tri[j].index_add_(
                0, h3(ids[:-2], ids[1:-1], ids[2:]), torch.ones(len(ids) - 2, dtype=torch.float64)
            )
        if len(ids) > 3:
            ctx3[j].index_add_(
                0, h3(ids[:-3], ids[1:-2], ids[2:-1]), torch.ones(len(ids) - 3, dtype=torch.float64)
            )
            quad[j].index_add_(
                0,
                h4(ids[:-3], ids[1:-2], ids[2:-1], ids[3:]),
                torch.ones(len(ids) - 3, dtype=torch.float64),
            )
print("counted", uni.sum(1).tolist(), flush=True)
alpha, mu = 0.1, float(model.ngram_router.mu)
q_EV = (uni + alpha) / (uni.sum(1, keepdim=True) + alpha * V)


def logp(ids_BT, real_BT, state, order_n, mu3):
    prev, has_prev = previous_real_tokens(ids_BT, real_BT, state)
    # the real token before prev (within this call; carried for decoding not needed here)
    prev2, has_prev2 = previous_real_tokens(prev, has_prev & real_BT, None)
    q = q_EV[:, ids_BT]
    p2 = torch.where(has_prev, (big[:, h2(prev, ids_BT)] + mu * q) / (ctx1[:, prev] + mu), q)
    if order_n == 2:
        return p2.log()
    p3 = (tri[:, h3(prev2, prev, ids_BT)] + mu3 * p2) / (ctx2[:, h2(prev2, prev)] + mu3)
    p3 = torch.where(has_prev & has_prev2, p3, p2)
    if order_n == 3:
        return p3.log()
    prev3, has_prev3 = previous_real_tokens(prev2, has_prev2 & has_prev & real_BT, None)
    p4 = (quad[:, h4(prev3, prev2, prev, ids_BT)] + mu3 * p3) / (
        ctx3[:, h3(prev3, prev2, prev)] + mu3
    )
    return torch.where(has_prev & has_prev2 & has_prev3, p4, p3).log()


def patch(cfg):
    router = model.ngram_router

    def scores(ids_BT, real_BT=None, state=None):
        real_BT = _real_mask(ids_BT[..., None], real_BT)
        lp = (
            logp(ids_BT, real_BT, state, cfg["n"], cfg["mu3"]).permute(1, 2, 0) * real_BT[..., None]
        )
        joint = switch_mixture_posterior(lp * cfg["beta"], real_BT, cfg["rates"], None)
        post = joint.logsumexp(2)
        top2 = post.topk(2, -1).values
        second = torch.sigmoid(top2[..., 1] - top2[..., 0]) >= model.config.routing["min_weight"]
        router.two[0] += int(second[real_BT].sum())
        router.two[1] += int(real_BT.sum())
        return post, {"last": ids_BT[:, -1], "has_last": real_BT[:, -1] | True}

    router.scores = scores
    router.two = [0, 0]


bench = ProtoBench.prepare(model, tok, {n: [paths[n][1]] for n in names}, 8192, 32)
rows = []
for c in configs:
    kv = dict(x.split("=") for x in c.split(":"))
    cfg = {
        "n": int(kv.get("n", 2)),
        "beta": float(kv.get("beta", 0.2)),
        "mu3": float(kv.get("mu3", mu)),
        "rates": tuple(float(r) for r in kv.get("mix", "0,1e-4,1e-3,1e-2").split(",")),
    }
    t0 = time.time()
    patch(cfg)
    keep = bench.single(model)
    two = model.ngram_router.two[0] / model.ngram_router.two[1]
    row = {
        "config": c,
        "keep": keep,
        "worst": min(keep.values()),
        "mixed": bench.mixed_keeps(model)["routing"],
        "two": two,
    }
    rows.append(row)
    print(
        json.dumps(
            {
                "config": c,
                "worst": round(row["worst"], 4),
                "keep": {k: round(v, 4) for k, v in keep.items()},
                "mixed": {k: round(v, 3) for k, v in row["mixed"].items()},
                "two": round(two, 3),
            }
        ),
        f"{time.time() - t0:.0f}s",
        flush=True,
    )
json.dump(rows, open(out, "w"), indent=1)
