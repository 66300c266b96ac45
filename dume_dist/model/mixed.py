"""Mixed-domain evaluation: sequences whose domain changes, scored against oracles.

A mixed sequence is ``segments`` windows of ``segment`` tokens, each cut at a random place from
a different domain's held-out token stream (seeded). The **segment oracle** routes every position,
in every layer, to the expert of its segment's domain; the oracle **delayed by d** learns of each
switch d tokens late (position t gets the domain of position max(t - d, 0)). The model's own
routing is compared with them by perplexity, in groups of target tokens: all, the first segment,
the later segments, and the first ``switch_window`` tokens after each switch. ``keep`` of a
routing in a group is oracle ppl / its ppl (1.0: as good as knowing every switch at once).

Shape legend: B sequences, T positions, S segments, L layers, K experts per token.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dume_dist.model.data import _token_ids, load_texts
from dume_dist.model.evaluate import position_limit

GROUPS = ("all", "first_segment", "later_segments", "after_switch")


@dataclass(frozen=True)
class MixedSettings:
    segment: int = 64
    segments: int = 4
    sequences: int = 64
    seed: int = 0
    delays: tuple[int, ...] = (4, 16)
    switch_window: int = 16
    batch_size: int = 8

    def __post_init__(self):
        for key in ("segment", "segments", "sequences", "switch_window", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mixed {key} must be a positive integer, got {value!r}")
        if self.segment < 2:
            raise ValueError(f"mixed segment must be at least 2 tokens, got {self.segment}")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.delays):
            raise ValueError(f"mixed delays must be non-negative integers, got {self.delays!r}")


@dataclass
class MixedBatch:
    """``ids_BT`` token ids; ``domain_BT`` the index (into ``domains``) of each position's
    segment; ``starts`` the segment start positions (the same for every sequence)."""

    ids_BT: torch.Tensor
    domain_BT: torch.Tensor
    domains: list[str]
    starts: list[int]


def domain_streams(tokenizer, data: Mapping[str, Sequence[str]]) -> dict[str, torch.Tensor]:
    """Each domain's held-out documents as one token stream (as ``eval_windows`` reads them)."""
    out = {}
    for domain, paths in data.items():
        ids = [t for doc in _token_ids(tokenizer, load_texts(paths, domain)) for t in doc]
        out[domain] = torch.tensor(ids, dtype=torch.long)
    return out


def mixed_batch(streams: Mapping[str, torch.Tensor], settings: MixedSettings) -> MixedBatch:
    """Seeded mixed sequences: consecutive segments always come from different domains; with at
    least as many domains as segments, every segment of a sequence has its own domain."""
    domains = sorted(streams)
    if len(domains) < 2:
        raise ValueError("mixed-domain sequences need at least two domains")
    seg, num_seg = settings.segment, settings.segments
    for d in domains:
        if len(streams[d]) <= seg:
            raise ValueError(
                f"domain {d} has {len(streams[d])} tokens: too few for {seg}-token segments"
            )
    g = torch.Generator().manual_seed(settings.seed)
    ids, labels = [], []
    for _ in range(settings.sequences):
        order = _segment_domains(len(domains), num_seg, g)
        row_ids, row_dom = [], []
        for j in order:
            stream = streams[domains[j]]
            start = int(torch.randint(len(stream) - seg, (1,), generator=g))
            row_ids.append(stream[start : start + seg])
            row_dom.append(torch.full((seg,), j, dtype=torch.long))
        ids.append(torch.cat(row_ids))
        labels.append(torch.cat(row_dom))
    starts = [i * seg for i in range(num_seg)]
    return MixedBatch(torch.stack(ids), torch.stack(labels), domains, starts)


def _segment_domains(num_domains: int, num_seg: int, g: torch.Generator) -> list[int]:
    order = torch.randperm(num_domains, generator=g).tolist()[:num_seg]
    while len(order) < num_seg:  # more segments than domains: any domain but the previous one
        nxt = int(torch.randint(num_domains - 1, (1,), generator=g))
        order.append(nxt + (nxt >= order[-1]))
    return order


def delayed_domains(domain_BT: torch.Tensor, delay: int) -> torch.Tensor:
    """The domain an oracle that learns of each switch ``delay`` tokens late routes position t to."""
    if delay == 0:
        return domain_BT
    length = domain_BT.shape[1]
    src = (torch.arange(length) - delay).clamp_min(0)
    return domain_BT[:, src]


