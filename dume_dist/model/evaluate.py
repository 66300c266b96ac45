"""Held-out evaluation: perplexity per domain, routing accuracy, and the comparison table.

The comparison (what the quick start prints) evaluates, on each domain's held-out text:
each dense expert, weight averaging of all experts, the MoE with random routers, the MoE
with oracle routing (each domain forced to its own expert), DUME at k=1 and k=2, and the
bias-free (Mixtral-format) routers. *Retention* is expert ppl / variant ppl on the
expert's own domain: 1.0 keeps everything the expert knew.

Shape legend: B batch, T sequence, K experts per token.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from dume_dist.model.progress import progress
from dume_dist.model.tokenizer import load_tokenizer


@dataclass
class DomainEval:
    nll_sum: float = 0.0
    num_tokens: int = 0
    # routing[layer][expert] = tokens routed (top-1) to expert in that layer
    routing_LE: torch.Tensor | None = None

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / max(self.num_tokens, 1))


@dataclass
class EvalTable:
    """``ppl[variant][domain]``; ``own_expert[domain]`` names the variant of its dense expert."""

    ppl: dict[str, dict[str, float]] = field(default_factory=dict)
    own_expert: dict[str, str] = field(default_factory=dict)
    routing_accuracy: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    routing_share: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    expert_names: list[str] = field(default_factory=list)

    def retention(self, variant: str, domain: str) -> float | None:
        own = self.own_expert.get(domain)
        if own is None or own not in self.ppl:
            return None
        return self.ppl[own][domain] / self.ppl[variant][domain]

    def to_json(self) -> dict:
        domains = sorted({d for row in self.ppl.values() for d in row})
        return {
            "ppl": self.ppl,
            "retention": {
                v: {d: self.retention(v, d) for d in domains if self.retention(v, d) is not None}
                for v in self.ppl
            },
            "routing_accuracy": self.routing_accuracy,
            "routing_share": self.routing_share,
        }


def load_causal_lm(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=True, dtype=torch.float32
        )
    except SafetensorError as exc:  # a truncated or forged weights file
        raise ValueError(f"cannot load model {path}: {exc}") from None
    return model.to(device).eval()


@torch.inference_mode()
def evaluate_batches(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device = "cpu",
    on_batch: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], None] | None = None,
) -> DomainEval:
    """Sum of next-token NLL over real tokens (padding masked)."""
    out = DomainEval()
    for input_ids_BT, mask_BT in batches:
        input_ids_BT, mask_BT = input_ids_BT.to(device), mask_BT.to(device)
        logits_BTV = model(input_ids=input_ids_BT, attention_mask=mask_BT, use_cache=False).logits
        targets_BT = input_ids_BT[:, 1:]
        valid_BT = mask_BT[:, 1:].bool() & mask_BT[:, :-1].bool()
        nll_BT = torch.nn.functional.cross_entropy(
            logits_BTV[:, :-1].float().transpose(1, 2), targets_BT, reduction="none"
        )
        out.nll_sum += float(nll_BT[valid_BT].double().sum())
        out.num_tokens += int(valid_BT.sum())
        if on_batch is not None:
            on_batch(model, input_ids_BT, mask_BT)
    return out


def _routing_counter(model, domain_eval: DomainEval):
    """Counts top-1 choices per layer over real tokens (model must record routing)."""
    blocks = model.moe_blocks()
    num_experts = model.config.num_experts

    def on_batch(_model, _ids, mask_BT):
        counts = torch.zeros(len(blocks), num_experts, dtype=torch.long)
        for layer, block in enumerate(blocks):
            top1_BT = block.last_topk_index[..., 0]
            counts[layer] = torch.bincount(top1_BT[mask_BT.bool()].cpu(), minlength=num_experts)
        if domain_eval.routing_LE is None:
            domain_eval.routing_LE = counts
        else:
            domain_eval.routing_LE += counts

    return on_batch


def evaluate_model(
    model: torch.nn.Module,
    domain_batches: Mapping[str, Callable[[], Iterable]],
    *,
    device="cpu",
    record_routing: bool = False,
    forced: Mapping[str, int] | None = None,
    label: str = "",
) -> dict[str, DomainEval]:
    """Evaluate one model on every domain. ``forced[domain]`` forces that expert (oracle)."""
    results = {}
    if record_routing:
        model.set_record_routing(True)
    for domain in progress(list(domain_batches), desc=f"eval {label}".strip(), leave=False):
        if forced is not None:
            model.set_forced_expert(forced[domain])
        domain_eval = DomainEval()
        hook = _routing_counter(model, domain_eval) if record_routing else None
        part = evaluate_batches(model, domain_batches[domain](), device=device, on_batch=hook)
        part.routing_LE = domain_eval.routing_LE
        results[domain] = part
    if forced is not None:
        model.set_forced_expert(None)
    if record_routing:
        model.set_record_routing(False)
    return results


def set_top_k(model, k: int) -> None:
    if not 1 <= k <= model.config.num_experts:
        raise ValueError(f"top_k must be in [1, {model.config.num_experts}], got {k}")
    for block in model.moe_blocks():
        block.top_k = k


def randomise_routers(model, seed: int = 0) -> None:
    """Random routing: every router module re-drawn by its kind's own ``randomise_`` (linear:
    random unit-norm rows without bias; n-gram: random counts)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "randomise_"):
            module.randomise_(g)


