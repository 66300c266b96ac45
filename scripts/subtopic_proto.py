"""Prototype: sub-topic components, repetition-weighted evidence and gate temperature in `follow`.

Three inference-side ideas for the mixed-text target (docs/routing.md), on one n-gram DUME build
(MODEL_DIR; its tokenizer, expert order and μ):

* ``k=K``: each contributor's training text is cut into chunks of ``--chunk`` tokens, clustered
  into K components (k-means on the chunks' square-root unigram profiles, then hard EM on the
  components' bigram likelihoods), and each component gets a bigram table (2^22 buckets, the
  router's hash and smoothing). The filter's state is (switch rate, domain, component): the
  domain switches at the rate (averaged over rates as `follow`), the component within a domain
  at ``sigma`` (to each component by its share of the domain's tokens); routing reads the marginal
  over domains. K=1 is `follow`'s filter. What a contributor would send stays additive (K tables
  of its own text).
* ``win=W:gamma=G``: a token's evidence is weighted by ``(1 + c)^-G``, c the number of times its
  bigram occurred in the W tokens before it (repeated bigrams are correlated evidence).
* ``temp=T``: the routing weights are the softmax of the log posterior over T (the blocks'
  router temperature); ``mw=X`` their ``min_weight``.
* ``dz=M``, ``clip=C``, ``pow=P``: a token's evidence against a domain is a function of its gap
  g to the best one: max(0, g - M), min(g, C) or g^P (before ``beta``).
* ``bu=X``: the unigram part of each token's evidence (log q(v)) weighted X, the rest
  (log p(v|u) - log q(v)) ``beta`` (hidden_evidence_proto.py has the same on one table).
* ``n0=N:t0=T``: a cold start: the log posterior of each sequence's first N positions divided by
  T (flatter, so the second expert mixes in where there is little evidence yet).

Every config: ``beta`` (evidence scale), ``mix`` (switch rates). Measures single-domain keep
against the oracle (windows of 256 spread over each ``valid.txt``), mixed-domain keep against the
segment oracle (``dume eval --mixed``'s sequences, seed 0) and the share of tokens whose second
expert runs. ``--attribution`` adds, per domain, the excess loss over the oracle (nats per token)
split by the expert the router put first, and that expert's share of the tokens.

Run: python scripts/subtopic_proto.py MODEL_DIR OUT.json NAME=TRAIN,VALID ... \
         --config k=1:beta=0.2 k=4:beta=0.5 k=1:beta=0.5:win=64
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F
from proto_bench import ProtoBench, proto_parser

from dume_dist.model.data import load_texts
from dume_dist.model.evaluate import load_causal_lm
from dume_dist.model.routing_dume import _real_mask, ngram_bucket, previous_real_tokens
from dume_dist.model.tokenizer import load_tokenizer

BUCKETS = 1 << 22
ALPHA = 0.1


def parse_args():
    ap = proto_parser()
    ap.add_argument("--chunk", type=int, default=64, help="tokens per clustered chunk")
    ap.add_argument("--em", type=int, default=3, help="hard-EM passes after k-means")
    ap.add_argument("--attribution", action="store_true")
    return ap.parse_args()


class Components:
    """Per-domain component bigram tables [E, K, ...] of the training text, built on demand."""

    def __init__(self, tok, order, docs, vocab, mu, chunk, em):
        """``docs``: each domain's documents (texts)."""
        self.order, self.vocab, self.mu, self.chunk, self.em = order, vocab, mu, chunk, em
        self.ids = {
            n: [torch.tensor(tok(d)["input_ids"], dtype=torch.long) for d in docs[n]] for n in order
        }
        self.built: dict[int, tuple] = {}

    def chunks(self, name):
        pieces = (ids.split(self.chunk) for ids in self.ids[name])
        return [c for piece in pieces for c in piece if len(c) >= 2]

    def tables(self, chunks, assign, k):
        uni = torch.zeros(k, self.vocab, dtype=torch.float64)
        ctx = torch.zeros(k, self.vocab, dtype=torch.float64)
        big = torch.zeros(k, BUCKETS, dtype=torch.float64)
        for c, a in zip(chunks, assign.tolist()):
            one = torch.ones(len(c), dtype=torch.float64)
            uni[a].index_add_(0, c, one)
            ctx[a].index_add_(0, c[:-1], one[:-1])
            big[a].index_add_(0, ngram_bucket(c[:-1], c[1:], BUCKETS), one[:-1])
        q = (uni + ALPHA) / (uni.sum(1, keepdim=True) + ALPHA * self.vocab)
        return q, ctx, big, uni.sum(1)

    def chunk_loglik(self, chunks, q, ctx, big):
        out = torch.empty(len(chunks), q.shape[0], dtype=torch.float64)
        for i, c in enumerate(chunks):
            a, b = c[:-1], c[1:]
            p = (big[:, ngram_bucket(a, b, BUCKETS)] + self.mu * q[:, b]) / (ctx[:, a] + self.mu)
            out[i] = p.log().sum(1) + q[:, c[0]].log()
        return out

    def cluster(self, name, k, seed=0):
        chunks = self.chunks(name)
        assign = torch.zeros(len(chunks), dtype=torch.long)
        if k > 1:
            X = torch.zeros(len(chunks), self.vocab)
            for i, c in enumerate(chunks):
                X[i].index_add_(0, c, torch.ones(len(c)))
            X = (X / X.sum(1, keepdim=True)).sqrt()
            g = torch.Generator().manual_seed(seed)
            C = X[torch.randperm(len(chunks), generator=g)[:k]].clone()
            for _ in range(20):
                assign = (X @ C.T).argmax(1)
                for j in range(k):
                    if (assign == j).any():
                        C[j] = X[assign == j].mean(0)
                        C[j] /= C[j].norm()
            for _ in range(self.em):
                new = self.chunk_loglik(chunks, *self.tables(chunks, assign, k)[:3]).argmax(1)
                done = bool((new == assign).all())
                assign = new
                if done:
                    break
            print(
                name, f"k={k}: chunks per component", torch.bincount(assign, minlength=k).tolist()
            )
        return self.tables(chunks, assign, k)

    def __call__(self, k):
        if k not in self.built:
            parts = [self.cluster(n, k) for n in self.order]
            self.built[k] = tuple(torch.stack([p[i] for p in parts]) for i in range(4))
        return self.built[k]


