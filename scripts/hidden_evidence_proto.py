"""Prototype: hidden-state evidence beside the bigram evidence in `follow`'s switching filter.

`follow` scores each token by its bigram log-likelihood under every domain's counts (times β)
and runs a switching forward filter on that evidence. Bigram evidence alone meets either the
single-domain or the mixed-domain target, not both (docs/routing.md). This prototype adds a second,
partly independent source of per-token evidence that a router can read before any MLP runs: the
hidden state at layer 0's MLP input (embeddings and the first attention over the prefix, backbone
only, so no routing decision feeds it). A linear discriminant on it (class means and pooled
within-class covariance: additive statistics, like the `context` kind's, at one layer) gives
per-token class log-likelihoods ``l_j(x) = x Σ⁻¹ μ_j − ½ μ_jᵀ Σ⁻¹ μ_j``; the filter's evidence is
``β · bigram + γ · l(x)`` (``gam``), or the filter's output plus ``γ · l(x)`` of that position
only (``gro``); ``g0=N`` keeps ``gam`` to a sequence's first N positions. Sequence-level still (one dispatch plan for every layer).

Also ``bu=X``: the unigram part of a token's bigram evidence (log q_j(v)) weighted X instead of β,
the bigram-conditional part (log p_j(v|u) − log q_j(v)) β.

Config keys (``:``-separated): ``beta``, ``gam`` / ``gro`` (γ), ``bu``, ``shrink`` (LDA shrinkage,
relative to the trace), and subtopic_proto's ``temp``, ``mw``, ``mix``.

Run: python scripts/hidden_evidence_proto.py MODEL_DIR OUT.json NAME=TRAIN,VALID ... \
         --config beta=0.2 beta=0.2:gam=0.05
"""

from __future__ import annotations

import json
import time

import torch
from proto_bench import ProtoBench, proto_parser
from subtopic_proto import (
    component_logp,
    domain_filter,
    load_build,
    parse_config,
    routed,
    scaled,
    set_gates,
)

from dume_dist.model.data import eval_windows, load_texts
from dume_dist.model.routing_dume import _real_mask


class _Stop(Exception):
    pass


class Layer0:
    """Layer 0's MLP input [B, T, D] (fp64) of token ids, through the model's own backbone."""

    def __init__(self, model):
        self.model = model
        self.block = next(iter(model.moe_blocks()))
        self.seen = None
        self.block.register_forward_pre_hook(self._hook)
        self.armed = False

    def _hook(self, module, args):
        if self.armed:
            self.seen = args[0].detach().double()
            raise _Stop

    def __call__(self, ids_BT, real_BT):
        blocks = list(self.model.moe_blocks())
        saved = [b.forced_expert for b in blocks]
        for b in blocks:
            b.forced_expert = 0
        embeds = self.model.get_input_embeddings()(ids_BT)
        self.armed = True
        try:
            with torch.no_grad():
                self.model(inputs_embeds=embeds, attention_mask=real_BT.long(), use_cache=False)
        except _Stop:
            pass
        finally:
            self.armed = False
            for b, f in zip(blocks, saved):
                b.forced_expert = f
        return self.seen


def fit_lda(layer0, tok, order, train_paths, tokens, shrink_grid):
    """Per-domain sums and the total Gram of layer-0 features over ``tokens`` training tokens per
    domain; returns {shrink: (W [D, E], b [E])}."""
    D = None
    sums, counts, gram = [], [], None
    for name in order:
        s, n = None, 0
        for ids, mask in eval_windows(tok, load_texts(train_paths[name]), 256, 8, tokens):
            x = layer0(ids, mask.bool())[mask.bool()]
            if D is None:
                D = x.shape[1]
                gram = torch.zeros(D, D, dtype=torch.float64)
            s = x.sum(0) if s is None else s + x.sum(0)
            n += x.shape[0]
            gram += x.T @ x
        sums.append(s)
        counts.append(n)
    S = torch.stack(sums)  # [E, D]
    n = torch.tensor(counts, dtype=torch.float64)
    mu = S / n[:, None]
    N = n.sum()
    within = (gram - (mu.T * n) @ mu) / N
    out = {}
    for lam in shrink_grid:
        sig = (1 - lam) * within + lam * within.trace() / D * torch.eye(D, dtype=torch.float64)
        W = torch.linalg.solve(sig, mu.T)  # [D, E]
        b = -0.5 * (mu.T * W).sum(0)
        out[lam] = (W, b)
    return out