def average_weights_model(expert_dirs: Mapping[str, str | Path], device="cpu"):
    """Weight averaging of all experts (every tensor, MLPs included): the merging baseline."""
    names = sorted(expert_dirs)
    model = load_causal_lm(expert_dirs[names[0]], device)
    state = {k: v.double() for k, v in model.state_dict().items()}
    for name in names[1:]:
        other = load_causal_lm(expert_dirs[name], "cpu").state_dict()
        for k in state:
            state[k] += other[k].double().to(state[k].device)
        del other
    model.load_state_dict({k: (v / len(names)).float() for k, v in state.items()})
    return model


def routing_summary(
    model_eval: Mapping[str, DomainEval], expert_names: list[str]
) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    """Per domain: accuracy per layer (share routed top-1 to the domain's own expert, when
    the domain names an expert) and the selection share [layer][expert]."""
    accuracy, share = {}, {}
    for domain, ev in model_eval.items():
        if ev.routing_LE is None:
            continue
        share_LE = ev.routing_LE.double() / ev.routing_LE.sum(dim=1, keepdim=True).clamp_min(1)
        share[domain] = share_LE.tolist()
        if domain in expert_names:
            accuracy[domain] = share_LE[:, expert_names.index(domain)].tolist()
    return accuracy, share


# -- the comparison table ------------------------------------------------------------


def _domain_batches(tokenizer, data, seq_len, batch_size, max_eval_tokens):
    from dume_dist.model.data import eval_windows, load_texts

    cached = {}
    for domain, paths in data.items():
        texts = load_texts(paths, domain=domain)
        windows = eval_windows(
            tokenizer, texts, seq_len=seq_len, batch_size=batch_size, max_tokens=max_eval_tokens,
            name=f"domain {domain}",
        )  # fmt: skip
        cached[domain] = list(windows)
    return {d: (lambda b=b: b) for d, b in cached.items()}


def _record(table: EvalTable, variant: str, results: Mapping[str, DomainEval]) -> None:
    table.ppl[variant] = {d: r.ppl for d, r in results.items()}


DEFAULT_EVAL_SEQ_LEN = 256


def position_limit(config) -> int | None:
    """The model's ``max_position_embeddings`` (a DUME config carries its backbone's), if any."""
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def eval_window(config, seq_len: int | None) -> int:
    """The evaluation window: ``seq_len``, or by default 256 tokens or the model's position limit
    when that is shorter. ValueError (one line) when ``seq_len`` exceeds the limit: positions past
    it are not what the model was made for (learned positions fail outright, rotary ones
    extrapolate), so the perplexity would not be the model's."""
    limit = position_limit(config)
    if seq_len is None:
        return min(DEFAULT_EVAL_SEQ_LEN, limit) if limit else DEFAULT_EVAL_SEQ_LEN
    if limit and seq_len > limit:
        raise ValueError(
            f"windows of {seq_len} tokens exceed the model's max_position_embeddings={limit}: "
            "lower --seq-len"
        )
    return seq_len