def component_logp(tables, mu, ids_BT, real_BT):
    """log p_{e,k}(token | previous real token) [B, T, E, K] (the unigram without a previous)."""
    q, ctx, big, _ = tables
    prev, has_prev = previous_real_tokens(ids_BT, real_BT, None)
    q_ = q[:, :, ids_BT]
    pair = (big[:, :, ngram_bucket(prev, ids_BT, BUCKETS)] + mu * q_) / (ctx[:, :, prev] + mu)
    return torch.where(has_prev, pair, q_).log().permute(2, 3, 0, 1)


def repetition_weight(ids_BT, real_BT, window, gamma):
    """(1 + c)^-gamma, c the occurrences of each position's bigram in the window before it."""
    prev, has_prev = previous_real_tokens(ids_BT, real_BT, None)
    key = torch.where(has_prev, ngram_bucket(prev, ids_BT, BUCKETS), -1 - ids_BT)
    i = torch.arange(ids_BT.shape[1])
    band = (i[None, :] < i[:, None]) & (i[None, :] >= i[:, None] - window)
    same = (key[:, :, None] == key[:, None, :]) & band & real_BT[:, None, :]
    return (1 + same.sum(-1).double()) ** (-gamma)


def domain_filter(logp_BTEK, real_BT, rates, sigma, share_EK):
    """Log posterior [B, T, E] over domains of the (rate, domain, component) chain, averaged over
    rates by their predictive likelihoods (one forward step per position)."""
    B, T, E, K = logp_BTEK.shape
    rho = torch.tensor(rates, dtype=torch.float64)[None, :, None, None]
    a = torch.full((B, len(rates), E, K), 1.0 / (len(rates) * E), dtype=torch.float64) * share_EK
    p = (logp_BTEK - logp_BTEK.amax(dim=(-2, -1), keepdim=True)).exp()
    out = torch.empty(B, T, E, dtype=torch.float64)
    for t in range(T):
        in_domain = a.sum(-1, keepdim=True)
        total = in_domain.sum(-2, keepdim=True)
        stay = (1 - sigma) * a + sigma * share_EK * in_domain
        pred = (1 - rho) * stay + rho / max(E - 1, 1) * share_EK * (total - in_domain)
        new = p[:, t, None] * pred
        a = torch.where(real_BT[:, t, None, None, None], new / new.sum((1, 2, 3), keepdim=True), a)
        out[:, t] = a.sum(dim=(1, 3))
    return out.clamp_min(1e-300).log()