def install(model, mu, tables, layer0, lda, cfg, counter):
    router = model.ngram_router
    set_gates(model, cfg)
    W, b = lda[cfg["shrink"]]

    def scores(ids_BT, real_BT=None, state=None):
        real_BT = _real_mask(ids_BT[..., None], real_BT)
        lp = scaled(component_logp(tables, mu, ids_BT, real_BT), tables, ids_BT, cfg)  # [B,T,E,1]
        ll = layer0(ids_BT, real_BT) @ W + b if cfg["gam"] or cfg["gro"] else None  # [B, T, E]
        if cfg["gam"]:
            near = ll
            if cfg["g0"]:  # only a sequence's first g0 positions (a cold start's evidence)
                near = ll * (torch.arange(ll.shape[1]) < cfg["g0"])[None, :, None]
            lp = lp + cfg["gam"] * near[..., None]
        lp = lp * real_BT[..., None, None]
        post = domain_filter(lp, real_BT, cfg["rates"], 0.0, torch.ones(lp.shape[2], 1))
        if cfg["gro"]:  # read out with the hidden evidence of this position only
            post = post + cfg["gro"] * ll
            post = post - post.logsumexp(-1, keepdim=True)
        return routed(post, ids_BT, real_BT, cfg, counter)

    router.scores = scores


def token_accuracy(bench, order, tables, mu, layer0, lda, shrink):
    """Per-token argmax accuracy of each evidence alone on the single-domain windows."""
    hits = {"unigram": 0, "bigram": 0, "hidden": 0}
    total = 0
    q = tables[0]
    W, b = lda[shrink]
    for name, windows in bench.windows.items():
        j = order.index(name)
        for ids, mask in windows:
            real = mask.bool()
            lp = component_logp(tables, mu, ids, real)[..., 0]
            lq = q[:, 0, ids].permute(1, 2, 0).log()
            hid = layer0(ids, real) @ W + b
            for key, s in (("unigram", lq), ("bigram", lp), ("hidden", hid)):
                hits[key] += int(((s.argmax(-1) == j) & real).sum())
            total += int(real.sum())
    return {k: v / total for k, v in hits.items()}


def parse(text):
    """subtopic_proto's config (``beta``, ``bu``, ``temp``, ``mw``, ``mix``, ...) plus this
    prototype's ``gam``, ``gro``, ``g0`` and ``shrink``."""
    kv = dict(x.split("=", 1) for x in text.split(":"))
    return parse_config(text) | {
        "gam": float(kv.get("gam", 0.0)),
        "gro": float(kv.get("gro", 0.0)),
        "g0": int(kv.get("g0", 0)),
        "shrink": float(kv.get("shrink", 1e-3)),
    }


def main():
    ap = proto_parser()
    ap.add_argument("--fit-tokens", type=int, default=65536)
    args = ap.parse_args()
    paths, tok, model, order, vocab, mu = load_build(args.model_dir, args.data)
    r = model.ngram_router
    # The build's own tables ([E, 1, ...] for component_logp), smoothed as the router does.
    uni = r.unigram_counts.double()
    q = (uni + r.alpha) / (uni.sum(1, keepdim=True) + r.alpha * uni.shape[1])
    tables = (
        q[:, None],
        r.context_counts[:, None].double(),
        r.bigram_counts[:, None].double(),
        None,
    )
    layer0 = Layer0(model)
    shrinks = sorted({parse(c)["shrink"] for c in args.config} | {1e-3})
    lda = fit_lda(layer0, tok, order, {n: [paths[n][0]] for n in order}, args.fit_tokens, shrinks)
    bench = ProtoBench.prepare(model, tok, {n: [paths[n][1]] for n in paths}, args.tokens,
                               args.sequences)  # fmt: skip
    acc = {s: token_accuracy(bench, order, tables, mu, layer0, lda, s) for s in shrinks}
    print("per-token accuracy", acc, flush=True)
    rows = []
    for text in args.config:
        cfg, counter, t0 = parse(text), [0, 0], time.time()
        install(model, mu, tables, layer0, lda, cfg, counter)
        m = bench.measure(model)
        row = {"config": text, "two_experts": counter[0] / max(counter[1], 1), **m}
        rows.append(row)
        print(text, f"worst {m['worst']:.4f}", {k: round(v, 4) for k, v in m["keep"].items()},
              "mixed", {k: round(v, 3) for k, v in m["mixed"].items()},
              f"two {row['two_experts']:.3f}", f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"mu": mu, "token_accuracy": acc, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
