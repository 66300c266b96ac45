"""DUME as a Hugging Face model: ``DumeConfig`` (``model_type="dume"``) and ``DumeForCausalLM``.

This file owns the inference-time model of a MoErged checkpoint: the dense family's decoder stack
(attention, norms, embeddings, rotary, KV cache — all the family's own code) with every decoder
layer's ``mlp`` replaced by a ``DumeMoeBlock`` whose expert *j* is an unchanged instance of the
family's own MLP class, routed by a closed-form (ridge) router.

It is copied verbatim into every published model directory and loaded there with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``, so it imports only the
standard library, torch and transformers — never ``dume_dist``.

Checkpoint contract (a writer that streams tensors must produce exactly this)
-----------------------------------------------------------------------------
Files: ``config.json``, ``modeling_dume.py`` (this file, verbatim), safetensors weights
(``model.safetensors`` or shards + ``model.safetensors.index.json``).

``config.json`` is ``DumeConfig(...).to_diff_dict()`` — what ``DumeConfig.save_pretrained(dir)``
writes (that call also copies this file next to it). It contains:

* ``"model_type": "dume"``, ``"architectures": ["DumeForCausalLM"]``,
  ``"auto_map": {"AutoConfig": "modeling_dume.DumeConfig",
  "AutoModelForCausalLM": "modeling_dume.DumeForCausalLM"}``;
* ``"base_config"``: the dense experts' own ``config.to_dict()`` (``model_type`` llama, mistral,
  qwen2, qwen3, ... — any family whose decoder layers call ``self.mlp(hidden_states)``);
* ``"num_experts"`` (E), ``"num_experts_per_tok"`` (k, default 1), ``"router_temperature"``
  (T > 0, default 1.0), ``"router_bias"`` (default true), ``"expert_names"`` (E strings),
  ``"routing"`` (default ``{"features": "token"}``; only token features exist for now);
* ``"dtype"`` and ``"transformers_version"``;
* a flat copy of ``base_config``'s model keys (``vocab_size``, ``hidden_size``,
  ``num_hidden_layers``, ``tie_word_embeddings``, ``rope_parameters``, token ids, ...), so that
  generation, caches and serving tools find the attributes they expect. ``base_config`` is the
  source of truth: on load the flat copy is overwritten from it.

State-dict keys: the dense family's keys for everything outside the MLPs
(``model.embed_tokens.weight``, ``model.layers.{l}.self_attn.q_proj.weight``, ...,
``model.norm.weight``, ``lm_head.weight`` — absent when ``tie_word_embeddings``), and per layer

* ``model.layers.{l}.mlp.router.weight`` [E, hidden], ``model.layers.{l}.mlp.router.bias`` [E]
  (only when ``router_bias``);
* ``model.layers.{l}.mlp.experts.{j}.<the family's MLP keys>``, e.g. ``gate_proj.weight``.

Routing (per token x, the input of the MLP): ``logits = (W x + b) / T`` in fp32; top-k;
weights = softmax over those k logits (fp32); output = sum_i weight_i * expert_i(x), cast back to
x's dtype. Only the chosen experts run, each on its own tokens only.

Shape legend: B batch, T sequence, N = B*T tokens, D hidden size, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

DISPATCH_MODES = ("sparse", "all")
ROUTING_FEATURES = ("token",)

# base_config keys that are not copied onto DumeConfig: identity/bookkeeping of the dense
# checkpoint, and the generic PretrainedConfig fields that DumeConfig owns itself.
_NOT_COPIED = {
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "output_attentions",
    "num_labels",
} | {f.name for f in dataclasses.fields(PretrainedConfig)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _canonical_base_config(base_config: dict) -> dict:
    """base_config exactly as config.json stores it (string keys, lists, dtype names), minus the
    dense checkpoint's private bookkeeping (e.g. its local `_name_or_path`), so a fresh config and
    a loaded one compare and hash equal."""

    def dtype_name(value):
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        raise TypeError(f"base_config value {value!r} is not JSON-serialisable")

    plain = json.loads(json.dumps(base_config, default=dtype_name))
    return {k: v for k, v in plain.items() if not k.startswith("_")}


class DumeConfig(PretrainedConfig):
    """Config of a DUME MoE built from dense experts of one family (see the module docstring)."""

    model_type = "dume"

    base_config: dict | None = None
    num_experts: int = 1
    num_experts_per_tok: int = 1
    router_temperature: float = 1.0
    router_bias: bool = True
    expert_names: list[str] | None = None
    routing: dict | None = None

    def __post_init__(self, **kwargs):
        if self.architectures is None:
            self.architectures = ["DumeForCausalLM"]
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "modeling_dume.DumeConfig",
                "AutoModelForCausalLM": "modeling_dume.DumeForCausalLM",
            },
        )
        if self.routing is None:
            self.routing = {"features": "token"}
        super().__post_init__(**kwargs)
        self._validate()
        if self.base_config is not None:
            self.base_config = _canonical_base_config(self.base_config)
            self._copy_base_attributes()

    def _validate(self) -> None:
        if not _is_int(self.num_experts) or self.num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        k = self.num_experts_per_tok
        if not _is_int(k) or not 1 <= k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be an integer in [1, num_experts={self.num_experts}], "
                f"got {k!r}"
            )
        temperature = self.router_temperature
        if not (_is_int(temperature) or isinstance(temperature, float)) or not temperature > 0:
            raise ValueError(f"router_temperature must be a number > 0, got {temperature!r}")
        if not isinstance(self.router_bias, bool):
            raise ValueError(f"router_bias must be a bool, got {self.router_bias!r}")
        if self.expert_names is None:
            self.expert_names = [f"expert_{j}" for j in range(self.num_experts)]
        if not isinstance(self.expert_names, list) or len(self.expert_names) != self.num_experts:
            raise ValueError(
                f"expert_names must have num_experts={self.num_experts} entries, "
                f"got {self.expert_names!r}"
            )
        if not isinstance(self.routing, dict):
            raise ValueError(f"routing must be a dict, got {self.routing!r}")
        for key in self.routing:
            if key != "features":
                raise ValueError(f"routing.{key} is not a known routing option")
        if self.routing.get("features", "token") not in ROUTING_FEATURES:
            raise ValueError(
                f"routing.features must be one of {ROUTING_FEATURES}, got {self.routing['features']!r}"
            )
        if isinstance(self.base_config, PretrainedConfig):
            self.base_config = self.base_config.to_dict()
        if self.base_config is not None:
            if not isinstance(self.base_config, dict) or "model_type" not in self.base_config:
                raise ValueError("base_config must be a dense config's to_dict() with a model_type")
            if self.base_config["model_type"] == self.model_type:
                raise ValueError("base_config.model_type must be a dense family, not 'dume'")

    def _copy_base_attributes(self) -> None:
        own_fields = {f.name for f in dataclasses.fields(self)}
        for key, value in self.base_config.items():
            if key in _NOT_COPIED or key in own_fields:
                continue
            setattr(self, key, value)
        if self.dtype is None and self.base_config.get("dtype") is not None:
            self.dtype = getattr(torch, str(self.base_config["dtype"]).removeprefix("torch."))

    def build_base_config(self) -> PretrainedConfig:
        """The dense family's own config object (e.g. ``LlamaConfig``) built from ``base_config``."""
        if self.base_config is None:
            raise ValueError("base_config is required to build a model")
        return AutoConfig.for_model(**self.base_config)


