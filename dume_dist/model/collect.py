"""Router statistics from a model run (DESIGN §2, steps 1-2).

``collect_stats`` hooks the input of every decoder layer's ``mlp`` (the output of
``post_attention_layernorm``), turns it into router features with
``modeling_dume.causal_features`` (the very function the model routes with, so statistics and
inference cannot diverge), keeps the real tokens (attention mask, and the first
``max_tokens_per_seq`` of each sequence) and adds them to a ``GramAccumulator``. The forward runs
the base model only (no LM head) and stops as soon as the last layer's MLP input is seen.
``collect_smoothed_stats`` does the same for several smoothing decays at once (the held-out
statistics that choose λ and β, see ``dume_dist.core.select``).

It works on any model whose base model has ``layers[*].mlp``: a dense HF model, or a
``DumeForCausalLM`` with an expert forced. ``dense_model_for`` builds the dense model that equals
the MoE with one expert forced — all a contributor needs is the backbone and its own expert.

Shape legend: B batch, T sequence, D hidden size, N real tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from dume_dist.core.dp import capped_bincount, clip_rows
from dume_dist.core.ngram import NgramStats, coalesce_pairs
from dume_dist.core.stats import GramAccumulator, RouterStats
from dume_dist.model.experts import ExpertSpec
from dume_dist.model.modeling_dume import (
    causal_ema,
    causal_features,
    ngram_bucket,
    previous_real_tokens,
)
from dume_dist.model.routing import feature_map_name

_PAIRS_BEFORE_COALESCING = 1 << 22  # rows of held-out bigrams kept before summing equal ones


class _StopForward(Exception):
    """Raised by the last layer's hook: nothing after the last MLP input is needed."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def stats_compute_dtype(
    spec: ExpertSpec, device: str | torch.device, requested: torch.dtype | None = None
) -> torch.dtype:
    """The dtype the dense model runs in while collecting statistics: ``requested``, else the
    expert's own (floating) dtype — bf16 experts run in bf16 (half the memory of an fp32 copy);
    the Gram products are fp32 and the sums fp64 either way."""
    if requested is not None:
        return requested
    from dume_dist.model.experts import SAFETENSORS_DTYPES

    dtype = SAFETENSORS_DTYPES[spec.index[spec.mlp_names()[0]].dtype]
    return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32


