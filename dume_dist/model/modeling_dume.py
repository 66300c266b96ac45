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
  ``"routing"`` (default ``{"features": "token"}``, see *Routing* below);
* ``"dtype"`` and ``"transformers_version"``;
* a flat copy of ``base_config``'s model keys (``vocab_size``, ``hidden_size``,
  ``num_hidden_layers``, ``tie_word_embeddings``, ``rope_parameters``, token ids, ...), so that
  generation, caches and serving tools find the attributes they expect. ``base_config`` is the
  source of truth: on load the flat copy is overwritten from it.

State-dict keys: the dense family's keys for everything outside the MLPs
(``model.embed_tokens.weight``, ``model.layers.{l}.self_attn.q_proj.weight``, ...,
``model.norm.weight``, ``lm_head.weight`` — absent when ``tie_word_embeddings``), and per layer

* ``model.layers.{l}.mlp.router.weight`` [E, F] (F = the router feature dim: hidden for
  ``token`` features, 2*hidden for ``prefix_mean``), ``model.layers.{l}.mlp.router.bias`` [E]
  (only when ``router_bias``);
* ``model.layers.{l}.mlp.experts.{j}.<the family's MLP keys>``, e.g. ``gate_proj.weight``.

With ``routing.features == "ngram"`` there are no per-layer ``router`` tensors; instead
``ngram_router.unigram_counts`` [E, V], ``ngram_router.context_counts`` [E, V] and
``ngram_router.bigram_counts`` [E, buckets] (fp32 counts, see ``DumeNgramRouter``) and
``routing.ngram = {"buckets", "mu", "alpha"}``.

Routing
-------
Per token t of a sequence, with x_t the input of the MLP (the output of
``post_attention_layernorm``) and only the sequence's *real* tokens counted (attention mask):

* features ``f_t`` (``routing.features``, the one definition statistics and inference share:
  ``causal_features``): ``token`` -> ``f_t = x_t`` (the paper); ``prefix_mean`` ->
  ``f_t = [x_t, mean_{s<=t} x_s]`` over the real tokens of the sequence so far;
* ``z_t = (W f_t + b) / T`` in fp32;
* smoothing (``routing.smoothing`` = decay beta in [0, 1], default 0 = off): the causal, normalised
  exponential moving average over real tokens ``zbar_t = sum_s beta^(r_t - r_s) z_s /
  sum_s beta^(r_t - r_s)`` (``causal_ema``; r = index among real tokens; beta = 1 is the running
  mean);
* top-k of the (smoothed) logits; weights = softmax over those k logits (fp32); output =
  sum_i weight_i * expert_i(x), cast back to x's dtype. Only the chosen experts run.

``ngram`` features: one sequence-level router for all layers, the naive-Bayes log-likelihood of
the real tokens so far under each expert's bigram model (``DumeNgramRouter``); it reads the token
ids, so the model must be called with ``input_ids``.

Context-aware routing (``prefix_mean``, ``ngram`` or smoothing > 0) carries per-layer running sums per
sequence. With a KV cache they live on the ``past_key_values`` Cache object (attribute
``dume_routing``) and follow it (beam reordering, batch selection), so decoding with a cache gives
the same routing as a full forward. ``routing`` may also hold informational keys the model does
not read (``solver``, ``lam``, ``preset``).

Shape legend: B batch, T sequence, N = B*T tokens, D hidden size, F router features, E experts,
K experts per token, C channels of a smoothed quantity.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

# transformers renamed the KV cache argument and output field `past_key_values` -> `cache` (5.24);
# this model accepts both and speaks to the family's base model in the name it knows.
_OUTPUT_CACHE_FIELD = (
    "cache"
    if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    else "past_key_values"
)

DISPATCH_MODES = ("sparse", "all")
ROUTING_FEATURES = ("token", "prefix_mean", "ngram")
ROUTING_SOLVERS = ("ridge", "lda", "nb")
# Keys of DumeConfig.routing: the model reads `features`, `smoothing` and `ngram`; the others
# record how the routers were solved.
ROUTING_KEYS = ("features", "smoothing", "solver", "lam", "preset", "ngram", "min_weight")
NGRAM_KEYS = ("buckets", "mu", "alpha")
NGRAM_OPTIONAL_KEYS = ("switch",)  # switch rate of the fixed-share posterior (0: cumulative)
CACHE_ATTR = "dume_routing"
_NGRAM_STATE = "ngram"  # key of the n-gram router's running state in the cache's routing state
_NGRAM_HASH = 1_000_003

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