class DumeExperts(nn.ModuleList):
    """The E dense MLPs of one layer; ``forward`` runs each chosen expert on its tokens only."""

    def forward(
        self, hidden_ND: torch.Tensor, topk_index_NK: torch.Tensor, topk_weight_NK: torch.Tensor
    ) -> torch.Tensor:
        num_tokens, k = topk_index_NK.shape
        flat_expert = topk_index_NK.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_of_slot = order // k
        weight_of_slot = topk_weight_NK.reshape(-1)[order]
        # One host sync for the whole layer: how many (token, slot) pairs each expert got.
        counts = torch.bincount(flat_expert, minlength=len(self)).tolist()

        out_ND = torch.zeros(
            num_tokens, hidden_ND.shape[-1], dtype=torch.float32, device=hidden_ND.device
        )
        start = 0
        for j, count in enumerate(counts):
            if count == 0:
                continue
            token_idx = token_of_slot[start : start + count]
            expert_out = self[j](hidden_ND[token_idx]).float()
            # A token appears at most once per expert, so index_add_ is deterministic here.
            out_ND.index_add_(
                0, token_idx, expert_out * weight_of_slot[start : start + count, None]
            )
            start += count
        return out_ND

    def forward_all(
        self, hidden_ND: torch.Tensor, topk_index_NK: torch.Tensor, topk_weight_NK: torch.Tensor
    ) -> torch.Tensor:
        """Every expert on every token, weighted (zero off the top-k): the paper's reference code."""
        weight_NE = torch.zeros(
            hidden_ND.shape[0], len(self), dtype=torch.float32, device=hidden_ND.device
        )
        weight_NE.scatter_(1, topk_index_NK, topk_weight_NK)
        out_ND = torch.zeros(hidden_ND.shape, dtype=torch.float32, device=hidden_ND.device)
        for j, expert in enumerate(self):
            out_ND += weight_NE[:, j, None] * expert(hidden_ND).float()
        return out_ND


