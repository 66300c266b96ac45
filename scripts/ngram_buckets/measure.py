"""Routing quality of dume_dist's n-gram router vs training size N and bucket count H.

Run after ``prep.py`` (same ``BUCKETS_DIR``): ``NS=500000,5000000,20000000 HBITS=18,20,22,24
python scripts/ngram_buckets/measure.py`` writes ``$BUCKETS_DIR/results.json`` (docs/routing.md,
"Bucket count"; the committed run is docs/results/ngram-buckets.json)."""

import json
import os
import time

import numpy as np
import torch

from dume_dist.model import routing_switch
from dume_dist.model.routing_dume import ngram_bucket, ngram_log_probs, previous_real_tokens

torch.set_num_threads(1)
ROOT = os.environ.get("BUCKETS_DIR", ".cache/ngram_buckets")
V = 32000
DOMAINS = ["go", "pydoc", "french", "gcide"]
NS = [int(x) for x in os.environ.get("NS", "500000,5000000,20000000").split(",")]
HS = [
    1 << int(x) for x in os.environ.get("HBITS", "18,20,22,24").split(",")
]  # 2^24: extra reference point
MU, ALPHA = 31.6, 0.1
EXTRA_MU = [100.0, 1000.0]
T, WIN_PER_DOM = 256, 250
FOLLOW = dict(switch_rates=(0.0, 1e-4, 1e-3, 1e-2), evidence_scale=0.2)
t0 = time.time()


def log(*a):
    print(*a, f"[{time.time() - t0:.0f}s]", flush=True)


def load(name, part):
    z = np.load(f"{ROOT}/data_{name}_{part}.npz")
    return z["ids"].astype(np.int64), z["offs"]


train, held = {}, {}
for d in DOMAINS:
    train[d] = load(d, "train")
    held[d] = load(d, "held")
    log(d, "train tokens", train[d][0].size, "held tokens", held[d][0].size)


def pairs(ids, offs, n):
    """(prev, cur) bigrams within documents among the first n tokens."""
    ids = ids[:n]
    start = np.zeros(ids.size, dtype=bool)
    start[offs[:-1][offs[:-1] < ids.size]] = True
    keep = ~start[1:]
    return ids[:-1][keep], ids[1:][keep]


# ---- evaluation windows (same for every configuration) ----
rng = np.random.default_rng(0)
win_ids, win_dom = [], []
for k, d in enumerate(DOMAINS):
    ids = held[d][0]
    for s in np.linspace(0, ids.size - T, WIN_PER_DOM).astype(np.int64):
        win_ids.append(ids[s : s + T])
        win_dom.append(k)
win_ids = torch.from_numpy(np.stack(win_ids))
win_dom = torch.tensor(win_dom)
# mixed sequences: 4 segments of 64 tokens, a random order of the 4 domains, random offsets
MIX, SEG = 400, 64
mix_ids, mix_truth = [], []
for _i in range(MIX):
    order = rng.permutation(4)
    seq, tr = [], []
    for k in order:
        ids = held[DOMAINS[k]][0]
        s = rng.integers(0, ids.size - SEG)
        seq.append(ids[s : s + SEG])
        tr += [k] * SEG
    mix_ids.append(np.concatenate(seq))
    mix_truth.append(tr)
mix_ids = torch.from_numpy(np.stack(mix_ids))
mix_truth = torch.tensor(mix_truth)
# held-out bigram keys per domain (for the false-hit diagnostic): the windows' bigrams
held_keys = {}
for k, d in enumerate(DOMAINS):
    w = win_ids[win_dom == k].numpy()
    held_keys[d] = (w[:, :-1] * V + w[:, 1:]).ravel()


def evaluate(uni, ctx, big, mu):
    out = {}
    for tag, ids_BT in (("win", win_ids), ("mix", mix_ids)):
        real = torch.ones_like(ids_BT, dtype=torch.bool)
        prev, has_prev = previous_real_tokens(ids_BT, real)
        logp_BTE = ngram_log_probs(uni, ctx, big, prev, ids_BT, has_prev, mu, ALPHA).permute(
            1, 2, 0
        )
        for post, kw in (("cum", {}), ("follow", FOLLOW)):
            sc, _ = routing_switch.sequence_scores(logp_BTE, real, **kw)
            lp = sc.log_softmax(-1)
            pred = sc.argmax(-1)
            if tag == "win":
                truth = win_dom[:, None].expand_as(pred)
                r = {}
                for k, d in enumerate(DOMAINS):
                    m = win_dom == k
                    ok = (pred[m] == truth[m]).double()
                    r[d] = {
                        "acc": ok.mean().item(),
                        "acc_0_15": ok[:, :16].mean().item(),
                        "mean_logpost_true": lp[m][..., k].mean().item(),
                        "confused_with": {
                            DOMAINS[j]: (pred[m] == j).double().mean().item()
                            for j in range(4)
                            if j != k
                        },
                    }
                ok = (pred == truth).double()
                r["all"] = {
                    "acc": ok.mean().item(),
                    "acc_0_15": ok[:, :16].mean().item(),
                    "mean_logpost_true": lp.gather(-1, truth[..., None]).mean().item(),
                }
                out[post] = r
            else:
                ok = (pred == mix_truth).double()
                within = torch.arange(ids_BT.shape[1]) % SEG
                out[f"mix_{post}"] = {
                    "acc": ok.mean().item(),
                    "acc_seg_pos_16_63": ok[:, within >= 16].mean().item(),
                    "acc_seg_pos_0_15": ok[:, within < 16].mean().item(),
                }
    return out


