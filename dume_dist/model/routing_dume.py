"""Routing at inference: the router kinds' own code in the remote-code model.

Copied next to ``modeling_dume.py`` into every checkpoint (``modeling_dume`` imports it
relatively), so it imports only the standard library, torch and its siblings ``routing_options``
and ``routing_switch`` (the switching posteriors of the n-gram router).

A kind's inference code is a class with the `KindInference` methods: it checks its part of the
config's ``routing`` dict, says whether routing keeps running state per sequence, and makes its
router modules — a per-layer router (``model.layers.{l}.mlp.router``, asked for logits by the
MoE block) and/or one sequence-level router on the model (asked for scores from the token ids,
which every layer routes with). The built-in kinds:

* ``linear``: per-layer linear routers ``z = (W f + b) / T`` on features ``f`` of the MLP input
  (``causal_features``: ``token`` or ``prefix_mean``), optionally smoothed over the sequence
  (``causal_ema``);
* ``ngram``: the sequence-level naive-Bayes router on token bigrams (``DumeNgramRouter``).

A kind that is not built in names the module of its inference code in ``routing.module``; it is
imported by name (that module must be importable where the checkpoint is loaded).

Shape legend: B batch, T sequence, N = B*T tokens, D hidden size, F router features, E experts,
K experts per token, C channels of a smoothed quantity, V vocabulary, H hash buckets.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .routing_options import (
    COMMON_OPTIONS,
    LINEAR_OPTIONS,
    MAX_SWITCH_RATES,
    NGRAM_LEGACY,
    NGRAM_OPTIONS,
    ROUTING_FEATURES,
    options_by_name,
)
from .routing_switch import (  # noqa: F401  (re-exported)
    fixed_share_posterior,
    sequence_scores,
    switch_mixture_posterior,
)

_NGRAM_HASH = 1_000_003
NGRAM_KEYS = ("buckets", "mu", "alpha")
# switch: the fixed-share posterior's rate (0: cumulative); switch_rates: rates whose posteriors
# are averaged (switch_mixture_posterior); evidence_scale: weight on each token's log-likelihoods
NGRAM_OPTIONAL_KEYS = ("switch", "switch_rates", "evidence_scale")


# -- routing features and smoothing: the one definition statistics and inference share ----------


def routing_feature_dim(features: str, hidden_size: int) -> int:
    """F, the router's input size, for ``features`` on a model of ``hidden_size``."""
    if features == "token":
        return hidden_size
    if features == "prefix_mean":
        return 2 * hidden_size
    if features == NGRAM_LEGACY["features"]:
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
    return smoothed_log_probs(q, context_EV[:, prev] + mu, bigram_EH, prev, cur, has_prev, mu)


