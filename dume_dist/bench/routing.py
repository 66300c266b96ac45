"""`dume bench routing`: what each routing option costs and gains, measured on real experts.

For every option (a ``RoutingSpec``): held-out perplexity per domain against **oracle routing**
(each domain forced to its own expert: the best any router can do with these experts), per-layer
routing accuracy, the size of one contributor's statistics, the solve time (λ / β selection
included), and inference speed relative to the paper's routing (a full forward without cache, and
cached greedy decoding).

Statistics are collected once per feature map and expert, split by document into a fit part and a
held-out part; an option without ``"auto"`` settings solves on both parts summed (all the data,
exactly what a build without held-out data would use: Grams add), an option with ``"auto"``
settings solves on the fit part and chooses on the held-out part. Every option's model is written
with the real checkpoint writer and loaded back through ``trust_remote_code``.

Timings, after a warm-up: one batch of each domain's windows (a full forward without cache) and
of prompts (cached greedy decoding), every model in turn on each, ``repeats`` times; an option's
speed is the median over those runs of the paper's seconds over its own on the same input just
before (pairs taken seconds apart, so drifts of the machine's speed hit both alike, and the
median drops the disturbed pairs).
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from dume_dist.model.backbone import Backbone
from dume_dist.model.build import expert_statistics
from dume_dist.model.data import eval_windows, load_texts
from dume_dist.model.evaluate import evaluate_model, load_causal_lm, routing_summary
from dume_dist.model.experts import expert_fingerprint, load_expert_specs
from dume_dist.model.formats import BuildStats, CheckpointInput, WriteOptions
from dume_dist.model.kinds import stats_to_bytes
from dume_dist.model.mixed import (
    MixedSettings,
    domain_streams,
    evaluate_mixed,
    mixed_batch,
    oracle_nll,
)
from dume_dist.model.routing import AUTO, PRESETS, RoutingSpec, solve_routing
from dume_dist.model.tokenizer import load_tokenizer
from dume_dist.model.writer import write_dume_checkpoint

CONTEXT = PRESETS["context"]
DEFAULT_MIXED = MixedSettings()  # 64 sequences of 4 x 64 tokens, oracles 4 and 16 tokens late
_H = dict(holdout_fraction=0.1)
# (label, spec): the paper first (the speed reference), then what we tried beyond it.
DEFAULT_OPTIONS: list[tuple[str, RoutingSpec]] = [
    ("paper (token, ridge λ=1e-2, k=1)", PRESETS["paper"]),
    ("paper, k=2", PRESETS["paper"].replace(top_k=2, preset=None)),
    ("token, ridge, λ auto", RoutingSpec(lam=AUTO, **_H)),
    ("token, ridge, λ auto, logit running mean", RoutingSpec(lam=AUTO, smoothing=1.0, **_H)),
    ("token, ridge, λ+β auto", RoutingSpec(lam=AUTO, smoothing=AUTO, **_H)),
    ("token, lda, λ+β auto", RoutingSpec(solver="lda", lam=AUTO, smoothing=AUTO, **_H)),
    ("prefix_mean, ridge, λ auto", RoutingSpec(features="prefix_mean", lam=AUTO, **_H)),
    ("prefix_mean, ridge, λ+β auto",
     RoutingSpec(features="prefix_mean", lam=AUTO, smoothing=AUTO, **_H)),
    ("prefix_mean, lda, λ+β auto",
     RoutingSpec(features="prefix_mean", solver="lda", lam=AUTO, smoothing=AUTO, **_H)),
    ("context (prefix_mean, lda, λ auto)", CONTEXT),
    ("context, k=2", CONTEXT.replace(top_k=2, preset=None)),
    ("priors tokens: context", CONTEXT.replace(priors="tokens", preset=None)),
    ("priors equal: context", CONTEXT.replace(priors="equal", preset=None)),
    ("priors equal: paper (ridge λ=1e-2)", PRESETS["paper"].replace(priors="equal", preset=None)),
    ("priors equal: token, ridge, λ auto", RoutingSpec(priors="equal", lam=AUTO, **_H)),
    ("ngram (bigram naive Bayes, μ auto, k=2, min weight 0.05)", PRESETS["ngram"]),
    ("ngram, k=1", PRESETS["ngram"].replace(top_k=1, min_weight=0.0, preset=None)),
    ("ngram, μ=100 (no held-out bigrams)", PRESETS["ngram"].replace(lam=100.0, preset=None)),
    ("switch (ngram + switch rate auto, k=2, min weight 0.05)", PRESETS["switch"]),
    ("follow before sampling (follow without the experts' text, evidence x0.2, min weight 0.1)",
     PRESETS["follow"].replace(ngram_sample=0.0, evidence_scale=0.2, min_weight=0.1,
                               preset=None)),
    ("follow (ngram + mixture of switch rates 0, 1e-4, 1e-3, 1e-2, evidence x0.3, text the "
     "experts write x0.5, k=2, min weight 0.15) = default", PRESETS["follow"]),
]  # fmt: skip


def select_options(words: Sequence[str] | None) -> list[tuple[str, RoutingSpec]]:
    """The default options whose label contains any of ``words`` (all without), the paper's
    first, once: it is the speed reference."""
    if not words:
        return list(DEFAULT_OPTIONS)
    chosen = [opt for opt in DEFAULT_OPTIONS if any(w in opt[0] for w in words)]
    if not chosen:
        raise ValueError(f"no routing option matches {list(words)}")
    return chosen if chosen[0] is DEFAULT_OPTIONS[0] else [DEFAULT_OPTIONS[0], *chosen]


def _mixed_row(model, tokenizer, valid, settings: MixedSettings, results: dict, device) -> dict:
    """Keep against the segment oracle on mixed sequences (the oracles computed once)."""
    if "mixed" not in results:
        batch = mixed_batch(domain_streams(tokenizer, valid), settings)
        oracle = oracle_nll(model, batch, settings, device)
        results["mixed"] = {"batch": batch, "oracle": oracle, "settings": settings}
    ctx = results["mixed"]
    out = evaluate_mixed(model, ctx["batch"], settings, device=device, oracle=ctx["oracle"])
    results["mixed_oracle_ppl"] = out["segment_oracle_ppl"]
    results["mixed_delayed_oracle_keep"] = {k: v for k, v in out["keep"].items() if k != "routing"}
    return {"keep": out["keep"]["routing"], "ppl": out["ppl"]["routing"],
            "routing_accuracy": out["routing_accuracy"]}  # fmt: skip


def _seconds(fn, model) -> float:
    t0 = time.perf_counter()
    fn(model)
    return time.perf_counter() - t0


def _collect(backbone, specs, tokenizer, train, spec: RoutingSpec, kw):
    """``{name: (fit, {part: held-out})}`` and seconds, for the statistics of ``spec``."""
    out, t0 = {}, time.perf_counter()
    for s in specs:
        out[s.name] = expert_statistics(
            backbone, s, tokenizer, load_texts(train[s.name], s.name), spec,
            fingerprint=expert_fingerprint(s), progress=False, **kw,
        )  # fmt: skip
    return out, time.perf_counter() - t0


def _stats_key(option: RoutingSpec) -> str:
    """The statistics identity of ``option``, and the settings of the text the experts write
    when it has some (``RouterKind.sample_settings``): statistics with and without differ."""
    extra = option.router_kind.sample_settings(option)
    return option.feature_map + (f" {json.dumps(extra, sort_keys=True)}" if extra else "")


def _widest(options: Sequence[RoutingSpec], holdout_fraction: float) -> dict[str, RoutingSpec]:
    """Per statistics identity (and settings, `_stats_key`), one spec whose statistics serve
    every option of it."""
    groups: dict[str, list[RoutingSpec]] = {}
    for option in options:
        groups.setdefault(_stats_key(option), []).append(option)
    return {
        fm: group[0].router_kind.widest(group).replace(holdout_fraction=holdout_fraction)
        for fm, group in sorted(groups.items())
    }


def _solve(option: RoutingSpec, stats, names):
    index = {n: j for j, n in enumerate(names)}
    if option.needs_holdout:
        fit = {n: (index[n], stats[n][0]) for n in names}
        narrow = option.router_kind.heldout_for  # collected for the widest spec of the identity
        held = {
            b: {n: (index[n], narrow(option, stats[n][1][b], b)) for n in names}
            for b in option.holdout_smoothings()
        }
    else:  # all the data: fit + held-out (plain Grams add; n-gram counts without their pairs)
        kind = option.router_kind
        fit = {n: (index[n], stats[n][0] + kind.heldout_as_fit(stats[n][1][0.0])) for n in names}
        held = None
    t0 = time.perf_counter()
    solved = solve_routing(option, fit, len(names), held)
    return solved, time.perf_counter() - t0, fit


def _stats_bytes(option: RoutingSpec, stats, name) -> dict:
    """What a contributor sends for ``option``: its fit statistics, and the held-out part it
    would compute for this option (``heldout_for``), not the widest collection's."""
    fit, held = stats[name]
    narrow = option.router_kind.heldout_for
    parts = [narrow(option, held[b], b) for b in option.holdout_smoothings()]
    return {"fit": len(stats_to_bytes(fit)), "holdout": sum(len(stats_to_bytes(p)) for p in parts)}


