"""`dume bench privacy` and `dume bench poisoning`: what differential privacy costs, and what a
registered contributor who lies about its statistics can do, per routing kind, on real experts.

Both collect each expert's statistics as a build does (``model.build.expert_statistics``), solve
the routers with fixed settings (``FIXED``: no held-out part, so every kind can be private),
write the model with the real checkpoint writer and evaluate held-out perplexity per domain
against oracle routing (each domain forced to its own expert), and the share of each domain's
tokens routed top-1 to each expert (mean over layers).

* privacy: for each ε (and the non-private build) and each statistics size (``max_tokens`` per
  expert), the cost is ``1 − mean keep(ε) / mean keep(non-private)``, keep = oracle ppl / ppl.
* poisoning: one contributor (``target``) replaces its statistics by ``×10`` (every count and Gram
  entry times 10: ten times the tokens, self-consistent), ``features ×3`` (Grams of its features
  scaled by 3; n-gram counts: not applicable) or ``mimic`` (it adds the other contributors'
  statistics to its own: claims their data too); reported: the target's share of every other
  domain's tokens and the other domains' keep, against the honest build, and what the version's
  manifest would say: the target's estimated shares (``routing.shares``) and the flagged experts.
  The linear kinds run under both priors (``paper`` / ``paper-equal``, ``context`` (equal) /
  ``context-tokens``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from dume_dist.core.dp import DpSpec
from dume_dist.core.ngram import NgramStats
from dume_dist.model.backbone import Backbone
from dume_dist.model.build import expert_statistics
from dume_dist.model.data import eval_windows, load_texts
from dume_dist.model.evaluate import evaluate_model, load_causal_lm, routing_summary
from dume_dist.model.experts import load_expert_specs
from dume_dist.model.formats import BuildStats, CheckpointInput, WriteOptions
from dume_dist.model.routing import PRESETS, solve_routing
from dume_dist.model.tokenizer import load_tokenizer
from dume_dist.model.writer import write_dume_checkpoint

# Fixed settings (no held-out part): the paper; the context preset at the λ its held-out choice
# takes on the shipped experts (docs/routing.md); ngram at μ = 100 (as good as μ auto there). The
# linear ones also with the other priors (``core.solve``: tokens, the paper's, or equal).
_CONTEXT = PRESETS["context"].replace(lam=1e-6, holdout_fraction=0.0, preset=None)
FIXED = {
    "paper": PRESETS["paper"],
    "paper-equal": PRESETS["paper"].replace(priors="equal", preset=None),
    "context": _CONTEXT,
    "context-tokens": _CONTEXT.replace(priors="tokens"),
    "ngram": PRESETS["ngram"].replace(lam=100.0, holdout_fraction=0.0, preset=None),
}
# With held-out statistics (poisoning only): the parameter is chosen on them and the manifest's
# estimated shares read them, as the presets do. The target forges its held-out part alike.
HELDOUT = {
    "context-auto": PRESETS["context"].replace(preset=None),
    "paper-equal-auto": PRESETS["paper"].replace(
        priors="equal", lam="auto", holdout_fraction=0.1, preset=None
    ),
}
SETTINGS = {**FIXED, **HELDOUT}
ATTACKS = ("x10", "features x3", "mimic")


class _World:
    """Experts, tokenizer, backbone and evaluation batches, loaded once."""

    def __init__(self, experts, train, valid, seq_len, eval_seq_len, max_eval_tokens, batch_size):
        self.specs = load_expert_specs(experts)
        self.names = [s.name for s in self.specs]
        self.tokenizer = load_tokenizer(self.specs[0].path)
        self.backbone = Backbone.from_spec("average", self.specs)
        self.texts = {n: load_texts(train[n], n) for n in self.names}
        self.kw = dict(batch_size=batch_size, seq_len=seq_len, max_tokens_per_seq=seq_len)
        cached = {
            d: list(
                eval_windows(
                    self.tokenizer, load_texts(p, d), eval_seq_len, batch_size, max_eval_tokens
                )
            )  # fmt: skip
            for d, p in valid.items()
        }
        self.batches = {d: (lambda b=b: b) for d, b in cached.items()}
        self.oracle: dict | None = None
        self._plain: dict = {}  # non-private statistics by (identity, max_tokens)

    def stats(self, kind: str, max_tokens=None, dp: DpSpec | None = None, seed: int = 0) -> dict:
        """``{name: fit statistics}``; the held-out ones, if the kind has them: ``heldout``."""
        spec = SETTINGS[kind]
        key = (spec.feature_map, spec.holdout_smoothings(), max_tokens)
        if dp is None and key in self._plain:
            return self._plain[key][0]
        both = {
            s.name: expert_statistics(
                self.backbone, s, self.tokenizer, self.texts[s.name], spec,
                max_tokens=max_tokens, progress=False, dp=dp, dp_seed=seed + j, **self.kw,
            )
            for j, s in enumerate(self.specs)
        }  # fmt: skip
        if dp is None:
            self._plain[key] = ({n: b[0] for n, b in both.items()},
                                {n: b[1] for n, b in both.items()})  # fmt: skip
        return {n: b[0] for n, b in both.items()}

    def heldout(self, kind: str, max_tokens=None) -> dict:
        """``{name: {part: held-out statistics}}`` of ``stats(kind, max_tokens)`` (non-private)."""
        spec = SETTINGS[kind]
        self.stats(kind, max_tokens)
        return self._plain[(spec.feature_map, spec.holdout_smoothings(), max_tokens)][1]

    def evaluate(self, kind: str, fit: Mapping, held: Mapping | None = None) -> dict:
        """Held-out ppl, keep vs oracle and top-1 shares of the model solved from ``fit`` (and
        ``held``, ``{name: {part: stats}}``, for a kind whose settings are chosen on them)."""
        index = {n: j for j, n in enumerate(self.names)}
        spec = SETTINGS[kind]
        holdout = {p: {n: (index[n], held[n][p]) for n in self.names}
                   for p in spec.holdout_smoothings()} if held else None  # fmt: skip
        solved = solve_routing(spec, {n: (index[n], fit[n]) for n in self.names},
                               len(self.names), holdout)  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="dume-bench-robust-") as tmp:
            inp = CheckpointInput(
                backbone=self.backbone, experts=self.specs, routing=solved,
                top_k=spec.top_k, stats=BuildStats(fit=dict(fit), save=False),
            )  # fmt: skip
            write_dume_checkpoint(Path(tmp) / "m", inp, WriteOptions(model_card=False))
            model = load_causal_lm(Path(tmp) / "m", "cpu")
            if self.oracle is None:
                forced = {d: self.names.index(d) for d in self.batches if d in self.names}
                evals = evaluate_model(model, self.batches, device="cpu", forced=forced)
                self.oracle = {d: r.ppl for d, r in evals.items()}
            evals = evaluate_model(model, self.batches, device="cpu", record_routing=True)
        _, share = routing_summary(evals, self.names)
        ppl = {d: r.ppl for d, r in evals.items()}
        keep = {d: self.oracle[d] / ppl[d] for d in ppl}
        mean_share = {d: torch.tensor(s).mean(0).tolist() for d, s in share.items()}
        estimated = (solved.extras or {}).get("shares")  # what the manifest and status report
        return {"lam": solved.lam, "ppl": ppl, "keep": keep, "share": mean_share,
                "mean_keep": sum(keep.values()) / len(keep), "estimated_shares": estimated}  # fmt: skip


def run_privacy_bench(
    experts, train, valid, *, kinds: Sequence[str] = tuple(FIXED), epsilons=(8.0, 1.0),
    delta: float = 1e-6, sizes: Sequence[int | None] = (None,), seq_len: int = 512,
    eval_seq_len: int = 256, max_eval_tokens: int = 8192, batch_size: int = 8,
) -> dict:  # fmt: skip
    world = _World(experts, train, valid, seq_len, eval_seq_len, max_eval_tokens, batch_size)
    rows, t0 = [], time.perf_counter()
    for kind in kinds:
        for size in sizes:
            honest = world.stats(kind, size)
            plain = world.evaluate(kind, honest)
            tokens = sum(s.num_tokens for s in honest.values()) // len(world.names)
            rows.append({"kind": kind, "max_tokens": size, "tokens_per_expert": tokens,
                         "epsilon": None, "cost": 0.0, **plain})  # fmt: skip
            for eps in epsilons:
                unit = "token" if kind == "ngram" else "sequence"
                fit = world.stats(kind, size, DpSpec(float(eps), delta, unit=unit))
                got = world.evaluate(kind, fit)
                g = next(iter(fit.values())).extra["dp"]
                rows.append({"kind": kind, "max_tokens": size, "tokens_per_expert": tokens,
                             "epsilon": float(eps), "unit": unit, "sigma": g["sigma"],
                             "cost": 1 - got["mean_keep"] / plain["mean_keep"], **got})  # fmt: skip
    return {"bench": "privacy", "delta": delta, "oracle_ppl": world.oracle, "rows": rows,
            "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}  # fmt: skip


def attacked(stats, others: Sequence, attack: str):
    """The target's statistics under ``attack`` (module docstring)."""
    if attack == "x10":
        if isinstance(stats, NgramStats):
            return stats.with_meta(unigram_V=stats.unigram_V * 10, context_V=stats.context_V * 10,
                                   bigram_H=stats.bigram_H * 10)  # fmt: skip
        return stats.with_meta(gram_LPP=stats.gram_LPP * 10)
    if attack == "features x3":
        if isinstance(stats, NgramStats):
            return None
        scale_P = torch.ones(stats.gram_LPP.shape[-1], dtype=torch.float64)
        scale_P[:-1] = 3.0
        return stats.with_meta(gram_LPP=stats.gram_LPP * scale_P[:, None] * scale_P[None, :])
    if attack == "mimic":
        total = stats
        for o in others:
            total = total + o
        return total.with_meta(expert_fingerprint=stats.expert_fingerprint)
    raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")


