"""`dume bench leakage`: what an honest-but-curious coordinator learns from what a node sends.

For each routing kind the statistics a contributor sends for its domain are computed exactly as a
build computes them (``model.build.expert_statistics``), and a straightforward attack is run on
them, knowing what the coordinator knows (the public backbone, the contributor's expert MLPs,
the tokenizer), never the text:

* **n-gram counts** (``ngram``): the unigram distribution is the normalised ``unigram`` vector;
  frequent bigrams are recovered from the hashed bigram counts by scoring every ``(u, v)`` pair
  of the vocabulary with ``min(bigram[h(u, v)], context[u], unigram[v])`` and keeping the top;
  with μ ``auto`` (the default criterion) the held-out part is the held-out slice's counts of
  the same kind and a held-out curve of nine numbers; only ``mu_criterion: bigrams`` (or a switch
  rate ``auto``) sends the held-out bigrams verbatim (counted in the row).
* **Gram matrices** (``token``, and the ``x`` block of ``prefix_mean``): per-token templates
  ``φ(v)`` = each layer's mean MLP input for token ``v`` over auxiliary text the coordinator has
  (here: ``aux_tokens`` of the *other* domains' text; the probe ``[BOS, v]`` for tokens it never
  saw), computed with the public backbone and the contributor's expert, then non-negative least
  squares
  ``min_p≥0 ‖Σ_v p_v [φ_l(v) ; vech(φ_0(v) φ_0(v)ᵀ)] − [Σx_l / N ; vech(G_0 / N)]‖`` over the
  first moments of every layer and layer 0's second moment (projected accelerated gradient).

Scores against the truth (the contributor's own token counts): top-k overlap of the recovered
unigram distribution (k = 10, 50, 100), KL(truth ‖ recovered) in nats (the recovered distribution
floored at 1e-6 and renormalised), and for bigrams the precision of the top 100 recovered pairs
among the true top 100. Baseline: the same scores of a guess that knows the language but not the
contributor (the pooled unigram distribution of the other domains). ``dp_epsilons`` reruns each
attack on statistics privatised by ``core.private`` at those ε.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from dume_dist.core.dp import DpSpec
from dume_dist.core.ngram import NgramStats
from dume_dist.core.private import privatize
from dume_dist.model.backbone import Backbone
from dume_dist.model.build import expert_statistics, raw_statistics
from dume_dist.model.collect import decoder_layers, dense_model_for, mlp_inputs
from dume_dist.model.data import load_texts, token_batches
from dume_dist.model.experts import load_expert_specs
from dume_dist.model.kinds import stats_to_bytes
from dume_dist.model.modeling_dume import ngram_bucket
from dume_dist.model.routing import PRESETS
from dume_dist.model.tokenizer import load_tokenizer

KINDS = ("ngram", "paper", "context")
TOP_K = (10, 50, 100)
_FLOOR = 1e-6


def topk_overlap(truth_V: torch.Tensor, guess_V: torch.Tensor, k: int) -> float:
    t = set(torch.topk(truth_V, k).indices.tolist())
    g = set(torch.topk(guess_V, k).indices.tolist())
    return len(t & g) / k


def kl_divergence(truth_V: torch.Tensor, guess_V: torch.Tensor) -> float:
    """KL(truth ‖ guess) in nats, the guess floored at 1e-6 and renormalised."""
    p = truth_V.double() / truth_V.sum()
    q = guess_V.double().clamp_min(0) / guess_V.double().clamp_min(0).sum().clamp_min(1e-300)
    q = (q + _FLOOR) / (1 + _FLOOR * q.numel())
    keep = p > 0
    return float((p[keep] * (p[keep] / q[keep]).log()).sum())


def unigram_scores(truth_V: torch.Tensor, guess_V: torch.Tensor) -> dict:
    out = {f"top{k}_overlap": topk_overlap(truth_V, guess_V, k) for k in TOP_K}
    out["kl"] = kl_divergence(truth_V, guess_V)
    return out


# -- the n-gram attack --------------------------------------------------------------------------


def recover_bigrams(stats: NgramStats, top: int = 100, chunk: int = 256) -> torch.Tensor:
    """The ``top`` most frequent bigrams ``[top, 2]`` as guessed from hashed counts alone."""
    uni_V, ctx_V, big_H = stats.unigram_V, stats.context_V, stats.bigram_H
    vocab = uni_V.shape[0]
    best_s = torch.empty(0, dtype=torch.float64)
    best_p = torch.empty(0, 2, dtype=torch.long)
    cur_V = torch.arange(vocab)
    for start in range(0, vocab, chunk):
        prev_C = torch.arange(start, min(vocab, start + chunk))
        prev_CV, cur_CV = prev_C[:, None].expand(-1, vocab), cur_V[None].expand(len(prev_C), -1)
        score_CV = torch.minimum(
            big_H[ngram_bucket(prev_CV, cur_CV, big_H.shape[0])],
            torch.minimum(ctx_V[prev_CV], uni_V[cur_CV]),
        )
        s, i = torch.topk(score_CV.flatten(), min(top, score_CV.numel()))
        pairs = torch.stack([prev_CV.flatten()[i], cur_CV.flatten()[i]], dim=1)
        best_s, order = torch.topk(torch.cat([best_s, s]), min(top, len(best_s) + len(s)))
        best_p = torch.cat([best_p, pairs])[order]
    return best_p


def true_top_bigrams(pairs_K3: torch.Tensor, top: int = 100) -> torch.Tensor:
    order = torch.topk(pairs_K3[:, 2], min(top, len(pairs_K3))).indices
    return pairs_K3[order, :2]


def bigram_precision(truth_K2: torch.Tensor, guess_K2: torch.Tensor) -> float:
    t = {tuple(p) for p in truth_K2.tolist()}
    return sum(tuple(p) in t for p in guess_K2.tolist()) / max(1, len(guess_K2))


# -- the Gram attack ----------------------------------------------------------------------------


def token_templates(model, vocab: int, bos: int | None, batch: int = 512) -> list[torch.Tensor]:
    """``[V, D]`` per layer: the MLP input at the probe's last position for ``[BOS, v]``."""
    out: list[list[torch.Tensor]] = [[] for _ in decoder_layers(model)]
    with mlp_inputs(model, lambda i, x: out[i].append(x[:, -1].double())), torch.inference_mode():
        for start in range(0, vocab, batch):
            ids = torch.arange(start, min(vocab, start + batch))[:, None]
            if bos is not None:
                ids = torch.cat([torch.full_like(ids, bos), ids], dim=1)
            model(input_ids=ids, use_cache=False)
    return [torch.cat(x) for x in out]