def smoothed_log_probs(q, context_mu, bigram_EH, prev, cur, has_prev, mu: float) -> torch.Tensor:
    """``ngram_log_probs`` from the gathered ``q_j(cur)`` and ``n_j(prev) + mu`` (fp64)."""
    c = bigram_EH[:, ngram_bucket(prev, cur, bigram_EH.shape[1])].double()
    return torch.where(has_prev, (c + mu * q) / context_mu, q).log()


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
        # what every layer shares when routing is sequence-level: (k, temperature, min_weight) ->
        # top-k of sequence_logits; ("plan", ...) -> the experts' dispatch plan
        self.shared: dict = {}


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
    than a switch stops counting, so routing follows text whose domain changes. With
    ``switch_rates`` the scores are the posterior averaged over chains of those rates, each
    weighted by how well it predicted the sequence so far (``switch_mixture_posterior``).
    ``evidence_scale`` multiplies every token's log-likelihoods first (1: naive Bayes).
    """

    def __init__(
        self, num_experts: int, vocab_size: int, buckets: int, mu: float, alpha: float,
        switch: float = 0.0, switch_rates=None, evidence_scale: float = 1.0,
    ):  # fmt: skip
        super().__init__()
        self.buckets, self.mu, self.alpha = int(buckets), float(mu), float(alpha)
        self.switch = float(switch)
        self.switch_rates = tuple(float(r) for r in switch_rates) if switch_rates else ()
        self.evidence_scale = float(evidence_scale)
        # Counts, fp32 (exact up to 2**24 per entry); parameters so that loading keeps them fp32.
        zeros = torch.zeros
        self.unigram_counts = nn.Parameter(zeros(num_experts, vocab_size), requires_grad=False)
        self.context_counts = nn.Parameter(zeros(num_experts, vocab_size), requires_grad=False)
        self.bigram_counts = nn.Parameter(zeros(num_experts, self.buckets), requires_grad=False)

    def _tables(self):
        """``q_j(v)`` and ``n_j(v) + mu`` (fp64, elementwise as in ``ngram_log_probs``: the same
        numbers) and the bigram counts as stored (fp32 holds them exactly; a gathered count meets
        fp64 in ``smoothed_log_probs``, so no fp64 copy of the [E, buckets] table is kept),
        cached until the counts, ``mu`` or ``alpha`` change."""
        key = (
            self.mu,
            self.alpha,
            *((p.data_ptr(), p._version, p.device) for p in self.parameters()),
        )
        if getattr(self, "_cache_key", None) != key:
            uni_EV = self.unigram_counts.double()
            denom_E1 = uni_EV.sum(dim=1, keepdim=True) + self.alpha * uni_EV.shape[1]
            q_EV = (uni_EV + self.alpha) / denom_E1
            self._cached = (q_EV, self.context_counts.double() + self.mu, self.bigram_counts.data)
            self._cache_key = key
        return self._cached

    def log_probs(self, ids_BT: torch.Tensor, real_BT: torch.Tensor, state: dict | None = None):
        """``log p_j(v_t | v_{t-1})`` [E, B, T] of every position (``ngram_log_probs``), and each
        position's previous real token and whether it has one (``previous_real_tokens``)."""
        vocab = self.unigram_counts.shape[1]
        low, high = torch.aminmax(ids_BT) if ids_BT.numel() else (0, 0)
        if int(low) < 0 or int(high) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}) for n-gram routing")
        q_EV, context_mu_EV, big_EH = self._tables()
        prev_BT, has_prev_BT = previous_real_tokens(ids_BT, real_BT, state)
        logp_EBT = smoothed_log_probs(
            q_EV[:, ids_BT], context_mu_EV[:, prev_BT], big_EH, prev_BT, ids_BT, has_prev_BT,
            self.mu,
        )  # fmt: skip
        return logp_EBT, prev_BT, has_prev_BT

    def forward(
        self, ids_BT: torch.Tensor, real_BT: torch.Tensor | None = None, state: dict | None = None
    ) -> tuple[torch.Tensor, dict]:
        """``scores``, called as a module (what the model does: hooks that place or load the
        count tables, as device maps with offloading do, see the call)."""
        return self.scores(ids_BT, real_BT, state)

    def resize_vocab(self, vocab_size: int) -> None:
        """The count tables for a vocabulary of ``vocab_size`` tokens (the model's embeddings
        resized): a new token has count 0 for every expert, as a build on that vocabulary gives;
        a removed one's counts go. The bigram table is hashed and keeps its size."""
        for name in ("unigram_counts", "context_counts"):
            old = getattr(self, name)
            new = torch.zeros(old.shape[0], vocab_size, dtype=old.dtype, device=old.device)
            keep = min(vocab_size, old.shape[1])
            new[:, :keep] = old.data[:, :keep]
            setattr(self, name, nn.Parameter(new, requires_grad=False))

    def scores(
        self, ids_BT: torch.Tensor, real_BT: torch.Tensor | None = None, state: dict | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Scores [B, T, E] (fp64) of every position — cumulative log-likelihoods, or the log
        posterior of a switching chain (or of a mixture of them) — and the state after."""
        real_BT = _real_mask(ids_BT[..., None], real_BT)
        logp_EBT, prev_BT, has_prev_BT = self.log_probs(ids_BT, real_BT, state)
        logp_BTE = logp_EBT.permute(1, 2, 0) * real_BT[..., None]
        cum_BTE, new_state = sequence_scores(
            logp_BTE, real_BT, switch=self.switch, switch_rates=self.switch_rates,
            evidence_scale=self.evidence_scale, state=state,
        )  # fmt: skip
        new_state |= {  # the sequence's last real token so far (the previous one of the next)
            "cum": cum_BTE[:, -1],
            "last": torch.where(real_BT[:, -1], ids_BT[:, -1], prev_BT[:, -1]),
            "has_last": has_prev_BT[:, -1] | real_BT[:, -1],
        }
        return cum_BTE, new_state

    def randomise_(self, generator: torch.Generator) -> None:
        """Random counts (the random-routing baseline of `dume eval`)."""
        for counts in (self.unigram_counts, self.bigram_counts):
            counts.data = (
                torch.randint(0, 100, counts.shape, generator=generator).float().to(counts.device)
            )
        self.context_counts.data = self.unigram_counts.data.clone()


class DumeLinearRouter(nn.Linear):
    """One layer's linear router (``model.layers.{l}.mlp.router``: ``weight`` [E, F], ``bias``).

    Called as a module (so hooks that place or load its weights, as device maps with offloading
    do, see the call) and always in fp32: ``W f + b`` whatever the weights' dtype."""

    def forward(self, feats_NF: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(feats_NF.float(), self.weight.float(), bias)

    def randomise_(self, generator: torch.Generator) -> None:
        """Random unit-norm rows without bias (the random-routing baseline of `dume eval`)."""
        w = self.weight
        w.data = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.device)
        w.data /= w.data.norm(dim=1, keepdim=True)
        if self.bias is not None:
            self.bias.data.zero_()


# -- the kinds' inference code -------------------------------------------------------------------


def check_switch_rates(rates, switch, where: str = "") -> tuple[float, ...]:
    """The n-gram router's ``switch_rates`` as a tuple (one-line ValueError naming the key): a
    list of 1 to MAX_SWITCH_RATES rates in [0, 0.5), and no single ``switch`` rate beside it."""
    if isinstance(rates, (str, bytes)) or not isinstance(rates, (list, tuple)):
        raise ValueError(f"{where}switch_rates must be a list of numbers, got {rates!r}")
    rates = options_by_name(NGRAM_OPTIONS)["switch_rates"].check(rates, where=where)
    if len(rates) > MAX_SWITCH_RATES:
        raise ValueError(
            f"{where}switch_rates holds {len(rates)} rates: at most {MAX_SWITCH_RATES}"
        )
    if switch not in (0, 0.0):
        raise ValueError(f"{where}switch_rates replaces switch: give one of them, not both")
    return rates


def _check_options(routing: dict, options) -> None:
    for name, option in options_by_name(options).items():
        if name in routing:
            option.check(routing[name], where="routing.")


def _check_number(routing: dict, key: str) -> None:
    value = routing.get(key, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"routing.{key} must be a number > 0, got {value!r}")


class KindInference:
    """Inference code of a router kind (see the module docstring)."""

    name = ""
    config_keys: tuple[str, ...] = ()  # the kind's keys of `routing`, besides COMMON_CONFIG_KEYS
    sequence_router_name: str | None = None  # model attribute of a sequence-level router

    @staticmethod
    def validate(routing: dict) -> None:
        """One-line ValueError naming the key unless ``routing`` is sound for this kind."""

    @staticmethod
    def stateful(routing: dict) -> bool:
        """Whether routing depends on earlier tokens (and keeps running state per sequence)."""
        return False

    @staticmethod
    def layer_router(routing: dict, hidden_size: int, num_experts: int, bias: bool):
        return None

    @staticmethod
    def sequence_router(routing: dict, num_experts: int, vocab_size: int):
        return None

    @staticmethod
    def layer_logits(block, hidden_BTD: torch.Tensor, ctx) -> torch.Tensor:
        """Router logits [B, T, E] of one layer (per-layer kinds), updating ``ctx``'s state."""
        raise NotImplementedError


class LinearInference(KindInference):
    name = "linear"
    config_keys = ("features", "smoothing", "solver", "lam", "ridge_lambda", "lda_shrinkage",
                   "priors")  # fmt: skip

    @staticmethod
    def validate(routing: dict) -> None:
        features = routing.get("features", "token")
        if features not in LINEAR_OPTIONS[0].choices:
            raise ValueError(
                f"routing.features must be one of {ROUTING_FEATURES}, got {features!r}"
            )
        _check_options(routing, LINEAR_OPTIONS)
        for key in ("lam", "ridge_lambda", "lda_shrinkage"):
            _check_number(routing, key)

    @staticmethod
    def stateful(routing: dict) -> bool:
        return routing.get("features", "token") != "token" or routing.get("smoothing", 0.0) > 0

    @staticmethod
    def layer_router(routing: dict, hidden_size: int, num_experts: int, bias: bool):
        dim = routing_feature_dim(routing.get("features", "token"), hidden_size)
        return DumeLinearRouter(dim, num_experts, bias=bias)

    @staticmethod
    def layer_logits(block, hidden_BTD: torch.Tensor, ctx) -> torch.Tensor:
        real_BT = ctx.real_BT if ctx is not None else None
        layers = ctx.layers if ctx is not None else None
        carried = layers.get(block.layer_idx, {}) if layers is not None else {}
        feats_BTF, feat_state = causal_features(
            block.features, hidden_BTD, real_BT, carried.get("features")
        )
        logits_BTE = block.router_logits(feats_BTF)
        logits_BTE, smooth_state = causal_ema(
            logits_BTE, block.smoothing, real_BT, carried.get("smoothing")
        )
        if layers is not None:
            layers[block.layer_idx] = {"features": feat_state, "smoothing": smooth_state}
        return logits_BTE


class NgramInference(KindInference):
    name = "ngram"
    config_keys = ("features", "smoothing", "solver", "lam", "mu", "ngram")
    sequence_router_name = "ngram_router"

    @staticmethod
    def validate(routing: dict) -> None:
        ngram = routing.get("ngram")
        if not isinstance(ngram, dict) or not (
            set(NGRAM_KEYS) <= set(ngram) <= set(NGRAM_KEYS + NGRAM_OPTIONAL_KEYS)
        ):
            raise ValueError(
                f"routing.ngram must be a dict with keys {NGRAM_KEYS} (optional: "
                f"{NGRAM_OPTIONAL_KEYS})"
            )
        options = options_by_name(NGRAM_OPTIONS)
        for key, name in (("buckets", "ngram_buckets"), ("mu", "mu"), ("alpha", "ngram_alpha"),
                          ("switch", "switch"), ("evidence_scale", "evidence_scale")):  # fmt: skip
            if key not in ngram:
                continue
            if ngram[key] == "auto":
                raise ValueError(f"routing.ngram.{key} must be a number, got 'auto'")
            options[name].check(ngram[key], where=f"routing.ngram.{key}: ")
        if "switch_rates" in ngram:
            check_switch_rates(ngram["switch_rates"], ngram.get("switch", 0.0), "routing.ngram.")
        for key, legacy in NGRAM_LEGACY.items():
            if routing.get(key, legacy) != legacy:
                raise ValueError(f"routing.{key} must be {legacy!r} with n-gram routing")
        if routing.get("smoothing", 0.0):
            raise ValueError("routing.smoothing must be 0 with n-gram routing (it is cumulative)")
        for key in ("lam", "mu"):
            _check_number(routing, key)

    @staticmethod
    def stateful(routing: dict) -> bool:
        return True

    @staticmethod
    def sequence_router(routing: dict, num_experts: int, vocab_size: int):
        ngram = routing["ngram"]
        return DumeNgramRouter(
            num_experts, vocab_size, ngram["buckets"], ngram["mu"], ngram["alpha"],
            ngram.get("switch", 0.0), ngram.get("switch_rates"), ngram.get("evidence_scale", 1.0),
        )  # fmt: skip


BUILTIN_KINDS = {k.name: k for k in (LinearInference, NgramInference)}
COMMON_CONFIG_KEYS = ("kind", "module", "preset", "min_weight")


def kind_name_of_config(routing: dict) -> str:
    """The router kind of a config's ``routing`` (configs of earlier versions name none: their
    ``features`` tell)."""
    if "kind" in routing:
        return routing["kind"]
    return (
        NgramInference.name
        if routing.get("features") == NGRAM_LEGACY["features"]
        else (LinearInference.name)
    )


def inference_kind(routing: dict) -> type[KindInference]:
    """The inference code of ``routing``'s kind: built in, or the class ``KIND_INFERENCE`` of the
    module named in ``routing.module``."""
    name = kind_name_of_config(routing)
    if name in BUILTIN_KINDS:
        return BUILTIN_KINDS[name]
    module = routing.get("module")
    if not isinstance(module, str) or not module:
        raise ValueError(
            f"routing.kind {name!r} is not built in and routing.module names no module with "
            "its inference code"
        )
    try:
        found = importlib.import_module(module).KIND_INFERENCE
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"routing.module {module!r} gives no inference code: {exc}") from None
    if found.name != name:
        raise ValueError(f"routing.module {module!r} holds kind {found.name!r}, not {name!r}")
    return found


def validate_routing(routing) -> type[KindInference]:
    """Check a config's ``routing`` dict (one-line ValueError naming the key); its kind's code."""
    if not isinstance(routing, dict):
        raise ValueError(f"routing must be a dict, got {routing!r}")
    kind = inference_kind(routing)
    known = COMMON_CONFIG_KEYS + kind.config_keys
    for key in routing:
        if key not in known:
            raise ValueError(
                f"routing.{key} is not a known routing option (known: {', '.join(known)})"
            )
    common = options_by_name(COMMON_OPTIONS)
    if "min_weight" in routing:
        common["min_weight"].check(routing["min_weight"], where="routing.")
    kind.validate(routing)
    return kind


def routing_is_stateful(routing: dict | None) -> bool:
    """Whether routing depends on earlier tokens (and so keeps running state per sequence)."""
    routing = routing or {}
    return inference_kind(routing).stateful(routing)
