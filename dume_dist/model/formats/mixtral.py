"""``mixtral``: a standard ``MixtralForCausalLM`` checkpoint, written directly from the build.

It loads with ``AutoModelForCausalLM.from_pretrained(dir)`` (no remote code) in transformers v5
and in the tools that read hub Mixtral checkpoints (transformers v4, vLLM, llama.cpp's
converter): its tensors use the names hub Mixtral checkpoints use.

What Mixtral can represent, and how DUME maps onto it
-----------------------------------------------------
* Dense family: llama or mistral, with ``silu`` MLPs, no attention or MLP biases.
* Router: Mixtral computes ``logits = W x`` (no bias), softmax, top-k, renormalised — which
  equals a softmax over the k chosen logits, DUME's rule. It has no intercept and no
  temperature, so the gate is the ridge solution **without intercept** solved from the fit
  statistics (``SolvedRouting.bias_free_routers``), rows normalised, divided by the temperature.
  It is *not* DUME's router with the bias dropped. Routings without such a form (other features,
  smoothing, other solvers, the n-gram router) are unsupported, with the routing's reason; so is
  a min_weight with k > 1 (Mixtral always runs its k experts).
* Router precision: Mixtral's gate runs in the model's dtype (DUME's in fp32): a bf16 export can
  pick another expert where two logits nearly tie; fp32 is exact.
* Experts: ``gate_proj / up_proj / down_proj`` become ``w1 / w3 / w2``; everything else (attention,
  norms, embeddings, lm_head, rope parameters, token ids, tied embeddings, mistral's sliding
  window) is carried over.

Layouts (transformers 5.23 ``modeling_mixtral.py``, ``conversion_mapping.py``): ``per_expert``
(hub names ``block_sparse_moe.experts.{j}.w1``; v5 converts them on load) and ``fused`` (v5's
``mlp.experts.gate_up_proj`` [E, 2I, H], gate first, and ``mlp.experts.down_proj`` [E, H, I];
loads in v5 only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import MixtralConfig

from dume_dist.model.card import write_model_card
from dume_dist.model.formats.base import CheckpointInput, OutputFormat, WriteOptions
from dume_dist.model.formats.dume import copy_tokenizer, output_dtype
from dume_dist.model.writer import ShardedWriter, atomic_directory

SUPPORTED_FAMILIES = ("llama", "mistral")
LAYOUTS = ("per_expert", "fused")
EXPORT_INFO_NAME = "dume_export.json"
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def dense_unsupported(dense) -> str | None:
    """Why a Mixtral checkpoint cannot hold experts of config ``dense`` (None when it can)."""
    if dense.model_type not in SUPPORTED_FAMILIES:
        return (
            f"experts of family {dense.model_type!r} are not supported "
            f"(Mixtral holds {' or '.join(SUPPORTED_FAMILIES)} experts)"
        )
    if getattr(dense, "attention_bias", False):
        return "the experts have attention_bias=True"
    if getattr(dense, "mlp_bias", False):
        return "the experts have mlp_bias=True"
    if dense.hidden_act != "silu":
        return f"the experts' hidden_act is {dense.hidden_act!r}, Mixtral runtimes assume 'silu'"
    rope = getattr(dense, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope or "rope_theta" not in rope:
        return f"unsupported rope_parameters {rope!r} (expected one dict with rope_type and rope_theta)"
    return None


def backbone_names(dense) -> dict[str, tuple[int, ...] | None]:
    """Every non-MLP tensor a Mixtral model holds, with the shapes relied on."""
    hid = dense.hidden_size
    out: dict[str, tuple[int, ...] | None] = {
        "model.embed_tokens.weight": (dense.vocab_size, hid),
        "model.norm.weight": (hid,),
    }
    if not dense.tie_word_embeddings:
        out["lm_head.weight"] = (dense.vocab_size, hid)
    for layer in range(dense.num_hidden_layers):
        pre = f"model.layers.{layer}"
        for proj in _ATTN:
            out[f"{pre}.self_attn.{proj}.weight"] = None  # Mixtral's attention = Llama's
        out[f"{pre}.input_layernorm.weight"] = (hid,)
        out[f"{pre}.post_attention_layernorm.weight"] = (hid,)
    return out


def tensors_unsupported(inp: CheckpointInput) -> str | None:
    dense = inp.dense_config
    expected = backbone_names(dense)
    have = set(inp.backbone.names())
    ignored = {"lm_head.weight"} if dense.tie_word_embeddings else set()
    for name in sorted(have - set(expected) - ignored):
        return f"tensor {name} has no place in a Mixtral model"
    for name in sorted(set(expected) - have):
        return f"the backbone has no tensor {name}"
    hid, inter = dense.hidden_size, dense.intermediate_size
    shapes = {"gate_proj": (inter, hid), "up_proj": (inter, hid), "down_proj": (hid, inter)}
    for spec in inp.experts:
        for layer in range(inp.num_layers):
            names = spec.mlp_names_of_layer(layer)
            want = {f"model.layers.{layer}.mlp.{p}.weight" for p in _EXPERT_PARAMS}
            if set(names) != want:
                extra = sorted(set(names) ^ want)[0]
                return f"expert {spec.name}: tensor {extra} has no place in a Mixtral expert"
            for p in _EXPERT_PARAMS:
                info = spec.index.get(f"model.layers.{layer}.mlp.{p}.weight")
                if info is not None and tuple(info.shape) != shapes[p]:
                    return f"expert {spec.name}: {p} of layer {layer} has shape {info.shape}"
    return None


def mixtral_config(dense, *, num_experts: int, top_k: int, dtype: torch.dtype) -> MixtralConfig:
    """The ``MixtralConfig``: the dense config's shape, rope and token settings."""
    head_dim = getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads
    sliding = getattr(dense, "sliding_window", None) if dense.model_type == "mistral" else None
    return MixtralConfig(
        architectures=["MixtralForCausalLM"],
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads or dense.num_attention_heads,
        head_dim=head_dim,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        initializer_range=dense.initializer_range,
        rms_norm_eps=dense.rms_norm_eps,
        use_cache=dense.use_cache,
        pad_token_id=dense.pad_token_id,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        tie_word_embeddings=bool(dense.tie_word_embeddings),
        sliding_window=sliding,
        attention_dropout=dense.attention_dropout or 0.0,
        num_experts_per_tok=top_k,
        num_local_experts=num_experts,
        output_router_logits=False,
        router_jitter_noise=0.0,
        # Always explicit (rope_theta included): Mixtral's default theta is 1e6, Llama's 1e4.
        rope_parameters=json.loads(json.dumps(dense.rope_parameters)),
        dtype=str(dtype).removeprefix("torch."),
    )