def group_masks(batch: MixedBatch, switch_window: int) -> dict[str, torch.Tensor]:
    """Masks [B, T-1] over next-token targets (position t predicts token t+1) for each group."""
    length = batch.ids_BT.shape[1]
    target = torch.arange(1, length)
    first = target < batch.starts[1] if len(batch.starts) > 1 else torch.ones_like(target).bool()
    after = torch.zeros_like(target, dtype=torch.bool)
    for s in batch.starts[1:]:
        after |= (target >= s) & (target < s + switch_window)
    rows = batch.ids_BT.shape[0]
    masks = {"all": torch.ones_like(target, dtype=torch.bool), "first_segment": first,
             "later_segments": ~first, "after_switch": after}  # fmt: skip
    return {k: v.expand(rows, -1) for k, v in masks.items()}


@torch.inference_mode()
def token_nll(model, ids_BT: torch.Tensor, batch_size: int, device="cpu", on_batch=None):
    """Next-token NLL [B, T-1] (fp64), batch by batch; ``on_batch(rows)`` after each forward."""
    out = []
    for i in range(0, ids_BT.shape[0], batch_size):
        rows = slice(i, i + batch_size)
        x_BT = ids_BT[rows].to(device)
        logits_BTV = model(input_ids=x_BT, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits_BTV.transpose(1, 2), x_BT[:, 1:], reduction="none"
        )
        out.append(nll.double().cpu())
        if on_batch is not None:
            on_batch(rows)
    return torch.cat(out)


def forced_nll(model, batch: MixedBatch, expert_of_domain: list[int], delay: int, settings, device):
    """NLL under the oracle delayed by ``delay`` (every layer forced per position)."""
    experts = torch.tensor(expert_of_domain)[delayed_domains(batch.domain_BT, delay)]
    out = []
    for i in range(0, experts.shape[0], settings.batch_size):
        model.set_forced_expert(experts[i : i + settings.batch_size])
        try:
            nll = token_nll(
                model, batch.ids_BT[i : i + settings.batch_size], settings.batch_size, device
            )
        finally:
            model.set_forced_expert(None)
        out.append(nll)
    return torch.cat(out)


def routed_nll(model, batch: MixedBatch, settings, device):
    """NLL under the model's own routing, and the top-1 expert of every layer [B, L, T]."""
    blocks = model.moe_blocks()
    top1 = torch.empty(batch.ids_BT.shape[0], len(blocks), batch.ids_BT.shape[1], dtype=torch.long)

    def record(rows):
        for layer, block in enumerate(blocks):
            top1[rows, layer] = block.last_topk_index[..., 0].cpu()

    model.set_record_routing(True)
    try:
        nll = token_nll(model, batch.ids_BT, settings.batch_size, device, on_batch=record)
    finally:
        model.set_record_routing(False)
    return nll, top1


