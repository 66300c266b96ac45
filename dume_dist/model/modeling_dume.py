"""DUME as a Hugging Face model: ``DumeForCausalLM`` (config: ``configuration_dume.DumeConfig``).

This file owns the inference-time model of a MoErged checkpoint: the dense family's decoder stack
(attention, norms, embeddings, rotary, KV cache — all the family's own code) with every decoder
layer's ``mlp`` replaced by a ``DumeMoeBlock`` whose expert *j* is an unchanged instance of the
family's own MLP class, routed by the checkpoint's router kind (``routing_dume.py``).

It is copied, with its siblings ``configuration_dume.py``, ``routing_dume.py``,
``routing_switch.py`` and ``routing_options.py`` (its relative imports), into every published
model directory and loaded there with ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)``, so the five import only the standard library, torch and transformers —
never ``dume_dist``.

Checkpoint contract (a writer that streams tensors must produce exactly this)
-----------------------------------------------------------------------------
Files: ``config.json``, the five remote-code files (verbatim), safetensors weights
(``model.safetensors`` or shards + ``model.safetensors.index.json``).

``config.json`` is ``DumeConfig(...).to_diff_dict()`` — what ``DumeConfig.save_pretrained(dir)``
writes (that call also copies the code next to it). It contains:

* ``"model_type": "dume"``, ``"architectures": ["DumeForCausalLM"]``,
  ``"auto_map": {"AutoConfig": "modeling_dume.DumeConfig",
  "AutoModelForCausalLM": "modeling_dume.DumeForCausalLM"}``;
* ``"base_config"``: the dense experts' own ``config.to_dict()`` (``model_type`` llama, mistral,
  qwen2, qwen3, ... — any family whose decoder layers call ``self.mlp(hidden_states)``);
* ``"num_experts"`` (E), ``"num_experts_per_tok"`` (k, default 1), ``"router_temperature"``
  (T > 0, default 1.0), ``"router_bias"`` (default true), ``"expert_names"`` (E strings),
  ``"routing"`` (default ``{"features": "token"}``, see *Routing* below);
* ``"dtype"`` and ``"transformers_version"``;
* a flat copy of ``base_config``'s model keys (``vocab_size``, ``hidden_size``,
  ``num_hidden_layers``, ``tie_word_embeddings``, ``rope_parameters``, token ids, ...), so that
  generation, caches and serving tools find the attributes they expect. ``base_config`` is the
  source of truth: on load the flat copy is overwritten from it.

State-dict keys: the dense family's keys for everything outside the MLPs
(``model.embed_tokens.weight``, ``model.layers.{l}.self_attn.q_proj.weight``, ...,
``model.norm.weight``, ``lm_head.weight`` — absent when ``tie_word_embeddings``), per layer
``model.layers.{l}.mlp.experts.{j}.<the family's MLP keys>`` (e.g. ``gate_proj.weight``), and the
router kind's tensors:

* ``linear`` (``routing.kind``; configs without one and without ``features: ngram``):
  ``model.layers.{l}.mlp.router.weight`` [E, F] (F = hidden for ``token`` features, 2*hidden for
  ``prefix_mean``), ``model.layers.{l}.mlp.router.bias`` [E] (only when ``router_bias``);
* ``ngram`` (or ``routing.features == "ngram"``): ``ngram_router.unigram_counts`` [E, V],
  ``ngram_router.context_counts`` [E, V], ``ngram_router.bigram_counts`` [E, buckets] (fp32
  counts) and ``routing.ngram = {"buckets", "mu", "alpha"}``;
* another kind: what its inference code (``routing.module``) declares.

Routing
-------
Per token t of a sequence, with x_t the input of the MLP (the output of
``post_attention_layernorm``) and only the sequence's *real* tokens counted (attention mask): the
kind gives logits ``z_t`` [E] — a per-layer router from x_t (``linear``: ``(W f_t + b) / T`` on
features ``f_t``, optionally smoothed over the sequence) or one sequence-level router from the
token ids for every layer (``ngram``: naive-Bayes log-likelihoods / T); then the top-k of the
logits, weights = softmax over those k (fp32; with ``routing.min_weight`` the weights below it
dropped and the rest renormalised); output = sum_i weight_i * expert_i(x), cast back to x's
dtype. Only the chosen experts run. The formulas are in ``routing_dume.py``.

Context-aware routing carries running state per sequence. With a KV cache it lives on the
``past_key_values`` Cache object (attribute ``dume_routing``) and follows it (beam reordering,
batch selection), so decoding with a cache gives the same routing as a full forward. ``routing``
may also hold informational keys the model does not read (``solver``, ``lam``, ``preset``, ...).

Shape legend: B batch, T sequence, N = B*T tokens, D hidden size, F router features, E experts,
K experts per token.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_MAPPING,
    DynamicCache,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_dume import DumeConfig as _DumeConfig
from .configuration_dume import _is_int
from .routing_dume import (  # noqa: F401  (re-exported: the one definition statistics share)
    DumeNgramRouter,
    RoutingContext,
    causal_ema,
    causal_features,
    fixed_share_posterior,
    inference_kind,
    ngram_bucket,
    ngram_log_probs,
    previous_real_tokens,
    routing_feature_dim,
    routing_is_stateful,
    switch_mixture_posterior,
)
from .routing_options import ROUTING_FEATURES, ROUTING_SOLVERS  # noqa: F401

DISPATCH_MODES = ("sparse", "all")
CACHE_ATTR = "dume_routing"


class DumeConfig(_DumeConfig):
    """``configuration_dume.DumeConfig``, registered from this file: ``auto_map`` names it here,
    and saving a config copies this file (with the other three, its imports) next to it."""


class DumeExperts(nn.ModuleList):
    """The E dense MLPs of one layer; ``run`` runs each chosen expert on its tokens only (by a
    ``plan``), ``forward_all`` every expert on every token."""

    def plan(self, topk_index_NK: torch.Tensor, topk_weight_NK: torch.Tensor) -> tuple:
        """Which tokens each expert runs on: (token of each slot and its weight, sorted by
        expert, and each expert's slot count). Layers that route alike share one plan."""
        k = topk_index_NK.shape[1]
        flat_expert = topk_index_NK.reshape(-1)
        if k > 1:  # slots of weight 0 (pruned, see DumeMoeBlock._pruned) go to no expert
            flat_expert = torch.where(
                topk_weight_NK.reshape(-1) > 0, flat_expert, torch.full_like(flat_expert, len(self))
            )
        order = flat_expert.argsort(stable=True)
        # One host sync for the whole layer: how many (token, slot) pairs each expert got.
        counts = torch.bincount(flat_expert, minlength=len(self) + 1).tolist()[: len(self)]
        return order // k, topk_weight_NK.reshape(-1)[order], counts

    def run(self, hidden_ND: torch.Tensor, plan: tuple) -> torch.Tensor:
        """Each expert on its tokens of ``plan``, weighted and summed per token (fp32)."""
        token_of_slot, weight_of_slot, counts = plan
        out_ND = torch.zeros(
            hidden_ND.shape[0], hidden_ND.shape[-1], dtype=torch.float32, device=hidden_ND.device
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
        features: str = "token",
        smoothing: float = 0.0,
        layer_idx: int = 0,
        min_weight: float = 0.0,
        routing: dict | None = None,
    ):
        super().__init__()
        self.top_k = top_k
        self.min_weight = float(min_weight)
        self.temperature = float(temperature)
        self.features = features
        self.smoothing = float(smoothing)
        self.layer_idx = layer_idx
        # The kind's per-layer router, or None: the model's sequence-level router routes.
        self.routing = dict(routing if routing is not None else {"features": features})
        self.kind = inference_kind(self.routing)
        self.router = self.kind.layer_router(self.routing, hidden_size, len(experts), router_bias)
        self.experts = DumeExperts(experts)
        self.dispatch = "sparse"
        # None: route; int j: expert j everywhere; LongTensor [B]: expert per sequence.
        self.forced_expert: int | torch.Tensor | None = None
        self.record_routing = False
        self.last_topk_index: torch.Tensor | None = None  # [B, T, K] when record_routing
        self.routing_context: RoutingContext | None = None  # set by DumeForCausalLM.forward

    def router_logits(self, feats_NF: torch.Tensor) -> torch.Tensor:
        """``(W f + b) / T`` in fp32, before any smoothing (the router called as a module, so
        that hooks placing or loading its weights, e.g. a device map's offloading, apply)."""
        return self.router(feats_NF) / self.temperature

    def _top_k(self, logits_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        topk_logit_NK, topk_index_NK = logits_NE.topk(self.top_k, dim=-1)
        return topk_index_NK, self._pruned(topk_logit_NK.softmax(dim=-1).float())

    def _pruned(self, weight_NK: torch.Tensor) -> torch.Tensor:
        """Weights below ``min_weight`` set to 0 (their experts do not run) and the rest
        renormalised; the top-1 weight (the first column) always stays, also where it is below
        ``min_weight`` (possible for k > 2: it is only >= 1/k)."""
        if self.min_weight <= 0 or self.top_k == 1:
            return weight_NK
        keep_NK = weight_NK >= self.min_weight
        keep_NK[..., 0] = True
        kept_NK = torch.where(keep_NK, weight_NK, torch.zeros_like(weight_NK))
        return kept_NK / kept_NK.sum(dim=-1, keepdim=True)

    def route(self, hidden_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices [N, K] and their softmax weights [N, K] (fp32) of independent
        tokens: token features without smoothing only (see ``route_sequences``)."""
        if self.features != "token" or self.smoothing > 0:
            raise ValueError("context-aware routing needs whole sequences: use route_sequences")
        return self._top_k(self.router_logits(hidden_ND))

    def route_sequences(self, hidden_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k indices [B, T, K] and weights [B, T, K] of every position, reading and updating
        the running state of the current ``routing_context`` (fresh sequences without one)."""
        ctx = self.routing_context
        if self.router is None:  # a sequence-level router: every layer routes alike
            if ctx is None or ctx.sequence_logits is None:
                raise ValueError(
                    f"{self.kind.name} routing needs the token ids: call DumeForCausalLM"
                )
            # Once for all layers on a device (a device map may spread the layers over several).
            key = (self.top_k, self.temperature, self.min_weight, hidden_BTD.device)
            if key not in ctx.shared:
                logits_BTE = ctx.sequence_logits.to(hidden_BTD.device) / self.temperature
                topk_logit_BTK, topk_index_BTK = logits_BTE.topk(self.top_k, dim=-1)
                weight_BTK = self._pruned(topk_logit_BTK.softmax(dim=-1).float())
                ctx.shared[key] = (topk_index_BTK, weight_BTK)
            return ctx.shared[key]
        return self._top_k(self.kind.layer_logits(self, hidden_BTD, ctx))

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        if self.forced_expert is not None:
            return self._forward_forced(hidden_BTD)
        topk_index_BTK, topk_weight_BTK = self.route_sequences(hidden_BTD)
        if self.record_routing:
            self.last_topk_index = topk_index_BTK
        hidden_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
        topk_index_NK = topk_index_BTK.reshape(-1, self.top_k)
        topk_weight_NK = topk_weight_BTK.reshape(-1, self.top_k)
        if self.dispatch == "sparse":
            out_ND = self.experts.run(hidden_ND, self._plan(topk_index_NK, topk_weight_NK))
        else:
            out_ND = self.experts.forward_all(hidden_ND, topk_index_NK, topk_weight_NK)
        return out_ND.to(hidden_BTD.dtype).reshape(hidden_BTD.shape)

    def _plan(self, topk_index_NK: torch.Tensor, topk_weight_NK: torch.Tensor) -> tuple:
        """The experts' dispatch plan, made once per forward when every layer routes alike."""
        ctx = self.routing_context
        if self.router is not None or ctx is None:
            return self.experts.plan(topk_index_NK, topk_weight_NK)
        key = ("plan", self.top_k, self.temperature, self.min_weight, topk_index_NK.device)
        if key not in ctx.shared:
            ctx.shared[key] = self.experts.plan(topk_index_NK, topk_weight_NK)
        return ctx.shared[key]

    def _forward_forced(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        forced = self.forced_expert
        if isinstance(forced, int):
            return self.experts[forced](hidden_BTD)
        if forced.shape not in (hidden_BTD.shape[:1], hidden_BTD.shape[:2]):
            raise ValueError(
                f"forced expert ids have shape {tuple(forced.shape)}, expected [batch] or "
                f"[batch, length] = {tuple(hidden_BTD.shape[:2])}"
            )
        forced = forced.to(hidden_BTD.device)
        out_BTD = torch.empty_like(hidden_BTD)
        for j in forced.unique().tolist():
            where = forced == j  # rows [B] or positions [B, T]
            out_BTD[where] = self.experts[j](hidden_BTD[where])
        return out_BTD


def _family_attention(base_cls, requested: str | None) -> str | None:
    """The attention backend for the family's stack: the one resolved for this model, or eager
    where the family has no SDPA kernel (as the family's own model would default to)."""
    if requested == "sdpa" and not getattr(base_cls, "_supports_sdpa", False):
        return "eager"
    return requested


def _replaying_routing_context(checkpoint_func, blocks):
    """``checkpoint_func`` (``torch.utils.checkpoint``'s call on one layer), with the blocks'
    routing contexts of the forward that calls it captured and set again while the layer is
    recomputed in the backward."""

    def checkpointed(function, *args, **kwargs):
        contexts = [block.routing_context for block in blocks]

        def replay(*a, **k):
            before = [block.routing_context for block in blocks]
            for block, ctx in zip(blocks, contexts):
                block.routing_context = ctx
            try:
                return function(*a, **k)
            finally:
                for block, ctx in zip(blocks, before):
                    block.routing_context = ctx

        return checkpoint_func(replay, *args, **kwargs)

    checkpointed._dume = True
    return checkpointed


def family_causal_lm(base_config):
    """The dense family's own causal-LM class instantiated on the meta device (nothing is
    allocated), refused unless it is a decoder stack ``model`` and a linear ``lm_head`` and
    nothing else that holds weights."""
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)]
    with torch.device("meta"):
        dense = cls(base_config)
    parts = sorted(name for name, _ in dense.named_children())
    own = [n for n, _ in dense.named_parameters(recurse=False)]
    own += [n for n, _ in dense.named_buffers(recurse=False)]
    if parts != ["lm_head", "model"] or own or type(dense.lm_head) is not nn.Linear:
        raise ValueError(
            f"base_config.model_type={base_config.model_type!r}: {cls.__name__} holds "
            f"{parts + own} where DUME carries a decoder stack `model` and a linear `lm_head`"
        )
    return dense


class DumeForCausalLM(PreTrainedModel, GenerationMixin):
    """The dense family's decoder stack with one ``DumeMoeBlock`` per layer, plus an LM head."""

    config_class = DumeConfig
    config: DumeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Closed-form routers are cheap and their logit gaps can be small: keep them fp32 on load.
    _keep_in_fp32_modules_strict = ["mlp.router"]  # and the sequence-level router (__init__)
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: DumeConfig):
        super().__init__(config)
        base_config = config.build_base_config()
        # The family's base model class itself, not AutoModel.from_config: that one would re-apply
        # base_config's dtype and so override the dtype from_pretrained asked for.
        base_cls = MODEL_MAPPING[type(base_config)]
        # The dense stack uses the attention backend resolved for this model, if it has it.
        base_config._attn_implementation = _family_attention(base_cls, config._attn_implementation)
        dense = family_causal_lm(base_config)
        self.model = base_cls(base_config)
        layers = getattr(self.model, "layers", None)
        if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
            raise ValueError(
                f"base_config.model_type={base_config.model_type!r}: its base model has no "
                "`layers[*].mlp` to replace"
            )
        routing = config.routing or {}
        self.routing_kind = inference_kind(routing)
        for layer_idx, layer in enumerate(layers):
            mlp_cls = type(layer.mlp)
            layer.mlp = DumeMoeBlock(
                [mlp_cls(base_config) for _ in range(config.num_experts)],
                hidden_size=base_config.hidden_size,
                top_k=config.num_experts_per_tok,
                temperature=config.router_temperature,
                router_bias=config.router_bias,
                features=routing.get("features", "token"),
                smoothing=routing.get("smoothing", 0.0),
                min_weight=routing.get("min_weight", 0.0),
                layer_idx=layer_idx,
                routing=routing,
            )
        # A sequence-level router (one for every layer) is an attribute named by its kind.
        self.sequence_router_name = self.routing_kind.sequence_router_name
        if self.sequence_router_name is not None:
            router = self.routing_kind.sequence_router(
                routing, config.num_experts, base_config.vocab_size
            )
            setattr(self, self.sequence_router_name, router)
            # Closed-form routers are cheap and their logit gaps can be small: keep them fp32.
            self._keep_in_fp32_modules_strict = ["mlp.router", self.sequence_router_name]
        # transformers renamed the KV cache argument `past_key_values` -> `cache` (5.24): this
        # model accepts both and speaks to the family's causal LM in the name it knows.
        params = inspect.signature(dense.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.vocab_size = base_config.vocab_size
        self.lm_head = nn.Linear(
            base_config.hidden_size, base_config.vocab_size, bias=dense.lm_head.bias is not None
        )
        self.post_init()
        # The family's own causal LM over these modules, not registered (its keys are ours): its
        # forward applies what the family does after the stack (logit scaling, soft-capping, the
        # loss), so the logits are the dense model's wherever the experts agree.
        dense.model, dense.lm_head = self.model, self.lm_head
        self.__dict__["_dense_lm"] = dense

    def _set_gradient_checkpointing(self, *args, **kwargs):
        """The family's gradient checkpointing, with each layer's checkpoint function told to
        replay the layer under the routing context of the forward that ran it: the backward
        recomputes the layer after ``forward`` has cleared the blocks' contexts (and perhaps
        after later forwards set theirs)."""
        super()._set_gradient_checkpointing(*args, **kwargs)
        for module in self.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if module is self or func is None or getattr(func, "_dume", False):
                continue
            blocks = [m for m in module.modules() if isinstance(m, DumeMoeBlock)]
            if blocks:
                module._gradient_checkpointing_func = _replaying_routing_context(func, blocks)

    def _checkpointing_a_backward(self) -> bool:
        if not (self.training and torch.is_grad_enabled()):
            return False
        flag = getattr(self, "is_activation_checkpointing", None)  # the newer name
        flag = getattr(self, "is_gradient_checkpointing", False) if flag is None else flag
        return bool(flag)

    def moe_blocks(self) -> list[DumeMoeBlock]:
        blocks = getattr(self, "_moe_block_list", None)
        if blocks is None:  # found once: the blocks are fixed at construction
            blocks = [m for m in self.modules() if isinstance(m, DumeMoeBlock)]
            self._moe_block_list = blocks
        return blocks

    def set_dispatch(self, mode: str) -> None:
        """``"sparse"`` (default): chosen experts on their tokens; ``"all"``: every expert, weighted."""
        if mode not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {mode!r}")
        for block in self.moe_blocks():
            block.dispatch = mode

    def set_forced_expert(self, expert: int | torch.Tensor | None) -> None:
        """Bypass the routers: expert j in every layer, per-sequence ids [B], per-token ids
        [B, T], or None to route."""
        num_experts = self.config.num_experts
        if isinstance(expert, torch.Tensor):
            if expert.dim() not in (1, 2) or expert.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    "forced expert ids must be an integer tensor [batch] or [batch, length]"
                )
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
        cache = kwargs.pop("cache", None)  # the newer name of the KV cache argument
        if cache is not None:
            past_key_values = cache
        routing_state = None
        if self._checkpointing_a_backward():
            # The family's layers run without a KV cache then (transformers drops it), and the
            # backward replays each layer: the routing must carry no state a forward updates.
            use_cache, past_key_values = False, None
        if routing_is_stateful(self.config.routing):
            past_key_values, routing_state, ctx = self._routing_context(
                input_ids if input_ids is not None else inputs_embeds,
                attention_mask,
                past_key_values,
                use_cache,
            )
            self._sequence_scores(input_ids, ctx)
            for block in self.moe_blocks():
                block.routing_context = ctx
        dense = self._dense_lm
        if dense.model is not self.model or dense.lm_head is not self.lm_head:
            # replaced since (resize_token_embeddings, set_output_embeddings, adapters)
            dense.model, dense.lm_head = self.model, self.lm_head
        try:
            outputs = dense(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{self._cache_kwarg: past_key_values},
                **kwargs,
            )
        finally:
            if routing_is_stateful(self.config.routing):
                for block in self.moe_blocks():
                    block.routing_context = None
        if routing_state is not None:
            routing_state["seen"] += (input_ids if input_ids is not None else inputs_embeds).shape[
                1
            ]
        return outputs

    def _sequence_scores(self, input_ids, ctx) -> None:
        """The sequence-level router's scores of the new positions into ``ctx`` (its running
        state carried on the cache's routing state)."""
        name = self.sequence_router_name
        if name is None or (input_ids is None and self._all_forced()):
            return
        if input_ids is None:
            raise ValueError(
                f"{self.routing_kind.name} routing needs input_ids (not inputs_embeds)"
            )
        layers = ctx.layers
        carried = layers.get(name, {}).get("counts") if layers is not None else None
        router = getattr(self, name)
        # Called as a module where the kind's router has a forward (hooks that place or load its
        # tables, e.g. a device map's offloading, apply), else by its `scores`.
        if type(router).forward is not nn.Module.forward:
            score = router
        else:
            score = router.scores
        # Scores from token counts: nothing to differentiate, and a forward with gradients on
        # (training, or a loss outside torch.no_grad()) must not trace the filter's scan, whose
        # in-place products autograd refuses (the tables load as parameters that want grad).
        with torch.no_grad():
            ctx.sequence_logits, state = score(input_ids, ctx.real_BT, carried)
        if layers is not None:
            layers[name] = {"counts": state}

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings
        self._dense_lm.lm_head = new_embeddings

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """``PreTrainedModel.resize_token_embeddings``, and the new vocabulary size also in
        ``base_config`` (the source of truth on load, so a saved model reloads), in the family's
        own config (its loss reads it), and in a sequence-level router's per-token tables (a new
        token: count 0 for every expert, as a build on that vocabulary gives)."""
        embeddings = super().resize_token_embeddings(
            new_num_tokens, pad_to_multiple_of, mean_resizing
        )
        vocab_size = embeddings.weight.shape[0]
        self.vocab_size = vocab_size
        self.config.vocab_size = vocab_size
        if self.config.base_config is not None:
            self.config.base_config["vocab_size"] = vocab_size
        for config in {id(c): c for c in (self.model.config, self._dense_lm.config)}.values():
            config.vocab_size = vocab_size
        router = getattr(self, self.sequence_router_name or "", None)
        if router is not None and hasattr(router, "resize_vocab"):
            router.resize_vocab(vocab_size)
        return embeddings

    def _all_forced(self) -> bool:
        return all(block.forced_expert is not None for block in self.moe_blocks())

    def _routing_context(self, tokens_BT_, attention_mask, past_key_values, use_cache):
        """The routing context of one forward: the new positions' real-token mask, and the running
        state kept on the KV cache (created here when a cache is wanted and none was given)."""
        length = tokens_BT_.shape[1]
        use_cache = use_cache if use_cache is not None else getattr(self.config, "use_cache", True)
        if past_key_values is None and use_cache:
            past_key_values = DynamicCache(config=self.model.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        real_BT = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("context-aware routing needs a 2-D attention mask [batch, length]")
            if attention_mask.shape[1] not in (length, past + length):
                raise ValueError(
                    f"attention mask covers {attention_mask.shape[1]} positions: expected the "
                    f"{length} new ones or all {past + length}"
                )
            real_BT = attention_mask[:, -length:].bool()
        if past_key_values is None:
            return None, None, RoutingContext(real_BT, None)
        state = getattr(past_key_values, CACHE_ATTR, None)
        if state is None:
            if past:
                raise ValueError(
                    f"the KV cache holds {past} tokens but no DUME routing state: context-aware "
                    "routing needs a cache that this model filled from the first token"
                )
            state = attach_routing_state(past_key_values)
        elif state["seen"] != past:
            raise ValueError(
                f"the DUME routing state covers {state['seen']} tokens, the KV cache {past}: a "
                "cropped or edited cache cannot continue context-aware routing"
            )
        return past_key_values, state, RoutingContext(real_BT, state["layers"])


def _map_state(layers: dict, fn) -> dict:
    return {
        layer: {
            part: None if st is None else {k: fn(v) for k, v in st.items()}
            for part, st in parts.items()
        }
        for layer, parts in layers.items()
    }


def attach_routing_state(cache) -> dict:
    """Attach an empty routing state to ``cache`` (attribute ``dume_routing``), and make the
    cache's batch operations (beam reordering, selection, repetition) apply to it too."""
    state = {"seen": 0, "layers": {}}
    setattr(cache, CACHE_ATTR, state)
    batch_ops = {
        "reorder_cache": lambda t, idx: t.index_select(0, idx.to(t.device)),
        "batch_select_indices": lambda t, idx: t[idx.to(t.device)],
        "batch_repeat_interleave": lambda t, repeats: t.repeat_interleave(repeats, dim=0),
    }
    for name, op in batch_ops.items():
        original = getattr(cache, name, None)
        if original is None:
            continue

        def wrapped(arg, _original=original, _op=op):
            out = _original(arg)
            state["layers"] = _map_state(state["layers"], lambda t: _op(t, arg))
            return out

        setattr(cache, name, wrapped)
    return state


# save_pretrained then writes `auto_map` and copies this file next to config.json.
DumeConfig.register_for_auto_class()
DumeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
