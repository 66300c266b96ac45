"""Router statistics from a model run (DESIGN §2, steps 1-2).

``collect_stats`` hooks the input of every decoder layer's ``mlp`` (the output of
``post_attention_layernorm``), turns it into router features with
``modeling_dume.causal_features`` (the very function the model routes with, so statistics and
inference cannot diverge), keeps the real tokens (attention mask, and the first
``max_tokens_per_seq`` of each sequence) and adds them to a ``GramAccumulator``. The forward runs
the base model only (no LM head) and stops as soon as the last layer's MLP input is seen.
``collect_smoothed_stats`` does the same for several smoothing decays at once (the held-out
statistics that choose λ and β, see ``dume_dist.core.select``).

``GramCollector`` is the same, batch by batch with its additive state as one flat fp64 vector: the
collector of router kinds that read the MLP input (``dume_dist.model.kinds``).

It works on any model whose base model has ``layers[*].mlp``: a dense HF model, or a
``DumeForCausalLM`` with an expert forced. ``dense_model_for`` builds the dense model that equals
the MoE with one expert forced — all a contributor needs is the backbone and its own expert.

Shape legend: B batch, T sequence, D hidden size, N real tokens.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from dume_dist.core.dp import clip_rows
from dume_dist.core.stats import GramAccumulator, RouterStats
from dume_dist.model.data import keep_mask
from dume_dist.model.experts import ExpertSpec
from dume_dist.model.kinds import Collector, feed
from dume_dist.model.routing_dume import causal_ema, causal_features, routing_feature_dim


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


@contextlib.contextmanager
def mlp_inputs(model, fn: Callable[[int, torch.Tensor], None]):
    """Within the block, every forward of ``model`` calls ``fn(layer_index, x_BTD)`` with each
    decoder layer's MLP input, in layer order (forward pre-hooks, removed on leaving)."""

    def make_hook(i: int):
        def hook(module, args, kwargs):
            fn(i, args[0] if args else next(iter(kwargs.values())))

        return hook

    handles = [
        layer.mlp.register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
    names: dict[float, str] | None = None,
) -> dict[float, RouterStats]:
    """``{β: statistics}``: for each decay β, the Gram of the router features smoothed with
    ``routing_dume.causal_ema`` (β = 0: the plain features), in one pass over ``batches``.
    ``feature_map`` is ``names[β]`` (default: ``features`` for β = 0, ``"<features>+ema:<β>"``
    otherwise). ``clip`` bounds each token's feature norm (differential privacy, ``core.dp``)
    before smoothing."""
    collector = GramCollector(
        model, features=features, smoothings=smoothings, max_tokens_per_seq=max_tokens_per_seq,
        device=device, names=names, clip=clip,
    )  # fmt: skip
    feed(collector, batches, max_tokens_per_seq, progress=progress)
    return collector.result()


class GramCollector(Collector):
    """Per-layer Grams of the router features of the MLP inputs (``features``), one per
    smoothing decay, over the real tokens of the batches added (``Collector``). The model (or a
    function that makes it, called at the first batch) runs the base model only and stops after
    the last layer's MLP input."""

    def __init__(self, model, *, features: str, smoothings: Sequence[float],
                 max_tokens_per_seq: int, device=None, names: dict[float, str] | None = None,
                 num_layers: int | None = None, hidden_size: int | None = None,
                 clip: float | None = None):  # fmt: skip
        self.features, self.clip = features, clip
        self.smoothings = sorted({float(b) for b in smoothings})
        self.names = names or {
            b: features if b == 0.0 else f"{features}+ema:{b!r}" for b in self.smoothings
        }
        self.max_tokens_per_seq = max_tokens_per_seq
        self.device = resolve_device(device)
        self._model = model
        config = getattr(model, "config", None)
        num_layers = num_layers or config.num_hidden_layers
        dim = routing_feature_dim(features, hidden_size or config.hidden_size)
        self.acc = {b: GramAccumulator(num_layers, dim, self.device) for b in self.smoothings}
        self.num_tokens = 0

    def _ready_model(self):
        model = self._model() if callable(self._model) and not isinstance(
            self._model, torch.nn.Module
        ) else self._model  # fmt: skip
        self._model = model
        blocks = model.moe_blocks() if hasattr(model, "moe_blocks") else []
        if any(block.forced_expert is None for block in blocks):
            raise ValueError("statistics of a DUME model need an expert forced (set_forced_expert)")
        return model.to(self.device).eval()

    def add(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> None:
        model = self._ready_model()
        base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
        layers = decoder_layers(model)
        ids_BT, mask_BT = ids_BT.to(self.device), mask_BT.to(self.device)
        real_BT = mask_BT.bool()
        keep_BT = keep_mask(mask_BT, self.max_tokens_per_seq)

        def on_layer(layer_idx: int, x_BTD: torch.Tensor) -> None:
            feats_BTF, _ = causal_features(self.features, x_BTD, real_BT)
            if self.clip is not None:
                feats_BTF = clip_rows(feats_BTF.flatten(0, 1), self.clip).view_as(feats_BTF)
            for beta, acc in self.acc.items():
                smoothed_BTF, _ = causal_ema(feats_BTF, beta, real_BT)
                acc.add(layer_idx, smoothed_BTF[keep_BT])
            if layer_idx == len(layers) - 1:
                raise _StopForward

        try:
            with mlp_inputs(model, on_layer), torch.inference_mode():
                base(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
        except _StopForward:
            pass
        self.num_tokens += int(keep_BT.sum())

    def flat(self) -> torch.Tensor:
        return torch.cat([self.acc[b].gram_LPP.reshape(-1) for b in self.smoothings])

    def load_flat(self, flat: torch.Tensor) -> None:
        for beta, part in zip(self.smoothings, flat.chunk(len(self.smoothings))):
            acc = self.acc[beta]
            acc.gram_LPP = part.reshape(acc.gram_LPP.shape).to(acc.gram_LPP.device, torch.float64)

    def result(self) -> dict[float, RouterStats]:
        return {b: acc.result(feature_map=self.names[b]) for b, acc in self.acc.items()}


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