def _write_layer_experts(writer, inp, layer, gate, dtype, layout) -> None:
    pre = f"model.layers.{layer}"
    names = {p: f"{pre}.mlp.{p}.weight" for p in _EXPERT_PARAMS}
    if layout == "per_expert":
        moe = f"{pre}.block_sparse_moe"
        writer.add(f"{moe}.gate.weight", gate.to(dtype))
        for j, spec in enumerate(inp.experts):
            for p in _EXPERT_PARAMS:
                writer.add(
                    f"{moe}.experts.{j}.{_MIXTRAL_NAMES[p]}.weight", spec.tensor(names[p]).to(dtype)
                )
        return
    writer.add(f"{pre}.mlp.gate.weight", gate.to(dtype))
    gate_up_EIH = torch.stack(
        [
            torch.cat([s.tensor(names["gate_proj"]), s.tensor(names["up_proj"])]).to(dtype)
            for s in inp.experts
        ]
    )
    writer.add(f"{pre}.mlp.experts.gate_up_proj", gate_up_EIH)
    del gate_up_EIH
    down_EHI = torch.stack([s.tensor(names["down_proj"]).to(dtype) for s in inp.experts])
    writer.add(f"{pre}.mlp.experts.down_proj", down_EHI)


def write_tensors(writer, inp: CheckpointInput, gates: list, dtype, layout: str) -> None:
    """Tensors in the order ``save_pretrained`` writes them, one layer at a time."""

    def copy(name: str) -> None:
        writer.add(name, inp.backbone.tensor(name).to(dtype))

    copy("model.embed_tokens.weight")
    for layer in range(inp.num_layers):
        pre = f"model.layers.{layer}"
        copy(f"{pre}.input_layernorm.weight")
        for proj in _ATTN:
            copy(f"{pre}.self_attn.{proj}.weight")
        copy(f"{pre}.post_attention_layernorm.weight")
        _write_layer_experts(writer, inp, layer, gates[layer], dtype, layout)
    copy("model.norm.weight")
    if not inp.dense_config.tie_word_embeddings:
        copy("lm_head.weight")