def install(model, comps, cfg, counter):
    """Replace the n-gram router's sequence scores by the config's posterior."""
    router, mu = model.ngram_router, comps.mu
    tables = comps(cfg["k"])
    share = tables[3] / tables[3].sum(1, keepdim=True)
    set_gates(model, cfg)

    def scores(ids_BT, real_BT=None, state=None):
        real_BT = _real_mask(ids_BT[..., None], real_BT)
        lp = scaled(transformed(component_logp(tables, mu, ids_BT, real_BT), cfg), tables, ids_BT,
                    cfg)  # fmt: skip
        lp = lp * real_BT[..., None, None]
        if cfg["win"] > 0:
            lp = lp * repetition_weight(ids_BT, real_BT, cfg["win"], cfg["gamma"])[..., None, None]
        post = domain_filter(lp, real_BT, cfg["rates"], cfg["sigma"], share)
        if cfg["n0"]:  # a cold start: the first n0 positions' posterior flattened by t0
            post = torch.cat([post[:, : cfg["n0"]] / cfg["t0"], post[:, cfg["n0"] :]], dim=1)
        return routed(post, ids_BT, real_BT, cfg, counter)

    router.scores = scores


def scaled(logp_BTEK, tables, ids_BT, cfg):
    """Each token's evidence times ``beta``; with ``bu``, its unigram part log q(v) times ``bu``
    and the rest (log p(v|u) - log q(v)) times ``beta``."""
    if cfg["bu"] is None:
        return logp_BTEK * cfg["beta"]
    lq = tables[0][:, :, ids_BT].log().permute(2, 3, 0, 1)
    return (logp_BTEK - lq) * cfg["beta"] + lq * cfg["bu"]


def transformed(logp_BTEK, cfg):
    """Each token's evidence as a function of its gap to the best (domain, component), g >= 0:
    ``dz=M`` counts max(0, g - M) (a dead zone), ``clip=C`` min(g, C), ``pow=P`` g^P; without
    them the log-likelihoods as they are (only the gaps matter to the filter)."""
    if not (cfg["dz"] or cfg["clip"] or cfg["pow"] != 1.0):
        return logp_BTEK
    gap = logp_BTEK.amax(dim=(-2, -1), keepdim=True) - logp_BTEK
    if cfg["dz"]:
        gap = (gap - cfg["dz"]).clamp_min(0)
    if cfg["clip"]:
        gap = gap.clamp_max(cfg["clip"])
    return -gap.pow(cfg["pow"])


def set_gates(model, cfg):
    """The blocks' gate temperature and min_weight from the config."""
    for mod in model.modules():
        if hasattr(mod, "temperature") and hasattr(mod, "min_weight"):
            mod.temperature, mod.min_weight = cfg["temp"], cfg["mw"]


def routed(post, ids_BT, real_BT, cfg, counter):
    """What the router's ``scores`` returns for the log posterior ``post``; ``counter`` counts
    the real tokens, and those whose second expert runs (tempered weight >= min_weight)."""
    top2 = (post / cfg["temp"]).topk(2, -1).values
    second = torch.sigmoid(top2[..., 1] - top2[..., 0]) >= cfg["mw"]
    counter[0] += int(second[real_BT].sum())
    counter[1] += int(real_BT.sum())
    return post, {"last": ids_BT[:, -1], "has_last": real_BT[:, -1] | True}