def release_memory(device: str | torch.device = "cpu") -> None:
    """Hand freed memory back to the system between experts: glibc keeps freed heap pages (and
    raises its mmap threshold after the first large free), so without this a process's resident
    size would grow with each expert's dense model."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def decoder_layers(model) -> list[torch.nn.Module]:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise ValueError(f"{type(model).__name__} has no decoder layers with an `mlp` to hook")
    return list(layers)


def collect_stats(
    model,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    max_tokens_per_seq: int,
    device: str | torch.device | None = None,
    progress: bool = True,
    features: str = "token",
) -> RouterStats:
    """Per-layer Gram statistics of the router features (``features``: ``token``, the MLP inputs,
    or ``prefix_mean``) over the real tokens of ``batches``; ``feature_map`` records ``features``.

    ``batches`` yields ``(input_ids_BT, attention_mask_BT)`` (right or left padding). The model is
    moved to ``device`` (default: CUDA if available, else CPU) and put in eval mode.
    """
    stats = collect_smoothed_stats(
        model, batches, max_tokens_per_seq=max_tokens_per_seq, device=device, progress=progress,
        features=features, smoothings=(0.0,),
    )  # fmt: skip
    return stats[0.0]


def collect_smoothed_stats(
    model,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    max_tokens_per_seq: int,
    smoothings: Sequence[float],
    features: str = "token",
    device: str | torch.device | None = None,
    progress: bool = True,
    clip: float | None = None,
) -> dict[float, RouterStats]:
    """``{β: statistics}``: for each decay β, the Gram of the router features smoothed with
    ``modeling_dume.causal_ema`` (β = 0: the plain features), in one pass over ``batches``.
    ``feature_map`` is ``features`` for β = 0 and ``"<features>+ema:<β>"`` otherwise. ``clip``
    bounds each token's feature norm (differential privacy, ``core.dp``) before smoothing."""
    smoothings = sorted({float(b) for b in smoothings})
    names = {beta: feature_map_name(features, beta) for beta in smoothings}
    blocks = model.moe_blocks() if hasattr(model, "moe_blocks") else []
    if any(block.forced_expert is None for block in blocks):
        raise ValueError("statistics of a DUME model need an expert forced (set_forced_expert)")
    device = resolve_device(device)
    model.to(device).eval()
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = decoder_layers(model)
    state: dict = {"real_BT": None, "keep_BT": None, "acc": None}

    def make_hook(layer_idx: int):
        def hook(module, args, kwargs):
            x_BTD = args[0] if args else next(iter(kwargs.values()))
            feats_BTF, _ = causal_features(features, x_BTD, state["real_BT"])
            if clip is not None:
                feats_BTF = clip_rows(feats_BTF.flatten(0, 1), clip).view_as(feats_BTF)
            if state["acc"] is None:
                state["acc"] = {
                    beta: GramAccumulator(len(layers), feats_BTF.shape[-1], device=device)
                    for beta in smoothings
                }
            for beta, acc in state["acc"].items():
                smoothed_BTF, _ = causal_ema(feats_BTF, beta, state["real_BT"])
                acc.add(layer_idx, smoothed_BTF[state["keep_BT"]])
            if layer_idx == len(layers) - 1:
                raise _StopForward

        return hook

    handles = [
        layer.mlp.register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    bar = tqdm(disable=not progress, unit="tok", desc="statistics")
    try:
        with torch.inference_mode():
            for ids_BT, mask_BT in batches:
                ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
                state["real_BT"] = mask_BT.bool()
                state["keep_BT"] = _keep_mask(mask_BT, max_tokens_per_seq)
                try:
                    base(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
                except _StopForward:
                    pass
                bar.update(int(state["keep_BT"].sum()))
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    if state["acc"] is None:
        raise ValueError("no tokens to collect statistics from")
    return {beta: acc.result(feature_map=names[beta]) for beta, acc in state["acc"].items()}


def default_clip(backbone, features: str, scale: float = 1.0) -> float:
    """A data-independent bound on the router features' norm, from the public backbone: the MLP
    input is ``γ ⊙ h / rms(h)``, whose norm is ``√D · rms(γ)`` when ``h`` is spread evenly; the
    largest over layers, times ``scale`` (``√2`` more for ``prefix_mean``'s two halves)."""
    norms = [
        float(backbone.tensor(n).double().pow(2).mean().sqrt()) * backbone.tensor(n).numel() ** 0.5
        for n in backbone.names()
        if n.endswith("post_attention_layernorm.weight")
    ]
    if not norms:
        raise ValueError("no post_attention_layernorm in the backbone: give the dp clip explicitly")
    return scale * max(norms) * (2**0.5 if features == "prefix_mean" else 1.0)


def _keep_mask(mask_BT: torch.Tensor, max_tokens_per_seq: int) -> torch.Tensor:
    """Real tokens among the first ``max_tokens_per_seq`` real tokens of each sequence (so left
    padding is handled too)."""
    real_BT = mask_BT.bool()
    rank_BT = real_BT.long().cumsum(dim=1)  # 1-based position among the real tokens
    return real_BT & (rank_BT <= max_tokens_per_seq)


def dense_model_for(
    backbone,
    expert: ExpertSpec,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """The dense HF model with the backbone's non-MLP tensors and ``expert``'s MLP tensors: the
    MoE with that expert forced. Tensors are copied in one at a time (no second copy of the
    model), into a model allocated without random initialisation."""
    config = copy.deepcopy(backbone.config)
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights skips the tying that post_init would do
    targets = dict(model.named_parameters())  # tied weights appear once
    state_keys = set(model.state_dict())
    targets.update({n: b for n, b in model.named_buffers() if n in state_keys})
    sources = {n: backbone for n in backbone.names()}
    sources.update({n: expert for n in expert.mlp_names()})
    unexpected = sorted(set(sources) - state_keys)
    missing = sorted(set(targets) - set(sources))
    if unexpected or missing:
        what = (
            f"unexpected tensor {unexpected[0]}" if unexpected else f"missing tensor {missing[0]}"
        )
        raise ValueError(f"expert {expert.name} does not fit {type(model).__name__}: {what}")
    with torch.no_grad():
        for name, target in targets.items():
            src = sources[name].tensor(name)
            if src.shape != target.shape:
                raise ValueError(
                    f"{name} has shape {tuple(src.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(src)
    return model.eval()


def collect_ngram_stats(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    vocab_size: int,
    buckets: int,
    max_tokens_per_seq: int,
    pairs: bool = False,
    progress: bool = True,
    count_cap: int | None = None,
) -> NgramStats:
    """Token counts for the n-gram router (``dume_dist.core.ngram``) over the same tokens the Gram
    statistics see (real tokens among the first ``max_tokens_per_seq`` of each sequence): a token
    always counts as a unigram, and as a bigram with the sequence's previous real token when it
    has one. With ``pairs`` the exact bigram list is kept too (held-out statistics). No model
    runs: the counts depend on the token ids only. ``count_cap``: no sequence adds more than this
    to any one count (differential privacy by sequence, ``core.dp``)."""
    unigram_V = torch.zeros(vocab_size, dtype=torch.float64)
    context_V = torch.zeros(vocab_size, dtype=torch.float64)
    bigram_H = torch.zeros(buckets, dtype=torch.float64)
    found: list[torch.Tensor] = []
    bar = tqdm(disable=not progress, unit="tok", desc="n-gram counts")
    try:
        for ids_BT, mask_BT in batches:
            ids_BT, real_BT = ids_BT.cpu().long(), mask_BT.cpu().bool()
            keep_BT = _keep_mask(real_BT, max_tokens_per_seq)
            ids = ids_BT[keep_BT]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                raise ValueError(f"token ids must be in [0, {vocab_size}) for n-gram statistics")
            prev_BT, has_prev_BT = previous_real_tokens(ids_BT, real_BT)
            pair_BT = keep_BT & has_prev_BT
            prev, cur = prev_BT[pair_BT], ids_BT[pair_BT]
            row_BT = torch.arange(ids_BT.shape[0])[:, None].expand_as(ids_BT)
            row, pair_row = row_BT[keep_BT], row_BT[pair_BT]
            unigram_V += capped_bincount(ids, row, vocab_size, count_cap)
            context_V += capped_bincount(prev, pair_row, vocab_size, count_cap)
            bigram_H += capped_bincount(
                ngram_bucket(prev, cur, buckets), pair_row, buckets, count_cap
            )
            if pairs:
                found.append(torch.stack([prev, cur, torch.ones_like(cur)], dim=1))
                if sum(len(f) for f in found) > _PAIRS_BEFORE_COALESCING:  # bound the memory
                    found = [coalesce_pairs(torch.cat(found))]
            bar.update(int(keep_BT.sum()))
    finally:
        bar.close()
    if not unigram_V.sum() > 0:
        raise ValueError("no tokens to collect statistics from")
    pairs_K3 = (
        (coalesce_pairs(torch.cat(found)) if found else torch.zeros(0, 3).long()) if pairs else None
    )
    return NgramStats(unigram_V, context_V, bigram_H, pairs_K3=pairs_K3)
