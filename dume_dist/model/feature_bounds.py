"""How large a router feature of one token can be, from the backbone's weights alone.

The router features are built from the input of each layer's MLP, the output of a norm
(``post_attention_layernorm`` in Llama-style decoders). An RMSNorm output is ``w ⊙ z`` with
``Σ z_i² = d`` (``z = x / rms(x)``; the epsilon only shrinks it), and a LayerNorm output adds a
bias, so one token's squared feature norm is at most ``(√d · max|w| + |b|)²`` — whatever the
expert's MLPs did before. A statistics blob whose features exceed this cannot come from real
tokens (`core.stats.check_gram_values`). The norm before the MLP is named per model family in
`MLP_INPUT_NORMS` (a data table); for a family not in it the bound is unknown (``None``).
"""

from __future__ import annotations

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
    the backbone's family is not in `MLP_INPUT_NORMS`. ``backbone``: a `model.backbone.Backbone`."""
    config = backbone.config
    known = MLP_INPUT_NORMS.get(getattr(config, "model_type", ""))
    if known is None:
        return None
    norm, offset = known
    names = set(backbone.names())
    d = int(config.hidden_size)
    out = []
    for layer in range(int(config.num_hidden_layers)):
        prefix = f"model.layers.{layer}.{norm}"
        if f"{prefix}.weight" not in names:
            return None
        w = backbone.tensor(f"{prefix}.weight").double() + offset
        b = backbone.tensor(f"{prefix}.bias").double() if f"{prefix}.bias" in names else None
        bias_norm = float(b.norm()) if b is not None else 0.0
        out.append((math.sqrt(d) * float(w.abs().max()) + bias_norm) ** 2)
    return torch.tensor(out, dtype=torch.float64)