class MixtralFormat(OutputFormat):
    name = "mixtral"
    description = "standard MixtralForCausalLM checkpoint (no remote code); bias-free ridge gates"

    def __init__(self, layout: str = "per_expert"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout

    def unsupported(self, inp: CheckpointInput) -> str | None:
        reason = dense_unsupported(inp.dense_config) or inp.routing.bias_free_unsupported()
        if reason:
            return reason
        min_weight = float(getattr(inp.routing.spec, "min_weight", 0.0) or 0.0)
        if inp.top_k > 1 and min_weight > 0:  # Mixtral always runs its k experts
            return (
                f"min_weight={min_weight:g} with k={inp.top_k}: a Mixtral gate always runs its "
                "k experts (use min_weight 0)"
            )
        if inp.stats is None or not inp.stats.fit:
            return "the gate without intercept is solved from the experts' statistics: none given"
        return tensors_unsupported(inp)

    def gates(self, inp: CheckpointInput) -> list[torch.Tensor]:
        """Per layer the gate ``W / T`` (fp64 until written)."""
        index = {n: j for j, n in enumerate(inp.expert_names)}
        fit = {n: (index[n], inp.stats.fit[n]) for n in inp.expert_names}
        routers = inp.routing.bias_free_routers(fit, len(inp.experts))
        return [r.weight_EF / inp.temperature for r in routers]

    def write(self, inp: CheckpointInput, out_dir: str | Path, options: WriteOptions) -> dict:
        self.check(inp)
        if not 1 <= inp.top_k <= len(inp.experts):
            raise ValueError(
                f"top_k must be an integer in [1, {len(inp.experts)}], got {inp.top_k!r}"
            )
        if not inp.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {inp.temperature!r}")
        gates = self.gates(inp)
        dtype = output_dtype(inp)
        config = mixtral_config(
            inp.dense_config, num_experts=len(inp.experts), top_k=inp.top_k, dtype=dtype
        )
        info = {
            "format": "mixtral",
            "layout": self.layout,
            "expert_names": inp.expert_names,
            "lam": float(inp.routing.lam),
            "temperature": float(inp.temperature),
            "top_k": inp.top_k,
            "router": "ridge without intercept from the experts' statistics, unit-norm rows, divided by T",
            **dict(inp.provenance.extra_manifest),
        }
        with atomic_directory(out_dir, options.overwrite) as tmp:
            writer = ShardedWriter(tmp, options.max_shard_bytes)
            try:
                write_tensors(writer, inp, gates, dtype, self.layout)
                writer.close()
            finally:
                writer.abort()
            config.save_pretrained(str(tmp))
            copy_tokenizer(inp, tmp)
            if options.model_card:
                card = {**info, "num_experts": len(inp.experts), "experts": _card_experts(inp)}
                card["routing"] = {
                    "features": "token",
                    "solver": "ridge (no intercept)",
                    "lam": info["lam"],
                }
                write_model_card(tmp, card, fmt="mixtral")
            (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        return info


def _card_experts(inp: CheckpointInput) -> list[dict]:
    prov = inp.provenance
    return [
        {"index": j, "name": n, "domain": prov.domains.get(n, n),
         "expert_fingerprint": prov.expert_fingerprints.get(n, "")}
        for j, n in enumerate(inp.expert_names)
    ]  # fmt: skip
