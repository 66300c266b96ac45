"""Single-domain and mixed-text keep of DUME builds as they route (docs/routing.md, "Tables from
every sent token; two more ideas that did not pay").

For each MODEL_DIR: keep = oracle ppl / ppl on windows of 256 tokens spread over each domain's
``valid.txt`` (``--tokens`` per domain) and ``dume eval --mixed``'s keeps on ``--sequences``
mixed sequences (seed 0), as ``scripts/proto_bench.py`` measures them. ``--betas`` re-measures
an n-gram build at other evidence scales, ``--min-weights`` at other ``min_weight``; every row has the share of single-domain tokens on which
a second expert runs. ``--layers`` re-measures
with the second expert in some layers only: one string per setting, a character per MoE layer,
``1`` = the build's k, ``0`` = k 1 (``111 ...`` is the build as it is).

Run: python scripts/measure_build.py OUT.json MODEL_DIR ... --valid NAME=VALID ... [--layers 1110]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from proto_bench import ProtoBench

from dume_dist.model.evaluate import load_causal_lm
from dume_dist.model.tokenizer import load_tokenizer


class SecondExpert:
    """Share of single-domain tokens on which a second expert runs (its weight kept: at least
    the build's ``min_weight``), counted in ``block``'s routing while ``bench.single`` runs."""

    def __init__(self, bench, block):
        self.on, self.second, self.tokens = False, 0, 0
        route, single = block.route_sequences, bench.single

        def counted_route(hidden_BTD):
            index_BTK, weight_BTK = route(hidden_BTD)
            if self.on and weight_BTK.shape[-1] > 1:
                self.second += int((weight_BTK[..., 1] > 0).sum())
                self.tokens += weight_BTK[..., 0].numel()
            return index_BTK, weight_BTK

        def counted_single(model):
            self.on, self.second, self.tokens = True, 0, 0
            try:
                return single(model)
            finally:
                self.on = False

        block.route_sequences, bench.single = counted_route, counted_single

    def share(self) -> float:
        return self.second / max(self.tokens, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--valid", nargs="+", required=True, help="NAME=VALID.txt")
    ap.add_argument("--layers", nargs="*", default=[])
    ap.add_argument(
        "--betas",
        nargs="*",
        type=float,
        default=[],
        help="re-measure at these evidence scales (ngram routing; default: the build's)",
    )
    ap.add_argument(
        "--min-weights",
        nargs="*",
        type=float,
        default=[],
        help="re-measure with these min_weight values (k > 1; default: the build's)",
    )
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    valid = dict(v.split("=", 1) for v in args.valid)
    rows = {}
    for model_dir in args.models:
        t0 = time.time()
        tok = load_tokenizer(model_dir, trust_remote_code=True)
        model = load_causal_lm(model_dir)
        names = list(model.config.expert_names)
        missing = sorted(set(names) - set(valid))
        if missing:
            raise SystemExit(f"no --valid text for experts {missing}")
        bench = ProtoBench.prepare(
            model, tok, {n: [valid[n]] for n in names}, args.tokens, args.sequences
        )
        blocks = model.moe_blocks()
        k = blocks[0].top_k
        counter = SecondExpert(bench, blocks[0])
        router = getattr(model, "ngram_router", None)
        if args.betas and router is None:
            raise SystemExit("--betas needs a build with ngram routing")
        for spec, beta, mw in [(s, b, w) for s in args.layers or ["1" * len(blocks)]
                               for b in args.betas or [None]
                               for w in args.min_weights or [None]]:  # fmt: skip
            spec_key = spec
            if beta is not None:
                router.evidence_scale = beta
                spec_key += f":beta={beta}"
            if mw is not None:
                for block in blocks:
                    block.min_weight = mw
                spec_key += f":min_weight={mw}"
            if len(spec) != len(blocks) or set(spec) - {"0", "1"}:
                raise SystemExit(f"--layers {spec!r}: one 0 or 1 per layer ({len(blocks)})")
            for block, c in zip(blocks, spec):
                block.top_k = k if c == "1" else 1
            r = bench.measure(model)
            r["second_expert"] = counter.share()
            rows.setdefault(model_dir, {})[spec_key] = r
            keep = {d: round(v, 4) for d, v in r["keep"].items()}
            mixed = {d: round(v, 3) for d, v in r["mixed"].items()}
            print(model_dir, spec_key, f"worst {r['worst']:.4f}", keep, "mixed", mixed,
                  f"second expert {r['second_expert']:.1%}",
                  f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