def _timing_inputs(batches: Mapping, batch_size: int, prompt: int):
    """Per domain, one batch of full windows (forward timing) and short prompts (decode timing):
    the second expert runs more on some domains' text than on others'."""
    forward, prompts = [], []
    for d in batches:
        rows = [ids for ids_BT, mask_BT in batches[d]() for ids, mask in zip(ids_BT, mask_BT)
                if mask.all()][:batch_size]  # fmt: skip
        if rows:
            forward.append(torch.stack(rows))
            prompts.append(forward[-1][: max(1, batch_size // 2), :prompt])
    return forward, prompts


def run_routing_bench(
    experts: Mapping[str, str | Path],
    train: Mapping[str, Sequence[str | Path]],
    valid: Mapping[str, Sequence[str | Path]],
    *,
    options: Sequence[tuple[str, RoutingSpec]] | None = None,
    holdout_fraction: float = 0.1,
    seq_len: int = 512,
    max_tokens: int | None = None,
    eval_seq_len: int = 256,
    max_eval_tokens: int | None = 32768,
    batch_size: int = 8,
    repeats: int = 7,
    decode_tokens: int = 32,
    threads: int | None = None,
    device: str = "cpu",
    mixed: MixedSettings | None = DEFAULT_MIXED,
) -> dict:
    """Every option of ``options`` on the experts (see the module docstring); with ``mixed``,
    also on mixed-domain sequences of the ``valid`` texts against the segment oracle."""
    if threads:
        torch.set_num_threads(threads)
    options = list(options or DEFAULT_OPTIONS)
    specs = load_expert_specs(experts)
    names = [s.name for s in specs]
    tokenizer = load_tokenizer(specs[0].path)
    backbone = Backbone.from_spec("average", specs)
    kw = dict(batch_size=batch_size, seq_len=seq_len, max_tokens_per_seq=seq_len,
              max_tokens=max_tokens, device=device)  # fmt: skip
    stats, collect_seconds = {}, {}
    for fm, wide in _widest([o for _, o in options], holdout_fraction).items():
        stats[fm], collect_seconds[fm] = _collect(backbone, specs, tokenizer, train, wide, kw)
    cached = {
        d: list(
            eval_windows(tokenizer, load_texts(p, d), eval_seq_len, batch_size, max_eval_tokens)
        )
        for d, p in valid.items()
    }
    batches = {d: (lambda b=b: b) for d, b in cached.items()}
    forward, prompts = _timing_inputs(batches, batch_size, 32)
    results = {"oracle_ppl": {}, "expert_ppl": {}, "options": []}
    models = []
    with tempfile.TemporaryDirectory(prefix="dume-bench-routing-") as tmp:
        for i, (label, option) in enumerate(options):
            solved, solve_s, fit = _solve(option, stats[_stats_key(option)], names)
            out = Path(tmp) / f"opt{i}"
            inp = CheckpointInput(
                backbone=backbone, experts=specs, routing=solved, top_k=option.top_k,
                stats=BuildStats(fit={n: st for n, (_, st) in fit.items()}, save=False),
            )  # fmt: skip
            write_dume_checkpoint(out, inp, WriteOptions(model_card=False))
            model = load_causal_lm(out, device)
            if i == 0:
                forced = {d: names.index(d) for d in valid if d in names}
                oracle = evaluate_model(model, batches, device=device, forced=forced)
                results["oracle_ppl"] = {d: r.ppl for d, r in oracle.items()}
            evals = evaluate_model(model, batches, device=device, record_routing=True)
            accuracy, _ = routing_summary(evals, names)
            ppl = {d: r.ppl for d, r in evals.items()}
            keep = {d: results["oracle_ppl"][d] / ppl[d] for d in ppl if d in names}
            results["options"].append({
                "label": label,
                "spec": option.to_json(),
                "lam": solved.lam,
                "smoothing": solved.smoothing,
                "selection": None if solved.selection is None else solved.selection.to_json(),
                "ppl": ppl,
                "retention_vs_oracle": keep,
                "mean_retention": sum(keep.values()) / len(keep),
                "worst_retention": min(keep.values()),
                "routing_accuracy_layers": accuracy,
                "routing_accuracy": {d: sum(a) / len(a) for d, a in accuracy.items()},
                "stats_bytes_per_contributor": _stats_bytes(option, stats[_stats_key(option)], names[0]),
                "solve_seconds": solve_s,
            })  # fmt: skip
            if mixed is not None:
                results["options"][-1]["mixed"] = _mixed_row(
                    model, tokenizer, valid, mixed, results, device
                )
            models.append(model)
        _time_models(results["options"], models, forward, prompts, repeats, decode_tokens)
    results["settings"] = {
        "experts": {n: str(p) for n, p in experts.items()},
        "holdout_fraction": holdout_fraction,
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "eval_seq_len": eval_seq_len,
        "max_eval_tokens": max_eval_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        "forward_batches": [list(b.shape) for b in forward],
        "decode": {"prompts": [list(p.shape) for p in prompts], "new_tokens": decode_tokens},
        "threads": torch.get_num_threads(),
        "device": device,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "statistics_seconds": collect_seconds,
        "statistics_tokens": {
            f: {n: st[0].num_tokens + st[1][0.0].num_tokens for n, st in per.items()}
            for f, per in stats.items()
        },
    }
    ctx = results.pop("mixed", None)
    if ctx is not None:
        results["settings"]["mixed"] = dict(
            vars(ctx["settings"]), delays=list(ctx["settings"].delays)
        )
    results["best"] = best_option(results["options"])
    return results


@torch.inference_mode()
def _time_models(rows, models, forward, prompts, repeats, decode_tokens) -> None:
    """Each input of each kind run by every model in turn (a warm-up first), ``repeats`` times:
    tokens per second over all runs, and the speed against the paper's model (the first) as the
    median, over runs, of the paper's seconds over the option's on the same input right before."""
    gen = dict(max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False,
               use_cache=True, pad_token_id=0)  # fmt: skip
    runs = {
        "forward": ([(lambda m, b=b: m(input_ids=b, use_cache=False)) for b in forward],
                    sum(b.numel() for b in forward)),
        "decode": ([(lambda m, p=p: m.generate(p, **gen)) for p in prompts],
                   sum(p.shape[0] * decode_tokens for p in prompts)),
    }  # fmt: skip
    for kind, (fns, tokens) in runs.items():
        for fn in fns:
            for model in models:
                fn(model)  # warm-up
        times: list[list[float]] = [[] for _ in models]
        for _ in range(repeats):
            for fn in fns:
                for i, model in enumerate(models):
                    times[i].append(_seconds(fn, model))
        for i, row in enumerate(rows):
            row[f"{kind}_tokens_per_s"] = tokens * repeats / sum(times[i])
            row[f"{kind}_speed_vs_paper"] = statistics.median(
                paper / mine for paper, mine in zip(times[0], times[i])
            )
            row[f"{kind}_seconds_runs"] = times[i]


def best_option(rows: list[dict]) -> dict:
    """The option with the best worst-domain retention (ties: mean retention), and whether it
    beats the paper on every domain."""
    best = max(rows, key=lambda r: (round(r["worst_retention"], 4), r["mean_retention"]))
    paper = rows[0]["retention_vs_oracle"]
    beats = all(best["retention_vs_oracle"][d] >= paper[d] for d in paper)
    return {"label": best["label"], "beats_paper_on_every_domain": beats}


def markdown_table(results: dict) -> str:
    domains = list(results["oracle_ppl"])
    head = (
        "| routing | " + " | ".join(f"{d} ppl (keep)" for d in domains)
        + " | mean keep | worst keep | routing acc. (min–max domain) | stats / contributor "
        "| solve | fwd speed | decode speed | mixed keep: all / later segments / after switch |"
    )  # fmt: skip
    lines = [head, "|" + "---|" * (len(domains) + 9)]
    lines.append(
        "| oracle | " + " | ".join(f"{results['oracle_ppl'][d]:.3f}" for d in domains)
        + " | 1 | 1 | 100% | | | | | 1 / 1 / 1 |"
    )  # fmt: skip
    for r in results["options"]:
        acc = r["routing_accuracy"].values()
        size = r["stats_bytes_per_contributor"]
        size_s = f"{size['fit'] / 1e6:.2f} MB" + (
            f" + {size['holdout'] / 1e6:.2f} MB held-out" if size["holdout"] else ""
        )
        cells = [f"{r['ppl'][d]:.3f} ({r['retention_vs_oracle'][d]:.2%})" for d in domains]
        lines.append(
            f"| {r['label']} (λ={r['lam']:.3g}, β={r['smoothing']:g}) | " + " | ".join(cells)
            + f" | {r['mean_retention']:.2%} | {r['worst_retention']:.2%} "
            f"| {min(acc):.1%}–{max(acc):.1%} | {size_s} | {r['solve_seconds'] * 1e3:.0f} ms "
            f"| {r['forward_speed_vs_paper']:.2f}× | {r['decode_speed_vs_paper']:.2f}× "
            f"| {_mixed_cell(r)} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def _mixed_cell(row: dict) -> str:
    keep = (row.get("mixed") or {}).get("keep")
    if not keep:
        return ""
    return " / ".join(f"{keep[g]:.3f}" for g in ("all", "later_segments", "after_switch"))