# -- routing features and smoothing: the one definition statistics and inference share ----------


def routing_feature_dim(features: str, hidden_size: int) -> int:
    """F, the router's input size, for ``features`` on a model of ``hidden_size``."""
    if features == "token":
        return hidden_size
    if features == "prefix_mean":
        return 2 * hidden_size
    if features == "ngram":
        return 0  # no per-layer linear router: one sequence-level n-gram router (DumeNgramRouter)
    raise ValueError(f"routing.features must be one of {ROUTING_FEATURES}, got {features!r}")


def ngram_bucket(prev: torch.Tensor, cur: torch.Tensor, buckets: int) -> torch.Tensor:
    """Hash bucket of the bigram (prev, cur) of token ids (int64): the one definition the
    statistics and the router share."""
    return (prev.long() * _NGRAM_HASH + cur.long()) % buckets


def previous_real_tokens(
    ids_BT: torch.Tensor, real_BT: torch.Tensor, state: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position, the id of the sequence's previous real token and whether there is one
    (``state``: ``{"last": [B], "has_last": [B]}`` carried from earlier positions)."""
    batch, length = ids_BT.shape
    if state is not None and length == 1:  # one decoding step: the carried token, no scan
        return state["last"][:, None], state["has_last"][:, None]
    pos_BT = torch.arange(length, device=ids_BT.device).expand(batch, length)
    last_incl_BT = torch.where(real_BT, pos_BT, torch.full_like(pos_BT, -1)).cummax(dim=1).values
    prev_pos_BT = torch.cat([last_incl_BT.new_full((batch, 1), -1), last_incl_BT[:, :-1]], dim=1)
    has_prev_BT = prev_pos_BT >= 0
    prev_BT = ids_BT.gather(1, prev_pos_BT.clamp_min(0))
    if state is not None:
        carried_BT = ~has_prev_BT & state["has_last"][:, None]
        prev_BT = torch.where(carried_BT, state["last"][:, None].expand_as(prev_BT), prev_BT)
        has_prev_BT = has_prev_BT | carried_BT
    return prev_BT, has_prev_BT


def ngram_log_probs(
    unigram_EV: torch.Tensor,
    context_EV: torch.Tensor,
    bigram_EH: torch.Tensor,
    prev: torch.Tensor,
    cur: torch.Tensor,
    has_prev: torch.Tensor,
    mu: float,
    alpha: float,
    denom_E1: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log p_j(cur | prev)`` [E, *cur.shape] (fp64 counts in, fp64 out): the n-gram router's
    smoothed bigram model (``DumeNgramRouter``), ``q_j(cur)`` where ``has_prev`` is False.
    ``denom_E1`` (``sum u_j + alpha * V``) may be passed in when it is cached."""
    vocab = unigram_EV.shape[1]
    if denom_E1 is None:
        denom_E1 = unigram_EV.sum(dim=1, keepdim=True) + alpha * vocab
    denom = denom_E1.reshape(-1, *([1] * cur.dim()))
    q = (unigram_EV[:, cur] + alpha) / denom
    c = bigram_EH[:, ngram_bucket(prev, cur, bigram_EH.shape[1])]
    return torch.where(has_prev, (c + mu * q) / (context_EV[:, prev] + mu), q).log()


def fixed_share_posterior(
    logp_BTE: torch.Tensor,
    real_BT: torch.Tensor,
    switch: float,
    state_BE: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log posterior [B, T, E] (fp64, normalised) of "which expert's domain is the text in at t",
    when the domain may switch before any token with probability ``switch`` (to each other
    expert alike) and token t has log-likelihoods ``logp_BTE`` under each expert: the forward
    filter of that hidden Markov chain, ``a_t ∝ p_t ⊙ (M a_{t-1})``. ``switch`` 0 is the
    cumulative naive Bayes posterior. ``state_BE``: the log posterior before the first position
    (None: uniform). Padding neither updates nor switches. The products of the per-position
    matrices ``diag(p_t) M`` are formed by a log-depth scan (each product rescaled: the
    posterior is a direction), so a forward costs log2(T) batched E x E products."""
    batch, length, num = logp_BTE.shape
    if state_BE is None:
        state_BE = logp_BTE.new_full((batch, num), -math.log(num))
    stay = logp_BTE.new_full((num, num), switch / max(num - 1, 1))
    stay.fill_diagonal_(1.0 - switch)
    p_BTE = (logp_BTE - logp_BTE.amax(dim=-1, keepdim=True)).exp()
    eye = torch.eye(num, dtype=p_BTE.dtype, device=p_BTE.device)
    step_BTEE = torch.where(real_BT[..., None, None], p_BTE[..., :, None] * stay, eye)
    shift = 1
    while shift < length:  # Hillis-Steele prefix products: step_t <- step_t @ step_{t-shift}
        prod = step_BTEE.clone()
        prod[:, shift:] = step_BTEE[:, shift:] @ step_BTEE[:, :-shift]
        step_BTEE = prod / prod.amax(dim=(-2, -1), keepdim=True)
        shift *= 2
    prior_BE = (state_BE - state_BE.amax(dim=-1, keepdim=True)).exp()
    post_BTE = (step_BTEE @ prior_BE[:, None, :, None]).squeeze(-1)
    log_BTE = post_BTE.clamp_min(torch.finfo(post_BTE.dtype).tiny).log()
    return log_BTE - log_BTE.logsumexp(dim=-1, keepdim=True)


def causal_features(
    features: str,
    hidden_BTD: torch.Tensor,
    real_BT: torch.Tensor | None = None,
    state: dict | None = None,
) -> tuple[torch.Tensor, dict | None]:
    """Router features (fp32) of every position of ``hidden_BTD``, and the running state after it.

    ``real_BT`` (bool; None: all real) marks the sequences' real tokens: padding never enters a
    running sum. ``state`` is what the previous call returned for the same sequences (None: they
    start here), so feeding a sequence in pieces gives the features of feeding it whole.
    ``prefix_mean``: ``[x_t, mean of x_s over the real s <= t]`` (zeros before the first real
    token); the running sums are fp64.
    """
    x_BTD = hidden_BTD.float()
    if features == "token":
        return x_BTD, None
    if features != "prefix_mean":
        raise ValueError(f"routing.features must be one of {ROUTING_FEATURES}, got {features!r}")
    real_BT = _real_mask(hidden_BTD, real_BT).double()
    sum_BTD = (hidden_BTD.double() * real_BT[..., None]).cumsum(dim=1)
    count_BT = real_BT.cumsum(dim=1)
    if state is not None:
        sum_BTD = sum_BTD + state["sum"][:, None]
        count_BT = count_BT + state["count"][:, None]
    mean_BTD = (sum_BTD / count_BT.clamp_min(1.0)[..., None]).float()
    feats_BTF = torch.cat([x_BTD, mean_BTD], dim=-1)
    return feats_BTF, {"sum": sum_BTD[:, -1], "count": count_BT[:, -1]}


_EMA_CHUNK = 128  # positions per block of the smoothing scan (bounds its [B, t, t] weights)


def causal_ema(
    values_BTC: torch.Tensor,
    decay: float,
    real_BT: torch.Tensor | None = None,
    state: dict | None = None,
) -> tuple[torch.Tensor, dict | None]:
    """Normalised causal exponential moving average over real tokens, and the state after it.

    ``out_t = sum_s decay^(r_t - r_s) v_s / sum_s decay^(r_t - r_s)`` over the real ``s <= t``
    (``r`` = index among real tokens; padding neither contributes nor decays). ``decay`` 0 is the
    identity (no state), 1 the running mean. Linear, and 1 on a constant 1, so smoothing router
    logits equals the router applied to smoothed features. fp64 inside, fp32 out.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"routing.smoothing must be in [0, 1], got {decay!r}")
    if decay == 0.0:
        return values_BTC.float(), None
    batch, length, channels = values_BTC.shape
    real_BT = _real_mask(values_BTC, real_BT).double()
    values_BTC = values_BTC.double() * real_BT[..., None]
    if state is None:
        num_BC = values_BTC.new_zeros(batch, channels)
        den_B = values_BTC.new_zeros(batch)
    else:
        num_BC, den_B = state["num"], state["den"]
    out = []
    for start in range(0, length, _EMA_CHUNK):
        v_BtC = values_BTC[:, start : start + _EMA_CHUNK]
        m_Bt = real_BT[:, start : start + _EMA_CHUNK]
        if decay == 1.0:
            num_BtC = num_BC[:, None] + v_BtC.cumsum(dim=1)
            den_Bt = den_B[:, None] + m_Bt.cumsum(dim=1)
        else:
            rank_Bt = m_Bt.cumsum(dim=1)  # real tokens so far in this block
            t = m_Bt.shape[1]
            causal_tt = torch.ones(t, t, dtype=torch.bool, device=m_Bt.device).tril()
            lag_Btt = (rank_Bt[:, :, None] - rank_Bt[:, None, :]).clamp_min(0)
            weight_Btt = torch.pow(decay, lag_Btt) * causal_tt * m_Bt[:, None, :]
            carry_Bt = torch.pow(decay, rank_Bt)
            num_BtC = carry_Bt[..., None] * num_BC[:, None] + weight_Btt @ v_BtC
            den_Bt = carry_Bt * den_B[:, None] + weight_Btt.sum(dim=-1)
        out.append(num_BtC / den_Bt.clamp_min(torch.finfo(torch.float64).tiny)[..., None])
        num_BC, den_B = num_BtC[:, -1], den_Bt[:, -1]
    return torch.cat(out, dim=1).float(), {"num": num_BC, "den": den_B}


def _real_mask(like_BT_: torch.Tensor, real_BT: torch.Tensor | None) -> torch.Tensor:
    if real_BT is None:
        return torch.ones(like_BT_.shape[:2], dtype=torch.bool, device=like_BT_.device)
    if real_BT.shape != like_BT_.shape[:2]:
        raise ValueError(
            f"attention mask has shape {tuple(real_BT.shape)}, expected {tuple(like_BT_.shape[:2])}"
        )
    return real_BT.to(like_BT_.device).bool()


def routing_is_stateful(routing: dict | None) -> bool:
    """Whether routing depends on earlier tokens (and so keeps running state per sequence)."""
    routing = routing or {}
    return routing.get("features", "token") != "token" or routing.get("smoothing", 0.0) > 0


class DumeNgramRouter(nn.Module):
    """Sequence-level naive-Bayes router on token bigrams (``routing.features == "ngram"``).

    Expert j's evidence for the sequence so far is ``sum_{s<=t} log p_j(v_s | v_{s-1})`` over the
    real tokens, with the Dirichlet-smoothed bigram model
    ``p_j(v | u) = (c_j[h(u, v)] + mu * q_j(v)) / (n_j(u) + mu)`` and
    ``q_j(v) = (u_j(v) + alpha) / (sum u_j + alpha * V)`` (the first token of a sequence: q_j).
    ``u_j`` are expert j's unigram counts, ``n_j(u)`` how often ``u`` was followed by a token,
    ``c_j`` the bigram counts hashed into ``buckets`` (``ngram_bucket``). All counts are summed
    statistics of the contributors (``dume_dist.core.ngram``): no training. Every layer routes
    with these scores (top-k, softmax over the k chosen), so a sequence keeps one expert as soon
    as its evidence is clear. With ``switch`` > 0 the scores are instead the log posterior of a
    chain whose domain may switch before any token (``fixed_share_posterior``): evidence older
    than a switch stops counting, so routing follows text whose domain changes.
    """

    def __init__(
        self, num_experts: int, vocab_size: int, buckets: int, mu: float, alpha: float,
        switch: float = 0.0,
    ):  # fmt: skip
        super().__init__()
        self.buckets, self.mu, self.alpha = int(buckets), float(mu), float(alpha)
        self.switch = float(switch)
        # Counts, fp32 (exact up to 2**24 per entry); parameters so that loading keeps them fp32.
        zeros = torch.zeros
        self.unigram_counts = nn.Parameter(zeros(num_experts, vocab_size), requires_grad=False)
        self.context_counts = nn.Parameter(zeros(num_experts, vocab_size), requires_grad=False)
        self.bigram_counts = nn.Parameter(zeros(num_experts, self.buckets), requires_grad=False)

    def _tables(self):
        """fp64 counts and the unigram denominators, cached until the counts change."""
        key = tuple((p.data_ptr(), p._version, p.device) for p in self.parameters())
        if getattr(self, "_cache_key", None) != key:
            uni_EV = self.unigram_counts.double()
            vocab = uni_EV.shape[1]
            denom_E1 = uni_EV.sum(dim=1, keepdim=True) + self.alpha * vocab
            self._cached = (
                uni_EV,
                self.context_counts.double(),
                self.bigram_counts.double(),
                denom_E1,
            )
            self._cache_key = key
        return self._cached

    def scores(
        self, ids_BT: torch.Tensor, real_BT: torch.Tensor | None = None, state: dict | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Cumulative log-likelihoods [B, T, E] (fp64) of every position, and the state after."""
        real_BT = _real_mask(ids_BT[..., None], real_BT)
        vocab = self.unigram_counts.shape[1]
        if bool(((ids_BT < 0) | (ids_BT >= vocab)).any()):
            raise ValueError(f"token ids must be in [0, {vocab}) for n-gram routing")
        uni_EV, ctx_EV, big_EH, denom_E1 = self._tables()
        prev_BT, has_prev_BT = previous_real_tokens(ids_BT, real_BT, state)
        logp_EBT = ngram_log_probs(
            uni_EV, ctx_EV, big_EH, prev_BT, ids_BT, has_prev_BT, self.mu, self.alpha, denom_E1
        )
        logp_BTE = logp_EBT.permute(1, 2, 0) * real_BT[..., None]
        if self.switch > 0:  # the fixed-share posterior: evidence before a switch fades
            carried = None if state is None else state["cum"]
            cum_BTE = fixed_share_posterior(logp_BTE, real_BT, self.switch, carried)
        else:
            cum_BTE = logp_BTE.cumsum(dim=1)
            if state is not None:
                cum_BTE = cum_BTE + state["cum"][:, None]
        new_state = {  # the sequence's last real token so far (the previous one of the next)
            "cum": cum_BTE[:, -1],
            "last": torch.where(real_BT[:, -1], ids_BT[:, -1], prev_BT[:, -1]),
            "has_last": has_prev_BT[:, -1] | real_BT[:, -1],
        }
        return cum_BTE, new_state


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
        self._validate_routing()
        if isinstance(self.base_config, PretrainedConfig):
            self.base_config = self.base_config.to_dict()
        if self.base_config is not None:
            if not isinstance(self.base_config, dict) or "model_type" not in self.base_config:
                raise ValueError("base_config must be a dense config's to_dict() with a model_type")
            if self.base_config["model_type"] == self.model_type:
                raise ValueError("base_config.model_type must be a dense family, not 'dume'")

    def _validate_routing(self) -> None:
        routing = self.routing
        if not isinstance(routing, dict):
            raise ValueError(f"routing must be a dict, got {routing!r}")
        for key in routing:
            if key not in ROUTING_KEYS:
                raise ValueError(
                    f"routing.{key} is not a known routing option (known: {', '.join(ROUTING_KEYS)})"
                )
        if routing.get("features", "token") not in ROUTING_FEATURES:
            raise ValueError(
                f"routing.features must be one of {ROUTING_FEATURES}, got {routing['features']!r}"
            )
        smoothing = routing.get("smoothing", 0.0)
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)):
            raise ValueError(f"routing.smoothing must be a number in [0, 1], got {smoothing!r}")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"routing.smoothing must be in [0, 1], got {smoothing!r}")
        features = routing.get("features", "token")
        ngram = routing.get("ngram")
        if (features == "ngram") != (ngram is not None):
            raise ValueError("routing.ngram must be given exactly when routing.features is 'ngram'")
        if ngram is not None:
            if not isinstance(ngram, dict) or not (
                set(NGRAM_KEYS) <= set(ngram) <= set(NGRAM_KEYS + NGRAM_OPTIONAL_KEYS)
            ):
                raise ValueError(
                    f"routing.ngram must be a dict with keys {NGRAM_KEYS} (optional: "
                    f"{NGRAM_OPTIONAL_KEYS})"
                )
            switch = ngram.get("switch", 0.0)
            if isinstance(switch, bool) or not isinstance(switch, (int, float)):
                raise ValueError(
                    f"routing.ngram.switch must be a number in [0, 0.5), got {switch!r}"
                )
            if not 0.0 <= switch < 0.5:
                raise ValueError(f"routing.ngram.switch must be in [0, 0.5), got {switch!r}")
            if not _is_int(ngram["buckets"]) or ngram["buckets"] < 1:
                raise ValueError(
                    f"routing.ngram.buckets must be an integer >= 1, got {ngram['buckets']!r}"
                )
            for key in ("mu", "alpha"):
                v = ngram[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    raise ValueError(f"routing.ngram.{key} must be a number > 0, got {v!r}")
            if smoothing:
                raise ValueError(
                    "routing.smoothing must be 0 with n-gram routing (it is cumulative)"
                )
        if routing.get("solver", "ridge") not in ROUTING_SOLVERS:
            raise ValueError(
                f"routing.solver must be one of {ROUTING_SOLVERS}, got {routing['solver']!r}"
            )
        min_weight = routing.get("min_weight", 0.0)
        if (
            isinstance(min_weight, bool)
            or not isinstance(min_weight, (int, float))
            or not 0 <= min_weight < 0.5
        ):
            raise ValueError(f"routing.min_weight must be a number in [0, 0.5), got {min_weight!r}")
        lam = routing.get("lam", 1.0)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam > 0:
            raise ValueError(f"routing.lam must be a number > 0, got {lam!r}")

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
        if k > 1:  # slots of weight 0 (pruned, see DumeMoeBlock._pruned) go to no expert
            flat_expert = torch.where(
                topk_weight_NK.reshape(-1) > 0, flat_expert, torch.full_like(flat_expert, len(self))
            )
        order = flat_expert.argsort(stable=True)
        token_of_slot = order // k
        weight_of_slot = topk_weight_NK.reshape(-1)[order]
        # One host sync for the whole layer: how many (token, slot) pairs each expert got.
        counts = torch.bincount(flat_expert, minlength=len(self) + 1).tolist()[: len(self)]

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


class RoutingContext:
    """What one forward call tells every MoE block: which of its positions are real tokens
    (``real_BT``; None: all), and the per-layer running routing state of the sequences
    (``layers``: ``{layer index: state}``, updated in place; None: nothing is carried over), and
    for sequence-level (n-gram) routing the scores of the new positions."""

    def __init__(
        self,
        real_BT: torch.Tensor | None,
        layers: dict | None,
        sequence_logits: torch.Tensor | None = None,
    ):
        self.real_BT = real_BT
        self.layers = layers
        # [B, T, E] fp64: the sequence-level router's scores, which every layer routes with
        # (n-gram routing); None for per-layer routers.
        self.sequence_logits = sequence_logits
        self.shared_topk: dict = {}  # (k, temperature) -> top-k of sequence_logits


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
    ):
        super().__init__()
        self.top_k = top_k
        self.min_weight = float(min_weight)
        self.temperature = float(temperature)
        self.features = features
        self.smoothing = float(smoothing)
        self.layer_idx = layer_idx
        # n-gram routing has one sequence-level router (DumeForCausalLM.ngram_router) instead.
        self.router = (
            None
            if features == "ngram"
            else nn.Linear(
                routing_feature_dim(features, hidden_size), len(experts), bias=router_bias
            )
        )
        self.experts = DumeExperts(experts)
        self.dispatch = "sparse"
        # None: route; int j: expert j everywhere; LongTensor [B]: expert per sequence.
        self.forced_expert: int | torch.Tensor | None = None
        self.record_routing = False
        self.last_topk_index: torch.Tensor | None = None  # [B, T, K] when record_routing
        self.routing_context: RoutingContext | None = None  # set by DumeForCausalLM.forward

    def router_logits(self, feats_NF: torch.Tensor) -> torch.Tensor:
        """``(W f + b) / T`` in fp32, before any smoothing."""
        bias = None if self.router.bias is None else self.router.bias.float()
        return F.linear(feats_NF.float(), self.router.weight.float(), bias) / self.temperature

    def _top_k(self, logits_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        topk_logit_NK, topk_index_NK = logits_NE.topk(self.top_k, dim=-1)
        return topk_index_NK, self._pruned(topk_logit_NK.softmax(dim=-1).float())

    def _pruned(self, weight_NK: torch.Tensor) -> torch.Tensor:
        """Weights below ``min_weight`` set to 0 (their experts do not run) and the rest
        renormalised; the top-1 weight (>= 1/k > min_weight) always stays."""
        if self.min_weight <= 0 or self.top_k == 1:
            return weight_NK
        kept_NK = torch.where(weight_NK >= self.min_weight, weight_NK, torch.zeros_like(weight_NK))
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
        if self.features == "ngram":
            if ctx is None or ctx.sequence_logits is None:
                raise ValueError("n-gram routing needs the token ids: call DumeForCausalLM")
            key = (self.top_k, self.temperature, self.min_weight)
            if key not in ctx.shared_topk:  # every layer routes alike: compute it once
                logits_BTE = ctx.sequence_logits / self.temperature
                topk_logit_BTK, topk_index_BTK = logits_BTE.topk(self.top_k, dim=-1)
                weight_BTK = self._pruned(topk_logit_BTK.softmax(dim=-1).float())
                ctx.shared_topk[key] = (topk_index_BTK, weight_BTK)
            return ctx.shared_topk[key]
        real_BT = ctx.real_BT if ctx is not None else None
        carried = (
            ctx.layers.get(self.layer_idx, {}) if ctx is not None and ctx.layers is not None else {}
        )
        feats_BTF, feat_state = causal_features(
            self.features, hidden_BTD, real_BT, carried.get("features")
        )
        logits_BTE = self.router_logits(feats_BTF)
        logits_BTE, smooth_state = causal_ema(
            logits_BTE, self.smoothing, real_BT, carried.get("smoothing")
        )
        if ctx is not None and ctx.layers is not None:
            ctx.layers[self.layer_idx] = {"features": feat_state, "smoothing": smooth_state}
        return self._top_k(logits_BTE)

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
            out_ND = self.experts(hidden_ND, topk_index_NK, topk_weight_NK)
        else:
            out_ND = self.experts.forward_all(hidden_ND, topk_index_NK, topk_weight_NK)
        return out_ND.to(hidden_BTD.dtype).reshape(hidden_BTD.shape)

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


class DumeForCausalLM(PreTrainedModel, GenerationMixin):
    """The dense family's decoder stack with one ``DumeMoeBlock`` per layer, plus an LM head."""

    config_class = DumeConfig
    config: DumeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Closed-form routers are cheap and their logit gaps can be small: keep them fp32 on load.
    _keep_in_fp32_modules_strict = ["mlp.router", "ngram_router"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
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
        routing = config.routing or {}
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
            )
        self.ngram_router = None
        if routing.get("features", "token") == "ngram":
            ngram = routing["ngram"]
            self.ngram_router = DumeNgramRouter(
                config.num_experts, base_config.vocab_size,
                ngram["buckets"], ngram["mu"], ngram["alpha"], ngram.get("switch", 0.0),
            )  # fmt: skip
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.vocab_size = base_config.vocab_size
        self.lm_head = nn.Linear(base_config.hidden_size, base_config.vocab_size, bias=False)
        self.post_init()

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
        if routing_is_stateful(self.config.routing):
            past_key_values, routing_state, ctx = self._routing_context(
                input_ids if input_ids is not None else inputs_embeds,
                attention_mask,
                past_key_values,
                use_cache,
            )
            if self.ngram_router is not None and (input_ids is not None or not self._all_forced()):
                if input_ids is None:
                    raise ValueError("n-gram routing needs input_ids (not inputs_embeds)")
                layers = ctx.layers
                carried = layers.get(_NGRAM_STATE, {}).get("counts") if layers is not None else None
                ctx.sequence_logits, ngram_state = self.ngram_router.scores(
                    input_ids, ctx.real_BT, carried
                )
                if layers is not None:
                    layers[_NGRAM_STATE] = {"counts": ngram_state}
            for block in self.moe_blocks():
                block.routing_context = ctx
        try:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
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
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)},
        )

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
