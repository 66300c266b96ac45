"""Prototype: n-gram counts of text sampled from each expert, added to its contributor's counts.

A contributor's counts describe the text it chose for statistics; its expert knows more than
that text (what it was tuned on, what the base knew). Where users' text differs from the
statistics text (`ocaml`: proofs counted, system code asked), the router sends it elsewhere
(docs/routing.md). Here each expert generates text from its BOS token alone (no data read:
ancestral sampling, temperature 1), and the bigram, unigram and context counts of those samples,
times a weight ``w``, are added to that expert's counts in the build's router before `follow`
routes. Still additive (a contributor could sample and count on its own node), exact unlearning
kept.

Run: python scripts/synthetic_counts_proto.py MODEL_DIR OUT.json NAME=TRAIN,VALID ... \
         --experts NAME=DIR ... --config w=0 w=0.5 w=1 w=0.5:beta=0.3

``beta`` sets the router's evidence scale (the build's until a config sets it).
"""

from __future__ import annotations

import json
import math
import time

import torch
from proto_bench import ProtoBench, proto_parser
from subtopic_proto import load_build

from dume_dist.model.evaluate import load_causal_lm
from dume_dist.model.routing_dume import ngram_bucket


def sample_counts(expert_dir, vocab, buckets, tokens, length, batch, seed, merged=None):
    """(unigram [V], context [V], bigram [buckets]) counts of ``tokens`` sampled tokens; from
    the expert's own model, or with ``merged`` ``(dume model, index)`` from the DUME model with
    that expert forced in every layer."""
    if merged is None:
        model = load_causal_lm(expert_dir).eval()
    else:
        model = merged[0]
        model.set_forced_expert(merged[1])
    bos = model.config.bos_token_id
    torch.manual_seed(seed)
    seqs = []
    while sum(x.numel() for x in seqs) < tokens:
        start = torch.full((batch, 1), bos, dtype=torch.long)
        with torch.no_grad():
            out = model.generate(
                start, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=length, min_new_tokens=length, pad_token_id=bos,
            )  # fmt: skip
        seqs.append(out[:, 1:])
    ids = torch.cat(seqs)
    uni, ctx, big = counts_of(ids, vocab, buckets)
    if merged is not None:
        model.set_forced_expert(None)
    return uni, ctx, big, ids


def counts_of(ids, vocab, buckets):
    """(unigram, context, bigram) counts of the sampled sequences ``ids`` [N, L]."""
    one = torch.ones(ids[:, 1:].numel(), dtype=torch.float64)
    uni = torch.zeros(vocab, dtype=torch.float64)
    uni.index_add_(0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.float64))
    ctx = torch.zeros(vocab, dtype=torch.float64).index_add_(0, ids[:, :-1].reshape(-1), one)
    big = torch.zeros(buckets, dtype=torch.float64)
    big.index_add_(0, ngram_bucket(ids[:, :-1], ids[:, 1:], buckets).reshape(-1), one)
    return uni, ctx, big


def prefix_counts(synth, base, w, vocab, buckets):
    """Per expert, the counts of its first ceil(w × real tokens / L) sampled sequences."""
    out = []
    for j, s in enumerate(synth):
        ids = s[3]
        n = math.ceil(w * float(base[0][j].sum()) / ids.shape[1])
        if n > ids.shape[0]:
            raise SystemExit(f"w {w} needs {n} sequences, sampled {ids.shape[0]}")
        out.append(counts_of(ids[:n], vocab, buckets))
    return out


def main():
    ap = proto_parser()
    ap.add_argument("--experts", nargs="+", required=True, help="NAME=DIR")
    ap.add_argument("--sample-tokens", type=int, default=65536)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--source",
        choices=("expert", "merged"),
        default="expert",
        help="sample from each expert's own model or from the DUME model with it forced",
    )
    ap.add_argument(
        "--raw",
        action="store_true",
        help="w is the sampled share of real tokens, counts added unscaled (integers)",
    )
    args = ap.parse_args()
    paths, tok, model, order, vocab, mu = load_build(args.model_dir, args.data)
    experts = dict(e.split("=", 1) for e in args.experts)
    router = model.ngram_router
    base = [p.data.clone() for p in (router.unigram_counts, router.context_counts,
                                     router.bigram_counts)]  # fmt: skip
    synth = []
    for j, name in enumerate(order):
        t0 = time.time()
        merged = (model, j) if args.source == "merged" else None
        synth.append(sample_counts(experts[name], vocab, router.buckets, args.sample_tokens,
                                   args.length, args.batch, seed=j, merged=merged))  # fmt: skip
        print(name, f"sampled {args.sample_tokens} tokens in {time.time() - t0:.0f}s", flush=True)
    bench = ProtoBench.prepare(model, tok, {n: [paths[n][1]] for n in paths}, args.tokens,
                               args.sequences)  # fmt: skip
    rows = []
    for text in args.config:
        kv = dict(x.split("=", 1) for x in text.split(":"))
        w = float(kv.get("w", 0.0))
        router.evidence_scale = float(kv.get("beta", router.evidence_scale))
        for k, p in enumerate((router.unigram_counts, router.context_counts,
                               router.bigram_counts)):  # fmt: skip
            add = torch.stack([s[k] for s in synth]).float()
            if args.raw:  # the first w × real tokens' sequences of the samples, counted once
                add = torch.stack([c[k] for c in prefix_counts(synth, base, w, vocab,
                                                               router.buckets)])  # fmt: skip
                p.data = base[k] + add.float()
                continue
            p.data = base[k] + w * add * (base[k].sum(1, keepdim=True) / add.sum(1, keepdim=True))
        t0 = time.time()
        m = bench.measure(model)
        rows.append({"config": text, **m})
        print(text, f"worst {m['worst']:.4f}", {k: round(v, 4) for k, v in m["keep"].items()},
              "mixed", {k: round(v, 3) for k, v in m["mixed"].items()},
              f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"mu": mu, "sample_tokens": args.sample_tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