def context_templates(model, probes: list[torch.Tensor], batches) -> list[torch.Tensor]:
    """``[V, D]`` per layer: each token's mean MLP input over its occurrences in auxiliary text
    ``batches`` (text the coordinator has, never the contributor's); the probe template where a
    token does not occur."""
    vocab = probes[0].shape[0]
    sums = [torch.zeros_like(p) for p in probes]
    count_V = torch.zeros(vocab, dtype=torch.float64)
    state = {}

    def add(i: int, x_BTD: torch.Tensor) -> None:
        sums[i].index_add_(0, state["ids"], x_BTD[state["real"]].double())

    with mlp_inputs(model, add), torch.inference_mode():
        for ids_BT, mask_BT in batches:
            state["real"], state["ids"] = mask_BT.bool(), ids_BT[mask_BT.bool()]
            count_V.index_add_(0, state["ids"], torch.ones(len(state["ids"]), dtype=torch.float64))
            model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
    seen = count_V > 0
    return [
        torch.where(seen[:, None], s / count_V.clamp_min(1)[:, None], p)
        for s, p in zip(sums, probes)
    ]


def _vech(m_PP: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.triu_indices(m_PP.shape[-1], m_PP.shape[-1])
    return m_PP[..., rows, cols]


class GramAttack:
    """Non-negative least squares onto per-token templates (module docstring). The system
    ``A`` (first moments of every layer, layer 0's second moment, each block scaled to unit
    Frobenius norm) depends on the templates only, so ``AᵀA`` is formed once per expert."""

    def __init__(self, templates: list[torch.Tensor], steps: int = 2000):
        t0_VD = templates[0]
        blocks = [t.T.float() for t in templates]
        blocks.append(_vech(t0_VD[:, :, None] * t0_VD[:, None, :]).T.float())
        self.scales = [float(b.norm()) for b in blocks]
        self.blocks = [b / sc for b, sc in zip(blocks, self.scales)]
        self.q_VV = sum(b.T @ b for b in self.blocks)
        v = torch.ones(self.q_VV.shape[0])
        for _ in range(50):  # power iteration: the gradient's Lipschitz bound
            v = self.q_VV @ v
            v = v / v.norm()
        self.lip = 1.01 * float(v @ self.q_VV @ v)
        self.steps, self.num_layers = steps, len(templates)

    def __call__(self, gram_LPP: torch.Tensor, dim: int) -> torch.Tensor:
        """Recovered unigram weights ``[V]`` from Grams whose first ``dim`` features are the MLP
        input (the ``x`` block serves ``token`` and ``prefix_mean`` alike)."""
        n = gram_LPP[0, -1, -1]
        targets = [gram_LPP[i, :dim, -1] / n for i in range(self.num_layers)]
        targets.append(_vech(gram_LPP[0, :dim, :dim] / n))
        r_V = sum(b.T @ (t.float() / sc) for b, t, sc in zip(self.blocks, targets, self.scales))
        p = torch.full((self.q_VV.shape[0],), 1.0 / self.q_VV.shape[0])
        y, t = p.clone(), 1.0
        for _ in range(self.steps):  # FISTA on the normal equations, projected onto p >= 0
            p_next = (y - (self.q_VV @ y - r_V) / self.lip).clamp_min(0)
            t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
            y = p_next + ((t - 1) / t_next) * (p_next - p)
            p, t = p_next, t_next
        return p


# -- the bench ----------------------------------------------------------------------------------


def _truth(tokenizer, texts, vocab: int, kw: dict, holdout_fraction: float, name: str):
    """The fit part's exact counts and bigrams (what the contributor keeps at home)."""
    from dume_dist.model.build import split_holdout
    from dume_dist.model.data import token_batches
    from dume_dist.model.kinds.ngram import collect_ngram_stats

    fit_texts, _ = split_holdout(texts, holdout_fraction, name)
    batches = token_batches(tokenizer, fit_texts, kw["batch_size"], kw["seq_len"],
                            kw["max_tokens_per_seq"], kw["max_tokens"])  # fmt: skip
    return collect_ngram_stats(batches, vocab_size=vocab, buckets=64,
                               max_tokens_per_seq=kw["max_tokens_per_seq"], pairs=True,
                               progress=False)  # fmt: skip


def _sent(backbone, spec, tokenizer, texts, routing, kw, dp_spec=None, seed=0):
    fit, held = expert_statistics(backbone, spec, tokenizer, texts, routing, progress=False,
                                  dp=dp_spec, dp_seed=seed, **kw)  # fmt: skip
    size = {"fit": len(stats_to_bytes(fit)),
            "holdout": sum(len(stats_to_bytes(h)) for h in held.values())}  # fmt: skip
    return fit, held, size


def _attack(kind, fit, truth, attack, dim, top_bigrams):
    if kind == "ngram":
        out = unigram_scores(truth.unigram_V, fit.unigram_V)
        out["bigram_precision_top100"] = bigram_precision(top_bigrams, recover_bigrams(fit))
        return out
    return unigram_scores(truth.unigram_V, attack(fit.gram_LPP, dim))


def _private_rows(backbone, spec, tokenizer, texts, routing, kw, epsilons, delta, attack_args):
    """The attack on the statistics made private at each ε: collected once with the unit's
    bounds (clip, count cap: the same for every ε), noised per ε."""
    kind = "ngram" if routing.features == "ngram" else "gram"
    fixed = routing.replace(lam=100.0 if kind == "ngram" else 0.1, holdout_fraction=0.0)
    first = DpSpec(float(epsilons[0]), delta, unit="token" if kind == "ngram" else "sequence")
    raw, _ = raw_statistics(backbone, spec, tokenizer, texts, fixed, progress=False,
                            fingerprint="", dtype=None, dp=first, **kw)  # fmt: skip
    rows = []
    for eps in epsilons:
        dp_spec = DpSpec(float(eps), delta, unit=first.unit)
        clip, _ = fixed.router_kind.dp_bounds(fixed, backbone, dp_spec)
        fit, _, g = privatize(raw, {}, dp_spec, clip=clip, tokens_per_unit=kw["seq_len"],
                              seed=int(eps * 1000))  # fmt: skip
        rows.append({"epsilon": float(eps), "unit": g.unit, "sigma": g.sigma,
                     "bytes": {"fit": len(stats_to_bytes(fit)), "holdout": 0},
                     **_attack(*attack_args[:1], fit, *attack_args[1:])})  # fmt: skip
    return rows


def _kind_spec(kind: str):
    spec = PRESETS[kind].replace(holdout_fraction=0.1)
    return spec


def run_leakage_bench(
    experts: Mapping[str, str | Path],
    train: Mapping[str, Sequence[str | Path]],
    *,
    kinds: Sequence[str] = KINDS,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 8,
    dp_epsilons: Sequence[float] = (),
    dp_delta: float = 1e-6,
    device: str = "cpu",
    aux_tokens: int = 40000,
) -> dict:
    """``{"rows": [...]}``: per domain and routing kind, bytes sent and the attack's scores (and
    with ``dp_epsilons`` the same on private statistics); see the module docstring."""
    specs = load_expert_specs(experts)
    tokenizer = load_tokenizer(specs[0].path)
    backbone = Backbone.from_spec("average", specs)
    vocab, dim = backbone.config.vocab_size, backbone.config.hidden_size
    kw = dict(batch_size=batch_size, seq_len=seq_len, max_tokens_per_seq=seq_len,
              max_tokens=max_tokens, device=device)  # fmt: skip
    texts = {s.name: load_texts(train[s.name], s.name) for s in specs}
    truths = {s.name: _truth(tokenizer, texts[s.name], vocab, kw, 0.1, s.name) for s in specs}
    rows, t0 = [], time.perf_counter()
    for spec in specs:
        name, truth = spec.name, truths[spec.name]
        others = sum(truths[o].unigram_V for o in truths if o != name)
        top = true_top_bigrams(truth.pairs_K3)
        attack = None
        if any(k != "ngram" for k in kinds):
            model = dense_model_for(backbone, spec)
            probes = token_templates(model, vocab, tokenizer.bos_token_id)
            aux = [t for o in texts if o != name for t in texts[o]]  # not the contributor's text
            aux_batches = token_batches(tokenizer, aux, batch_size, seq_len, seq_len, aux_tokens)
            attack = GramAttack(context_templates(model, probes, aux_batches))
            del model
        base = {"domain": name, "tokens": truth.num_tokens,
                "baseline_other_domains": unigram_scores(truth.unigram_V, others)}  # fmt: skip
        for kind in kinds:
            routing = _kind_spec(kind)
            fit, held, size = _sent(backbone, spec, tokenizer, texts[name], routing, kw)
            row = {**base, "kind": kind, "bytes": size, "epsilon": None,
                   **_attack(kind, fit, truth, attack, dim, top)}  # fmt: skip
            if kind == "ngram" and held:
                pairs = held[0.0].pairs_K3
                row["heldout_bigrams_sent_verbatim"] = 0 if pairs is None else int(len(pairs))
            rows.append(row)
            if dp_epsilons:
                private = _private_rows(backbone, spec, tokenizer, texts[name], routing, kw,
                                        dp_epsilons, dp_delta, (kind, truth, attack, dim, top))  # fmt: skip
                rows += [{**base, "kind": kind, **r} for r in private]
    return {
        "bench": "leakage",
        "experts": {s.name: str(s.path) for s in specs},
        "settings": {
            **{k: v for k, v in kw.items() if k != "device"},
            "dp_delta": dp_delta,
            "holdout_fraction": 0.1,
        },  # fmt: skip
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
    }


def markdown_table(results: dict) -> str:
    head = (
        "| domain | kind | ε | bytes sent (fit + held-out) | top-10 | top-50 | top-100 | KL "
        "(nats) | bigram top-100 precision | baseline top-50 / KL |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in results["rows"]:
        b = r["baseline_other_domains"]
        eps = "—" if r["epsilon"] is None else f"{r['epsilon']:g}"
        big = r.get("bigram_precision_top100")
        big_s = "" if big is None else f"{big:.0%}"
        if r.get("heldout_bigrams_sent_verbatim"):
            big_s += f" (+{r['heldout_bigrams_sent_verbatim']:,} held-out bigrams verbatim)"
        lines.append(
            f"| {r['domain']} | {r['kind']} | {eps} | {r['bytes']['fit'] / 1e6:.2f} + "
            f"{r['bytes']['holdout'] / 1e6:.2f} MB | {r['top10_overlap']:.0%} | "
            f"{r['top50_overlap']:.0%} | {r['top100_overlap']:.0%} | {r['kl']:.3f} | {big_s} | "
            f"{b['top50_overlap']:.0%} / {b['kl']:.3f} |"
        )
    return "\n".join(lines) + "\n"