def run_poisoning_bench(
    experts, train, valid, *, target: str, kinds: Sequence[str] = tuple(SETTINGS),
    max_tokens: int | None = None, seq_len: int = 512, eval_seq_len: int = 256,
    max_eval_tokens: int = 8192, batch_size: int = 8,
) -> dict:  # fmt: skip
    world = _World(experts, train, valid, seq_len, eval_seq_len, max_eval_tokens, batch_size)
    if target not in world.names:
        raise ValueError(f"--target must be one of the experts {world.names}, got {target!r}")
    j = world.names.index(target)
    rows, t0 = [], time.perf_counter()
    for kind in kinds:
        honest = world.stats(kind, max_tokens)
        held = world.heldout(kind, max_tokens) if SETTINGS[kind].needs_holdout else None
        base = world.evaluate(kind, honest, held)
        rows.append({"kind": kind, "attack": "honest", **_poison_row(base, base, world.names, j)})
        others = [n for n in world.names if n != target]
        for attack in ATTACKS:
            forged = attacked(honest[target], [honest[n] for n in others], attack)
            if forged is None:
                continue
            forged_held = held and {
                **held, target: {p: attacked(h, [held[n][p] for n in others], attack)
                                 for p, h in held[target].items()},
            }  # fmt: skip
            got = world.evaluate(kind, {**honest, target: forged}, forged_held)
            rows.append({"kind": kind, "attack": attack, **_poison_row(got, base, world.names, j)})
    return {"bench": "poisoning", "target": target, "oracle_ppl": world.oracle, "rows": rows,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def _poison_row(got: dict, base: dict, names: list[str], j: int) -> dict:
    target = names[j]
    others = [d for d in got["keep"] if d != target]
    return {
        "target_share": {d: got["share"][d][j] for d in got["share"]},
        "others_keep_vs_honest": {d: got["keep"][d] / base["keep"][d] for d in others},
        "worst_other_keep_vs_honest": min(got["keep"][d] / base["keep"][d] for d in others),
        "keep": got["keep"],
        "lam": got["lam"],
        **_estimated(got.get("estimated_shares"), names, j),
    }


def _estimated(shares: dict | None, names: list[str], j: int) -> dict:
    """The target's estimated share of each class (``routing.shares``) and the flagged experts."""
    if not shares:
        return {}
    return {"estimated_target_share": {d: row[j] for d, row in zip(names, shares["by_class"])},
            "flagged": [names[k] for k in shares["outliers"]],
            "unrouted": [names[j] for j in shares.get("unrouted", [])],
            "estimated_by_class": dict(zip(names, shares["by_class"]))}  # fmt: skip


def privacy_table(results: dict) -> str:
    lines = ["| kind | tokens / expert | ε | mean keep | cost vs non-private | noise σ |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["rows"]:
        eps = "∞ (off)" if r["epsilon"] is None else f"{r['epsilon']:g} ({r['unit']})"
        sigma = ", ".join(f"{k} {v:.3g}" for k, v in (r.get("sigma") or {}).items())
        lines.append(f"| {r['kind']} | {r['tokens_per_expert']:,} | {eps} | {r['mean_keep']:.2%} "
                     f"| {r['cost']:.2%} | {sigma} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def poisoning_table(results: dict) -> str:
    t = results["target"]
    lines = [f"| kind | attack by {t} | {t}'s share of other domains' tokens | worst other keep "
             "vs honest | own keep | estimated share (manifest) | flagged |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["rows"]:
        shares = ", ".join(f"{d} {s:.1%}" for d, s in r["target_share"].items() if d != t)
        est = ", ".join(f"{d} {s:.1%}" for d, s in (r.get("estimated_target_share") or {}).items()
                        if d != t) or "—"  # fmt: skip
        flagged = ", ".join(r.get("flagged") or []) or "none"
        lines.append(f"| {r['kind']} | {r['attack']} | {shares} | "
                     f"{r['worst_other_keep_vs_honest']:.2%} | {r['keep'][t]:.2%} | {est} | "
                     f"{flagged} |")  # fmt: skip
    return "\n".join(lines) + "\n"