def nll(model, ids, real):
    """Per-position loss [B, T-1] of the next token (0 at padding), as the model routes now."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=real.long()).logits.float()
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return loss * real[:, 1:]


def attribution(model, order, name, windows):
    """Excess nats per token over the oracle, split by the router's first expert."""
    me, E = order.index(name), len(order)
    excess, count, total, n = torch.zeros(E), torch.zeros(E), 0.0, 0

    for ids, mask in windows:
        real = mask.bool()
        top = model.ngram_router.scores(ids, real)[0].argmax(-1)[:, :-1]
        model.set_forced_expert(me)
        oracle = nll(model, ids, real)
        model.set_forced_expert(None)
        diff = nll(model, ids, real) - oracle
        for j in range(E):
            sel = (top == j) & real[:, 1:]
            excess[j] += float(diff[sel].sum())
            count[j] += int(sel.sum())
        total, n = total + float(diff.sum()), n + int(real[:, 1:].sum())
    return {
        "excess_nats_per_token": total / n,
        "by_first_expert": {
            order[j]: {"excess": float(excess[j]) / n, "share": float(count[j]) / n}
            for j in range(E)
        },
    }


def parse_config(text):
    kv = dict(x.split("=", 1) for x in text.split(":"))
    return {
        "k": int(kv.get("k", 1)),
        "beta": float(kv.get("beta", 0.2)),
        "bu": float(kv["bu"]) if "bu" in kv else None,
        "sigma": float(kv.get("sigma", 0.05)),
        "win": int(kv.get("win", 0)),
        "gamma": float(kv.get("gamma", 1.0)),
        "temp": float(kv.get("temp", 1.0)),
        "mw": float(kv.get("mw", 0.1)),
        "dz": float(kv.get("dz", 0.0)),
        "clip": float(kv.get("clip", 0.0)),
        "pow": float(kv.get("pow", 1.0)),
        "rates": tuple(float(r) for r in kv.get("mix", "0,1e-4,1e-3,1e-2").split(",")),
        "n0": int(kv.get("n0", 0)),
        "t0": float(kv.get("t0", 1.0)),
    }


def load_build(model_dir, data):
    """``(paths {name: [train, valid]}, tokenizer, model, expert order, vocabulary size, mu)`` of
    an n-gram build and the NAME=TRAIN,VALID arguments."""
    torch.set_num_threads(2)
    paths = {d.split("=", 1)[0]: d.split("=", 1)[1].split(",") for d in data}
    tok = load_tokenizer(model_dir, trust_remote_code=True)
    model = load_causal_lm(model_dir)
    order = list(model.config.expert_names)
    vocab = model.ngram_router.unigram_counts.shape[1]
    return paths, tok, model, order, vocab, float(model.ngram_router.mu)


def main():
    args = parse_args()
    paths, tok, model, order, vocab, mu = load_build(args.model_dir, args.data)
    docs = {n: load_texts(paths[n][0]) for n in order}
    comps = Components(tok, order, docs, vocab, mu, args.chunk, args.em)
    valid = {n: [paths[n][1]] for n in paths}
    bench = ProtoBench.prepare(model, tok, valid, args.tokens, args.sequences)
    rows = []
    for text in args.config:
        cfg, counter, t0 = parse_config(text), [0, 0], time.time()
        install(model, comps, cfg, counter)
        keep = bench.single(model)
        row = {
            "config": text,
            "mu": mu,
            "keep": keep,
            "worst": min(keep.values()),
            "two_experts": counter[0] / max(counter[1], 1),
            "mixed": bench.mixed_keeps(model)["routing"],
        }
        if args.attribution:
            row["attribution"] = {d: attribution(model, order, d, bench.windows[d]) for d in paths}
        rows.append(row)
        shown = {k: round(v, 4) for k, v in keep.items()}
        mixed = {k: round(v, 3) for k, v in row["mixed"].items()}
        print(text, f"worst {row['worst']:.4f}", shown, "mixed", mixed,
              f"two {row['two_experts']:.3f}", f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(
                {"settings": {"tokens": args.tokens, "sequences": args.sequences,
                              "chunk": args.chunk, "em": args.em}, "rows": rows},
                f, indent=1,
            )  # fmt: skip


if __name__ == "__main__":
    main()