class DumeMoeBlock(nn.Module):
    """Router + experts replacing one decoder layer's MLP."""

    def __init__(
        self,
        experts: list[nn.Module],
        hidden_size: int,
        top_k: int,
        temperature: float,
        router_bias: bool,
    ):
        super().__init__()
        self.top_k = top_k
        self.temperature = float(temperature)
        self.router = nn.Linear(hidden_size, len(experts), bias=router_bias)
        self.experts = DumeExperts(experts)
        self.dispatch = "sparse"
        # None: route; int j: expert j everywhere; LongTensor [B]: expert per sequence.
        self.forced_expert: int | torch.Tensor | None = None
        self.record_routing = False
        self.last_topk_index: torch.Tensor | None = None  # [B, T, K] when record_routing

    def route(self, hidden_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices [N, K] and their softmax weights [N, K] (fp32)."""
        bias = None if self.router.bias is None else self.router.bias.float()
        logits_NE = F.linear(hidden_ND.float(), self.router.weight.float(), bias) / self.temperature
        topk_logit_NK, topk_index_NK = logits_NE.topk(self.top_k, dim=-1)
        return topk_index_NK, topk_logit_NK.softmax(dim=-1)

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        if self.forced_expert is not None:
            return self._forward_forced(hidden_BTD)
        hidden_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
        topk_index_NK, topk_weight_NK = self.route(hidden_ND)
        if self.record_routing:
            self.last_topk_index = topk_index_NK.reshape(*hidden_BTD.shape[:-1], self.top_k)
        if self.dispatch == "sparse":
            out_ND = self.experts(hidden_ND, topk_index_NK, topk_weight_NK)
        else:
            out_ND = self.experts.forward_all(hidden_ND, topk_index_NK, topk_weight_NK)
        return out_ND.to(hidden_BTD.dtype).reshape(hidden_BTD.shape)

    def _forward_forced(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        forced = self.forced_expert
        if isinstance(forced, int):
            return self.experts[forced](hidden_BTD)
        if forced.shape != hidden_BTD.shape[:1]:
            raise ValueError(
                f"forced expert ids have shape {tuple(forced.shape)}, expected [batch={hidden_BTD.shape[0]}]"
            )
        forced = forced.to(hidden_BTD.device)
        out_BTD = torch.empty_like(hidden_BTD)
        for j in forced.unique().tolist():
            rows = (forced == j).nonzero().squeeze(1)
            out_BTD[rows] = self.experts[j](hidden_BTD[rows])
        return out_BTD


class DumeForCausalLM(PreTrainedModel, GenerationMixin):
    """The dense family's decoder stack with one ``DumeMoeBlock`` per layer, plus an LM head."""

    config_class = DumeConfig
    config: DumeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Closed-form routers are cheap and their logit gaps can be small: keep them fp32 on load.
    _keep_in_fp32_modules_strict = ["mlp.router"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: DumeConfig):
        super().__init__(config)
        base_config = config.build_base_config()
        # The dense stack must use the attention backend resolved for this model.
        base_config._attn_implementation = config._attn_implementation
        # The family's base model class itself, not AutoModel.from_config: that one would re-apply
        # base_config's dtype and so override the dtype from_pretrained asked for.
        self.model = MODEL_MAPPING[type(base_config)](base_config)
        layers = getattr(self.model, "layers", None)
        if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
            raise ValueError(
                f"base_config.model_type={base_config.model_type!r}: its base model has no "
                "`layers[*].mlp` to replace"
            )
        for layer in layers:
            mlp_cls = type(layer.mlp)
            layer.mlp = DumeMoeBlock(
                [mlp_cls(base_config) for _ in range(config.num_experts)],
                hidden_size=base_config.hidden_size,
                top_k=config.num_experts_per_tok,
                temperature=config.router_temperature,
                router_bias=config.router_bias,
            )
        self.vocab_size = base_config.vocab_size
        self.lm_head = nn.Linear(base_config.hidden_size, base_config.vocab_size, bias=False)
        self.post_init()

    def moe_blocks(self) -> list[DumeMoeBlock]:
        return [m for m in self.modules() if isinstance(m, DumeMoeBlock)]

    def set_dispatch(self, mode: str) -> None:
        """``"sparse"`` (default): chosen experts on their tokens; ``"all"``: every expert, weighted."""
        if mode not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {mode!r}")
        for block in self.moe_blocks():
            block.dispatch = mode

    def set_forced_expert(self, expert: int | torch.Tensor | None) -> None:
        """Bypass the routers: expert j in every layer, per-sequence ids [B], or None to route."""
        num_experts = self.config.num_experts
        if isinstance(expert, torch.Tensor):
            if expert.dim() != 1 or expert.dtype not in (torch.int32, torch.int64):
                raise ValueError("forced expert ids must be a 1-D integer tensor [batch]")
            if expert.numel() and not (0 <= int(expert.min()) and int(expert.max()) < num_experts):
                raise ValueError(f"forced expert ids must be in [0, {num_experts})")
            expert = expert.long()
        elif expert is not None:
            if not _is_int(expert) or not 0 <= expert < num_experts:
                raise ValueError(
                    f"forced expert must be an int in [0, {num_experts}), got {expert!r}"
                )
        for block in self.moe_blocks():
            block.forced_expert = expert

    def set_record_routing(self, enabled: bool) -> None:
        """Keep each block's last top-k indices in ``block.last_topk_index`` [B, T, K]."""
        for block in self.moe_blocks():
            block.record_routing = bool(enabled)
            block.last_topk_index = None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_BTD = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_BTD)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# save_pretrained then writes `auto_map` and copies this file next to config.json.
DumeConfig.register_for_auto_class()
DumeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