def group_ppl(nll_BT: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {k: math.exp(float(nll_BT[m].mean())) for k, m in masks.items() if m.any()}


def expert_indices(model, domains: Sequence[str]) -> list[int]:
    names = list(model.config.expert_names)
    missing = [d for d in domains if d not in names]
    if missing:
        raise ValueError(
            f"mixed evaluation needs an expert named after each domain: {missing[0]!r} is not one "
            f"of the model's experts ({', '.join(names)})"
        )
    return [names.index(d) for d in domains]


def oracle_nll(
    model, batch: MixedBatch, settings: MixedSettings, device="cpu"
) -> dict[int, torch.Tensor]:
    """NLL [B, T-1] of the segment oracle (delay 0) and of each delayed oracle."""
    experts = expert_indices(model, batch.domains)
    return {
        d: forced_nll(model, batch, experts, d, settings, device) for d in (0, *settings.delays)
    }


def evaluate_mixed(model, batch: MixedBatch, settings: MixedSettings, *, device="cpu", oracle=None):
    """Perplexity and keep (segment-oracle ppl / ppl) of the model's routing and of the delayed
    oracles per group, and the routing accuracy (top-1 = the segment's expert, mean over layers).
    ``oracle`` (from ``oracle_nll``) may be passed in to reuse it across models of one set."""
    experts = expert_indices(model, batch.domains)
    oracle = oracle if oracle is not None else oracle_nll(model, batch, settings, device)
    masks = group_masks(batch, settings.switch_window)
    nll, top1_BLT = routed_nll(model, batch, settings, device)
    ref = group_ppl(oracle[0], masks)
    rows = {"routing": group_ppl(nll, masks)}
    rows |= {f"oracle, {d} tokens late": group_ppl(oracle[d], masks) for d in settings.delays}
    truth_BT = torch.tensor(experts)[batch.domain_BT]
    hit_BLT = top1_BLT == truth_BT[:, None]
    # a group with no target (one segment: no switch) has no accuracy, as it has no ppl (not NaN)
    accuracy = {k: float(hit_BLT[:, :, 1:][m[:, None].expand_as(hit_BLT[:, :, 1:])].double().mean())
                for k, m in masks.items() if m.any()}  # fmt: skip
    return {
        "segment_oracle_ppl": ref,
        "ppl": rows,
        "keep": {name: {k: ref[k] / v[k] for k in v} for name, v in rows.items()},
        "routing_accuracy": accuracy,
        "top1_BLT": top1_BLT,
    }


def mixed_report(model, tokenizer, data, settings: MixedSettings, *, device="cpu") -> dict:
    """Everything ``dume eval --mixed`` prints: see ``evaluate_mixed``. ValueError (one line)
    when a sequence would be longer than the model's position limit."""
    limit = position_limit(model.config)
    length = settings.segment * settings.segments
    if limit and limit < length:
        raise ValueError(
            f"mixed sequences of {length} tokens ({settings.segments} x {settings.segment}) "
            f"exceed the model's max_position_embeddings={limit}: lower --segment or --segments"
        )
    batch = mixed_batch(domain_streams(tokenizer, data), settings)
    result = evaluate_mixed(model, batch, settings, device=device)
    result["batch"] = batch
    result["settings"] = settings.__dict__ | {"delays": list(settings.delays)}
    return result


def to_json(result: Mapping) -> dict:
    return {k: v for k, v in result.items() if k not in ("top1_BLT", "batch")}


def write_routing_png(result: Mapping, expert_names: Sequence[str], path, num_sequences: int = 4):
    """Top-1 expert of every layer along a few sequences; the top strip is the true segments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    batch, top1_BLT = result["batch"], result["top1_BLT"]
    experts = [list(expert_names).index(d) for d in batch.domains]
    truth_BT = torch.tensor(experts)[batch.domain_BT]
    rows = min(num_sequences, top1_BLT.shape[0])
    colours = plt.get_cmap("tab10").colors[: len(expert_names)]
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(
        rows, 1, figsize=(12, 1.0 + 0.35 * top1_BLT.shape[1] * rows), squeeze=False
    )
    for i, ax in enumerate(axes[:, 0]):
        grid = torch.cat([truth_BT[i : i + 1], top1_BLT[i]], dim=0)
        ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5,
                  vmax=len(expert_names) - 0.5)  # fmt: skip
        for s in batch.starts[1:]:
            ax.axvline(s - 0.5, color="black", linewidth=1.5)
        ax.axhline(0.5, color="white", linewidth=2)
        ax.set_yticks(
            range(grid.shape[0]), ["segment"] + [f"L{j}" for j in range(grid.shape[0] - 1)]
        )
        ax.set_xlabel("position" if i == rows - 1 else "")
    handles = [Patch(color=colours[j], label=n) for j, n in enumerate(expert_names)]
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.99), ncol=len(handles),
               frameon=False)  # fmt: skip
    fig.suptitle("top-1 expert per layer along mixed sequences (top row: true segment)", y=1.05)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def print_mixed(result: Mapping, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    s = result["settings"]
    t = Table(title=f"{s['sequences']} mixed sequences of {s['segments']} x {s['segment']} tokens:"
                    " keep = segment-oracle ppl / ppl")  # fmt: skip
    t.add_column("routing")
    for g in GROUPS:
        t.add_column(g.replace("_", " ") + (f" ({s['switch_window']})" if g == "after_switch" else ""),
                     justify="right")  # fmt: skip
    t.add_row(
        "segment oracle (ppl)",
        *[f"{result['segment_oracle_ppl'].get(g, math.nan):.2f}" for g in GROUPS],
    )
    for name, keep in result["keep"].items():
        ppl = result["ppl"][name]
        t.add_row(name, *[f"{keep[g]:.3f} ({ppl[g]:.2f})" if g in keep else "—" for g in GROUPS])
    acc = result["routing_accuracy"]
    t.add_row("routing accuracy", *[f"{acc[g]:.1%}" if g in acc else "—" for g in GROUPS])
    console.print(t)