def compare(
    model_dir: str | Path,
    data: Mapping[str, list[str]],
    *,
    experts: Mapping[str, str | Path] | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_eval_tokens: int | None = 32768,
    device: str | None = None,
    stats_dir: str | Path | None = None,
) -> EvalTable:
    """Evaluate ``model_dir`` on every domain, in windows of ``seq_len`` tokens (`eval_window`);
    with ``experts``, also every baseline (the bias-free one needs the build's statistics,
    ``stats_dir``)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"no model at {model_dir} (config.json missing)")
    # The model directory's config names remote code (auto_map): without trust_remote_code the
    # tokenizer load would prompt on a terminal (15 s) before the model loads it anyway.
    tokenizer = load_tokenizer(model_dir, trust_remote_code=True)
    model = load_causal_lm(model_dir, device)
    seq_len = eval_window(model.config, seq_len)
    batches = _domain_batches(tokenizer, data, seq_len, batch_size, max_eval_tokens)
    table = EvalTable()
    is_dume = model.config.model_type == "dume"
    if experts:
        for name in sorted(experts):
            dense = load_causal_lm(experts[name], device)
            _record(
                table, f"expert {name}", evaluate_model(dense, batches, device=device, label=name)
            )
            if name in data:
                table.own_expert[name] = f"expert {name}"
            del dense
        avg = average_weights_model(experts, device)
        _record(table, "weight average", evaluate_model(avg, batches, device=device, label="avg"))
        del avg
    if not is_dume:
        _record(table, "model", evaluate_model(model, batches, device=device))
        return table
    names = list(model.config.expert_names)
    table.expert_names = names
    k0 = model.config.num_experts_per_tok
    label = f"dume k={k0}"
    results = evaluate_model(model, batches, device=device, record_routing=True, label=label)
    _record(table, label, results)
    table.routing_accuracy[label], table.routing_share[label] = routing_summary(results, names)
    if not experts:
        return table
    forced = {d: names.index(d) for d in data if d in names}
    if forced:
        oracle_batches = {d: batches[d] for d in forced}
        _record(
            table,
            "oracle",
            evaluate_model(model, oracle_batches, device=device, forced=forced, label="oracle"),
        )
    for k in (1, 2):
        if k != k0 and k <= len(names):
            set_top_k(model, k)
            _record(
                table, f"dume k={k}", evaluate_model(model, batches, device=device, label=f"k={k}")
            )
    set_top_k(model, k0)
    _add_bias_free(table, model_dir, batches, device, stats_dir)
    randomise_routers(model)
    _record(table, "random routers", evaluate_model(model, batches, device=device, label="random"))
    return table


def _add_bias_free(table, model_dir, batches, device, stats_dir=None) -> None:
    """Routers solved without intercept (what ``--format mixtral`` ships), when the build's
    statistics are given (``stats_dir``, its ``--save-stats``) and the family is
    Mixtral-compatible."""
    from dume_dist.model.export_mixtral import (
        check_mixtral_compatible,
        load_dume_with_bias_free_routers,
        read_dume_checkpoint,
    )

    try:
        check_mixtral_compatible(read_dume_checkpoint(model_dir))
        model = load_dume_with_bias_free_routers(
            model_dir, dtype=torch.float32, stats_dir=stats_dir
        )
        model = model.to(device).eval()
    except (ValueError, FileNotFoundError):
        return  # no statistics saved with this model, or not exportable
    label = "dume no-bias (mixtral)"
    _record(table, label, evaluate_model(model, batches, device=device, label="no-bias"))


def print_table(table: EvalTable, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    domains = sorted({d for row in table.ppl.values() for d in row})
    t = Table(title="held-out perplexity per domain (retention = own expert ppl / ppl)")
    t.add_column("variant")
    for d in domains:
        t.add_column(d, justify="right")
    if table.own_expert:
        t.add_column("mean retention", justify="right")
        t.add_column("worst", justify="right")
    for variant, row in table.ppl.items():
        cells = [f"{row[d]:.2f}" if d in row else "—" for d in domains]
        if table.own_expert:
            rets = [
                r for d in domains if d in row and (r := table.retention(variant, d)) is not None
            ]
            cells += [f"{sum(rets) / len(rets):.1%}", f"{min(rets):.1%}"] if rets else ["—", "—"]
        t.add_row(variant, *cells)
    console.print(t)
    for variant, acc in table.routing_accuracy.items():
        if not acc:
            continue
        r = Table(title=f"{variant}: routing accuracy per layer (top-1 to the domain's expert)")
        r.add_column("domain")
        num_layers = len(next(iter(acc.values())))
        for layer in range(num_layers):
            r.add_column(f"L{layer}", justify="right")
        for domain, per_layer in acc.items():
            r.add_row(domain, *[f"{a:.1%}" for a in per_layer])
        console.print(r)


def write_heatmap(table: EvalTable, path: str | Path, variant: str | None = None) -> None:
    """Domain × expert top-1 selection share, one panel per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variant = variant or next(iter(table.routing_share))
    share = table.routing_share[variant]
    domains = list(share)
    num_layers = len(share[domains[0]])
    fig, axes = plt.subplots(
        1, num_layers, figsize=(2.6 * num_layers + 1, 0.5 * len(domains) + 1.6), squeeze=False
    )
    for layer, ax in enumerate(axes[0]):
        grid = torch.tensor([share[d][layer] for d in domains])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"layer {layer}")
        names = table.expert_names or [str(j) for j in range(grid.shape[1])]
        ax.set_xticks(range(grid.shape[1]), names, rotation=45, ha="right")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(domains)), domains if layer == 0 else [""] * len(domains))
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < 0.6 else "black")  # fmt: skip
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of tokens (top-1)")
    fig.suptitle(f"{variant}: expert selection share per layer")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