results = {
    "config": {
        "V": V,
        "mu": MU,
        "alpha": ALPHA,
        "window": T,
        "windows_per_domain": WIN_PER_DOM,
        "mixed_sequences": MIX,
        "segment": SEG,
        "follow": {"switch_rates": list(FOLLOW["switch_rates"]), "evidence_scale": 0.2},
        "Ns_requested": NS,
        "Hs": HS,
    },
    "data": {
        d: {"train_tokens": int(train[d][0].size), "held_tokens": int(held[d][0].size)}
        for d in DOMAINS
    },
    "runs": [],
}
for N in NS:
    uni_l, ctx_l, pr = [], [], {}
    ntok = {}
    for d in DOMAINS:
        ids, offs = train[d]
        n = min(N, ids.size)
        ntok[d] = int(n)
        p, c = pairs(ids, offs, n)
        pr[d] = (torch.from_numpy(p), torch.from_numpy(c))
        uni_l.append(torch.bincount(torch.from_numpy(ids[:n]), minlength=V).double())
        ctx_l.append(torch.bincount(pr[d][0], minlength=V).double())
    uni, ctx = torch.stack(uni_l), torch.stack(ctx_l)
    # distinct bigrams
    uniq = {d: np.unique(pr[d][0].numpy() * V + pr[d][1].numpy()) for d in DOMAINS}
    log("N", N, {d: (ntok[d], uniq[d].size) for d in DOMAINS})
    for H in HS:
        big = torch.stack(
            [torch.bincount(ngram_bucket(*pr[d], H), minlength=H).double() for d in DOMAINS]
        )
        coll, fill, false_hit = {}, {}, {}
        for j, d in enumerate(DOMAINS):
            u = torch.from_numpy(uniq[d])
            b = ngram_bucket(u // V, u % V, H)
            bc = torch.bincount(b, minlength=H)
            coll[d] = (bc[b] > 1).double().mean().item()
            fill[d] = (bc > 0).double().mean().item()
            # of held-out bigrams of each domain e unseen by expert d: share landing on a nonzero bucket
            false_hit[d] = {}
            for e in DOMAINS:
                k = held_keys[e]
                unseen = ~np.isin(k, uniq[d])
                kk = torch.from_numpy(k[unseen])
                hit = (
                    (big[j][ngram_bucket(kk // V, kk % V, H)] > 0).double().mean().item()
                    if kk.numel()
                    else 0.0
                )
                false_hit[d][e] = {
                    "unseen_frac": float(unseen.mean()),
                    "nonzero_bucket_frac_of_unseen": hit,
                }
        maxc = {
            d: {
                "unigram": uni[j].max().item(),
                "context": ctx[j].max().item(),
                "bucket": big[j].max().item(),
            }
            for j, d in enumerate(DOMAINS)
        }
        mus = [MU] + (EXTRA_MU if N == NS[-1] and H in (1 << 18, 1 << 22) else [])
        for mu in mus:
            ev = evaluate(uni, ctx, big, mu)
            run = {
                "N": N,
                "H": H,
                "mu": mu,
                "train_tokens": ntok,
                "distinct_bigrams": {d: int(uniq[d].size) for d in DOMAINS},
                "collision_frac": coll,
                "bucket_fill": fill,
                "false_hit": false_hit,
                "table_bytes_fp64": H * 8,
                "max_counts": maxc,
                **ev,
            }
            results["runs"].append(run)
            log(
                f"N={N} H=2^{H.bit_length() - 1} mu={mu}",
                "cum",
                round(ev["cum"]["all"]["acc"], 4),
                "follow",
                round(ev["follow"]["all"]["acc"], 4),
                "mix",
                round(ev["mix_follow"]["acc"], 4),
                "coll",
                {d: round(v, 3) for d, v in coll.items()},
            )
        json.dump(results, open(f"{ROOT}/" + os.environ.get("OUT", "results.json"), "w"), indent=1)
log("done")
