"""What the routing prototypes in scripts/ measure, in one place.

``ProtoBench.prepare`` takes a DUME build and each domain's held-out text: single-domain windows
of 256 tokens spread over the text (``tokens`` per domain) with the oracle's perplexity (every
layer forced to the domain's expert), and ``dume eval --mixed``'s sequences (``sequences`` of
4 × 64 tokens, seed 0) with the segment oracle's losses. ``measure`` scores the model's routing
as it is now (a prototype patches the router's ``scores`` before calling it): keep = oracle ppl /
ppl per domain, the worst domain, and the mixed keeps (all, first segment, later segments,
after a switch).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dume_dist.model.data import eval_windows, load_texts
from dume_dist.model.evaluate import evaluate_model
from dume_dist.model.mixed import (
    MixedSettings,
    domain_streams,
    evaluate_mixed,
    mixed_batch,
    oracle_nll,
)


def proto_parser() -> argparse.ArgumentParser:
    """The arguments every prototype takes: MODEL_DIR OUT.json NAME=TRAIN,VALID ... --config ...
    --tokens (single-domain tokens per domain) --sequences (mixed sequences)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("data", nargs="+", help="NAME=TRAIN,VALID")
    ap.add_argument("--config", nargs="+", default=["beta=0.2"])
    ap.add_argument("--tokens", type=int, default=32768, help="single-domain tokens per domain")
    ap.add_argument("--sequences", type=int, default=64, help="mixed sequences")
    return ap


@dataclass
class ProtoBench:
    windows: dict
    oracle: dict
    settings: MixedSettings
    mixed: object
    oracle_mixed: object

    @classmethod
    def prepare(cls, model, tokenizer, valid: Mapping[str, Sequence[str]], tokens: int,
                sequences: int) -> ProtoBench:  # fmt: skip
        order = list(model.config.expert_names)
        windows = {
            d: list(eval_windows(tokenizer, load_texts(paths), 256, 8, tokens))
            for d, paths in valid.items()
        }
        forced = {d: order.index(d) for d in valid}
        oracle = evaluate_model(model, cls._batches(windows), forced=forced)
        settings = MixedSettings(sequences=sequences, delays=(4,))
        mixed = mixed_batch(domain_streams(tokenizer, valid), settings)
        return cls(
            windows=windows,
            oracle={d: r.ppl for d, r in oracle.items()},
            settings=settings,
            mixed=mixed,
            oracle_mixed=oracle_nll(model, mixed, settings),
        )

    @staticmethod
    def _batches(windows: dict) -> dict:
        return {d: (lambda b=b: b) for d, b in windows.items()}

    def single(self, model) -> dict:
        """Single-domain keep per domain (oracle ppl / the routing's ppl)."""
        ppl = {d: r.ppl for d, r in evaluate_model(model, self._batches(self.windows)).items()}
        return {d: self.oracle[d] / ppl[d] for d in ppl}

    def mixed_keeps(self, model) -> dict:
        """Mixed-text keeps of the routing and of the oracle told of each switch 4 tokens late."""
        return evaluate_mixed(model, self.mixed, self.settings, oracle=self.oracle_mixed)["keep"]

    def measure(self, model) -> dict:
        """Both: keep per domain, the worst domain, the mixed keeps and the 4-tokens-late
        oracle's."""
        keep = self.single(model)
        mixed = self.mixed_keeps(model)
        return {
            "keep": keep,
            "worst": min(keep.values()),
            "mixed": mixed["routing"],
            "delay4": mixed["oracle, 4 tokens late"],
        }


def count_second_expert(model, post_BTE, real_BT) -> None:
    """Add to ``model.ngram_router.two_experts`` (``[tokens with a second expert, real tokens]``)
    the real positions whose second expert's weight under log posterior ``post_BTE`` reaches the
    build's ``min_weight``."""
    top2 = post_BTE.topk(2, dim=-1).values
    second = torch.sigmoid(top2[..., 1] - top2[..., 0]) >= model.config.routing["min_weight"]
    model.ngram_router.two_experts[0] += int(second[real_BT].sum())
    model.ngram_router.two_experts[1] += int(real_BT.sum())
