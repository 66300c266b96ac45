"""How large a router feature of one token can be, from the backbone's weights alone.

The router features are built from the input of each layer's MLP, the output of a norm
(``post_attention_layernorm`` in Llama-style decoders). An RMSNorm output is ``w ⊙ z`` with
``Σ z_i² = d`` (``z = x / rms(x)``; the epsilon only shrinks it), and a LayerNorm output adds a
bias, so one token's squared feature norm is at most ``(√d · max|w| + |b|)²`` — whatever the
expert's MLPs did before. A statistics blob whose features exceed this cannot come from real
tokens (`core.stats.check_gram_values`). The norm before the MLP is named per model family in
`MLP_INPUT_NORMS` (a data table). For a family not in it, `discover_mlp_input_norm` finds it
from the architecture itself: a two-layer copy with a small vocabulary and a narrow MLP is built
on random weights and run once with hooks, and the norm whose output tensor *is* the MLP's
input is taken — not a
norm that merely runs before it (post-norm families, whose MLP input is no norm's output, get
no bound). The norm module is then probed on real numbers: with zero weight it gives 0 (scale
``w``) or its normalised input (scale ``1 + w``), and it must never exceed ``Σ z_i² ≤ d``.
Anything else leaves the bound unknown (``None``).
"""

from __future__ import annotations

import copy
import math

import torch

# model_type -> (norm whose output is the MLP input, weight offset: Gemma norms scale by 1 + w)
MLP_INPUT_NORMS = {
    "llama": ("post_attention_layernorm", 0.0),
    "mistral": ("post_attention_layernorm", 0.0),
    "mixtral": ("post_attention_layernorm", 0.0),
    "qwen2": ("post_attention_layernorm", 0.0),
    "qwen3": ("post_attention_layernorm", 0.0),
    "phi3": ("post_attention_layernorm", 0.0),
    "gemma": ("post_attention_layernorm", 1.0),
    "gemma2": ("pre_feedforward_layernorm", 1.0),
    "gemma3_text": ("pre_feedforward_layernorm", 1.0),
}


def mlp_input_norm_sq_bound(backbone) -> torch.Tensor | None:
    """``[L]`` float64: per layer, the largest ``|x|²`` a token's MLP input can have; None when
    no norm is known or found to produce it. ``backbone``: a `model.backbone.Backbone`."""
    config = backbone.config
    known = MLP_INPUT_NORMS.get(getattr(config, "model_type", "")) or discover_mlp_input_norm(
        config
    )
    if known is None:
        return None
    norm, offset = known
    names = set(backbone.names())
    layers = _layers_prefix(names, norm)
    if layers is None:
        return None
    d = int(config.hidden_size)
    out = []
    for layer in range(int(config.num_hidden_layers)):
        prefix = f"{layers}{layer}.{norm}"
        if f"{prefix}.weight" in names:
            scale = float((backbone.tensor(f"{prefix}.weight").double() + offset).abs().max())
        elif offset == 1.0 and f"{prefix}.bias" not in names:
            scale = 1.0  # a norm without parameters: its output is z itself
        else:
            return None
        b = backbone.tensor(f"{prefix}.bias").double() if f"{prefix}.bias" in names else None
        bias_norm = float(b.norm()) if b is not None else 0.0
        out.append((math.sqrt(d) * scale + bias_norm) ** 2)
    return torch.tensor(out, dtype=torch.float64)


def _layers_prefix(names: set[str], norm: str) -> str | None:
    """The prefix of the decoder layers' tensor names (``model.layers.``, ``gpt_neox.layers.``)
    by where the first layer's ``norm`` or its attention is; None when neither is found."""
    for suffix in (f".0.{norm}.weight", f".0.{norm}.bias", ".0.self_attn.o_proj.weight"):
        hits = sorted(n[: -len(suffix) + 1] for n in names if n.endswith(suffix))
        hits = [h for h in hits if h.endswith("layers.")]
        if hits:
            return hits[0]
    return None


def discover_mlp_input_norm(config) -> tuple[str, float] | None:
    """``(norm name inside a decoder layer, weight offset)`` of the norm whose output is the
    MLP's input in every layer of ``config``'s architecture, found by running a two-layer,
    small-vocabulary, narrow-MLP copy of it once on random weights; None when there is no such
    norm or it is not one this bound covers."""
    from transformers import AutoModelForCausalLM

    small = copy.deepcopy(config)
    small.num_hidden_layers = min(2, int(config.num_hidden_layers))
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = small.layer_types[: small.num_hidden_layers]
    small.vocab_size = min(int(config.vocab_size), 256)
    if getattr(small, "intermediate_size", None):
        small.intermediate_size = 16  # the MLP's width does not change what feeds it
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(small).eval()
        layers = _decoder_layers(model)
        if layers is None:
            return None
        fed = _norms_feeding_mlps(model, layers)
    except Exception:  # an architecture that does not build or run this way: unknown
        return None
    if len(fed) != len(layers) or len({name for name, _ in fed}) != 1:
        return None
    name, module = fed[0]
    offset = _probe_norm(module, int(config.hidden_size))
    return None if offset is None else (name, offset)


def _decoder_layers(model):
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        return None
    return list(layers)


def _norms_feeding_mlps(model, layers) -> list[tuple[str, torch.nn.Module]]:
    """Per layer, the (name, module) of a direct child whose output tensor is the MLP's input."""
    outputs: dict[
        int, tuple[str, torch.nn.Module, torch.Tensor]
    ] = {}  # tensors kept: ids stay unique
    found: list[tuple[str, torch.nn.Module]] = []
    handles = []
    for layer in layers:
        for name, child in layer.named_children():
            if name != "mlp" and "norm" in type(child).__name__.lower():

                def keep(module, args, out, name=name):
                    if isinstance(out, torch.Tensor):
                        outputs[id(out)] = (name, module, out)

                handles.append(child.register_forward_hook(keep))

        def match(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            hit = outputs.get(id(x))
            if hit is not None and hit[2] is x:
                found.append(hit[:2])

        handles.append(layer.mlp.register_forward_pre_hook(match, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(4)[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _probe_norm(norm: torch.nn.Module, dim: int) -> float | None:
    """0.0 when the norm scales by ``w``, 1.0 when by ``1 + w``; None when it is neither or its
    unit-weight output can exceed ``Σ z_i² ≤ d`` (then the bound would not hold)."""
    module = copy.deepcopy(norm).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, dim, generator=g, dtype=torch.float64) * 3 + 5
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        zero = module(x)
        offset = 0.0 if float(zero.abs().max()) == 0.0 else 1.0
        for name, p in module.named_parameters():
            p.fill_(1.0 - offset if name.endswith("weight") else 0.0)
        out = module(x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None
    if offset == 1.0 and not torch.allclose(zero, out):  # neither w nor 1 + w
        return None
    if float(out.pow(2).sum(-1).max()) > dim * (1 + 1e-6):
        return None
    return offset
