"""The ``ngram`` router kind: one sequence-level naive-Bayes router on hashed token bigrams.

Statistics: ``core.ngram.NgramStats`` (unigram, context and hashed bigram counts; held-out ones
carry their exact bigrams), counted from the token ids without running a model
(``NgramCollector``). Solve: per-expert sums of the counts in canonical order (``core.ngram``);
``mu`` ``"auto"`` is chosen on the held-out curves each node computes (or, with ``mu_criterion``
``bigrams``, on the exact held-out bigrams; ``model.ngram_select``); routing shares are estimated
on sequences simulated from the tables (``model.ngram_shares``). Checkpoint:
``ngram_router.{unigram,context,bigram}_counts`` and ``routing.ngram``; inference:
``routing_dume.NgramInference`` / ``DumeNgramRouter``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from dume_dist.core.dp import add_capped_counts
from dume_dist.core.ngram import (
    BIGRAM_FORMS,
    DEFAULT_ALPHA,
    NGRAM_SCHEMA,
    NgramStats,
    NgramTables,
    bucket_fill,
    check_count_values,
    coalesce_pairs,
    ngram_feature_map,
    ngram_from_tensors,
    ngram_layout,
    ngram_tables,
    ngram_to_bytes,
)
from dume_dist.core.stats import MAX_TOKENS
from dume_dist.model.data import keep_mask
from dume_dist.model.kinds import BackboneShape, Collector, RouterKind, feed, register_kind
from dume_dist.model.routing_dume import (
    NGRAM_OPTIONAL_KEYS,
    NgramInference,
    check_switch_rates,
    ngram_bucket,
    previous_real_tokens,
)
from dume_dist.model.routing_options import NGRAM_LEGACY, NGRAM_OPTIONS

_PAIRS_BEFORE_COALESCING = 1 << 22  # rows of held-out bigrams kept before summing equal ones


class NgramCollector(Collector):
    """Token counts of the real tokens among the first ``max_tokens_per_seq`` of each sequence: a
    token always counts as a unigram, and as a bigram with the sequence's previous real token
    when it has one. With ``pairs`` the exact bigram list is kept too (held-out statistics); it
    is in the result only with ``send_pairs``. With ``fit`` (the fit part's collector, complete
    and summed over the workers when ``result`` is called) and ``curve_grid`` the result carries
    the held-out curve of the bigrams under the fit counts (``ngram_select.heldout_curve``)."""

    def __init__(self, *, vocab_size: int, buckets: int, max_tokens_per_seq: int, pairs: bool,
                 identity: str = "", count_cap: int | None = None, send_pairs: bool | None = None,
                 fit: NgramCollector | None = None, curve_grid=None,
                 alpha: float = DEFAULT_ALPHA):  # fmt: skip
        self.vocab_size, self.buckets, self.count_cap = vocab_size, buckets, count_cap
        self.max_tokens_per_seq, self.pairs, self.identity = max_tokens_per_seq, pairs, identity
        self.send_pairs = pairs if send_pairs is None else send_pairs
        self.fit, self.curve_grid, self.alpha = fit, curve_grid, alpha
        self.counts = torch.zeros(2 * vocab_size + buckets, dtype=torch.float64)
        self.found: list[torch.Tensor] = []

    def add(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> None:
        ids_BT, real_BT = ids_BT.cpu().long(), mask_BT.cpu().bool()
        keep_BT = keep_mask(real_BT, self.max_tokens_per_seq)
        ids, vocab = ids_BT[keep_BT], self.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab}) for n-gram statistics")
        prev_BT, has_prev_BT = previous_real_tokens(ids_BT, real_BT)
        pair_BT = keep_BT & has_prev_BT
        prev, cur = prev_BT[pair_BT], ids_BT[pair_BT]
        # no sequence adds more than count_cap to one count (differential privacy, core.dp)
        row_BT = torch.arange(ids_BT.shape[0])[:, None].expand_as(ids_BT)
        row, pair_row, cap = row_BT[keep_BT], row_BT[pair_BT], self.count_cap
        add_capped_counts(self.counts[:vocab], ids, row, cap)
        add_capped_counts(self.counts[vocab : 2 * vocab], prev, pair_row, cap)
        bucket = ngram_bucket(prev, cur, self.buckets)
        add_capped_counts(self.counts[2 * vocab :], bucket, pair_row, cap)
        if self.pairs:
            self.found.append(torch.stack([prev, cur, torch.ones_like(cur)], dim=1))
            if sum(len(f) for f in self.found) > _PAIRS_BEFORE_COALESCING:  # bound the memory
                self.found = [coalesce_pairs(torch.cat(self.found))]

    def flat(self) -> torch.Tensor:
        return self.counts

    def load_flat(self, flat: torch.Tensor) -> None:
        self.counts = flat.cpu().double().clone()

    def rows(self) -> torch.Tensor | None:
        if not self.pairs:
            return None
        return coalesce_pairs(torch.cat(self.found)) if self.found else torch.zeros(0, 3).long()

    def load_rows(self, rows: torch.Tensor) -> None:
        self.found = [coalesce_pairs(rows.cpu().long())]

    def result(self) -> dict[float, NgramStats]:
        vocab = self.vocab_size
        uni, ctx, big = (
            self.counts[:vocab],
            self.counts[vocab : 2 * vocab],
            self.counts[2 * vocab :],
        )
        stats = NgramStats(uni.clone(), ctx.clone(), big.clone(), pairs_K3=self.rows())
        if self.curve_grid is not None:
            from dume_dist.model.ngram_select import with_heldout_curve

            fit = self.fit.result()[0.0]
            stats = with_heldout_curve(stats, fit, self.curve_grid, self.alpha, self.send_pairs)
        elif not self.send_pairs:
            stats = stats.with_meta(pairs_K3=None, feature_map="")
        return {0.0: stats}  # its identity from what it carries (checked by the coordinator)


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
    """Token counts for the n-gram router over the tokens the Gram statistics see (see
    ``NgramCollector``). No model runs: the counts depend on the token ids only. ``count_cap``:
    no sequence adds more than this to any one count (differential privacy by sequence)."""
    collector = NgramCollector(vocab_size=vocab_size, buckets=buckets, count_cap=count_cap,
                               max_tokens_per_seq=max_tokens_per_seq, pairs=pairs)  # fmt: skip
    feed(collector, batches, max_tokens_per_seq, progress=progress, desc="n-gram counts")
    return collector.result()[0.0]


def with_heldout_counts(fit: Mapping, held: Mapping) -> dict:
    """Each contribution's fit counts plus its held-out counts (bigrams and curve dropped), once
    the held-out part has chosen what it was kept out for: the tables then count every token a
    contributor sent. A private held-out part is left out (it is a release of its own, with its
    own noise: adding it would add more noise than signal), as is one a contribution lacks."""
    from dume_dist.core.private import guarantee_of

    out = {}
    for name, (expert, stats) in fit.items():
        extra = held.get(name)
        if extra is not None and extra[0] != expert:
            raise ValueError(
                f"held-out statistics of {name!r} name expert {extra[0]}, its fit ones {expert}"
            )
        if extra is None or guarantee_of(extra[1]) is not None:
            out[name] = (expert, stats)
        else:
            out[name] = (expert, stats + extra[1].counts_only())
    return out


class NgramKind(RouterKind):
    name = NgramInference.name
    options = NGRAM_OPTIONS
    schema = NGRAM_SCHEMA
    stats_label = "n-gram counts (NgramStats)"
    stats_type = NgramStats

    # -- options ------------------------------------------------------------------------------

    def claims(self, named: Mapping) -> bool:
        return any(named.get(k) == v for k, v in NGRAM_LEGACY.items())

    def from_named(self, named: dict, base: Mapping | None = None) -> dict:
        named = dict(named)
        given = {k: named.pop(k) for k in NGRAM_LEGACY if k in named}
        if given and given != {k: NGRAM_LEGACY[k] for k in given}:
            raise ValueError("the 'nb' solver goes with 'ngram' features, and only with them")
        if named.pop("smoothing", 0.0) not in (0, 0.0):
            raise ValueError("ngram routing is cumulative already: smoothing must be 0")
        named.pop("smoothing_grid", None)  # earlier versions stored it with every routing
        for old, new in (("lam", "mu"), ("lam_grid", "mu_grid")):
            if old in named:
                named[new] = named.pop(old)
        return named

    def legacy_view(self, options: Mapping) -> dict:
        return {**NGRAM_LEGACY, "lam": options["mu"], "lam_grid": options["mu_grid"],
                "smoothing": 0.0}  # fmt: skip

    def selected_option(self, options: Mapping) -> str | None:
        return "mu"

    def check(self, spec) -> None:
        if spec.switch_rates is not None:
            check_switch_rates(spec.switch_rates, spec.switch, "routing option ")

    def widest_changes(self, specs) -> dict:  # switch "auto" collects what any rate choice needs
        return {"switch_rates": None}

    def heldout_as_fit(self, stats):  # the exact bigrams and the curve dropped
        return stats.counts_only()

    def heldout_for(self, spec, stats, part: float):  # what spec does not use dropped
        drop = {} if _sends_pairs(spec) else {"pairs_K3": None}
        if not _sends_curve(spec):
            drop |= {"curve_M": None, "curve_mu_M": None}
        return stats.with_meta(**drop, feature_map=self.identity(spec, part))

    def identity(self, spec, part: float | None = None) -> str:
        if part is None:
            return ngram_feature_map(spec.ngram_buckets)
        return ngram_feature_map(spec.ngram_buckets, _sends_pairs(spec), _sends_curve(spec))

    def statistics_settings(self, spec) -> dict | None:
        return {"features": NGRAM_LEGACY["features"], "ngram_buckets": spec.ngram_buckets,
                **(self.sample_settings(spec) or {})}  # fmt: skip

    # -- statistics ---------------------------------------------------------------------------

    def encode(self, stats) -> bytes:
        return ngram_to_bytes(stats)

    def decode(self, tensors, meta) -> NgramStats:
        return ngram_from_tensors(tensors, meta)

    def layout(self, spec, backbone: BackboneShape):
        # held-out parts or not: the identity tells (checked after decoding)
        points = len(_mu_grid(spec)) if _sends_curve(spec) else None
        layout = ngram_layout(backbone.vocab_size, spec.ngram_buckets, True, points)
        # the bigram counts sparse or dense (earlier versions): decoding wants one form
        return layout, ("pairs", "curve", "curve_mu", "curve_count", *BIGRAM_FORMS)

    def validate(self, stats, spec, backbone: BackboneShape) -> None:
        stats.validate(vocab_size=backbone.vocab_size, buckets=spec.ngram_buckets)
        grid = torch.tensor(_mu_grid(spec), dtype=torch.float64)
        if stats.curve_M is not None and not torch.equal(stats.curve_mu_M, grid):
            raise ValueError(f"held-out curve is over mu {stats.curve_mu_M.tolist()}, the "
                             f"coordinator's grid is {grid.tolist()}")  # fmt: skip

    def check_values(self, stats, spec, backbone: BackboneShape) -> None:
        check_count_values(stats, MAX_TOKENS, spec.ngram_alpha)
        sampled = stats.extra.get("sampled_tokens", 0)
        if not isinstance(sampled, int) or isinstance(sampled, bool) or sampled < 0:
            raise ValueError(f"n-gram statistics: sampled_tokens must be a count, got {sampled!r}")
        if sampled > stats.num_tokens:
            raise ValueError(f"n-gram statistics claim {sampled} sampled tokens, count {stats.num_tokens}")  # fmt: skip

    def heldout_settings(self, spec) -> dict | None:
        if not _sends_curve(spec):
            return None
        return {"mu_grid": list(_mu_grid(spec)), "ngram_alpha": spec.ngram_alpha}

    def heldout_release(self, spec) -> str | None:
        if not (spec.needs_holdout and _sends_pairs(spec)):
            return None
        return "exact held-out bigrams (previous token, token, count of your held-out documents)"

    def check_dp(self, spec, dp) -> None:
        if spec.needs_holdout and _sends_pairs(spec):
            raise ValueError(
                "differential privacy with ngram routing needs mu 'auto' by held-out likelihood "
                "(--mu-criterion likelihood) or a fixed mu: exact held-out bigrams are not "
                "released privately"
            )

    def dp_mechanism_options(self, spec) -> dict:
        if not _sends_curve(spec):
            return {}
        from functools import partial

        from dume_dist.model.ngram_select import heldout_curve

        return {"heldout_curve": partial(_clipped_curve, heldout_curve, spec.ngram_alpha)}

    def dp_bounds(self, spec, backbone, dp):
        self.check_dp(spec, dp)
        return None, dp.count_cap if dp.unit == "sequence" else None

    def collectors(self, spec, backbone, expert, *, holdout, max_tokens_per_seq, device,
                   dtype=None, clip=None, count_cap=None, private=False):  # fmt: skip
        fit = NgramCollector(
            vocab_size=backbone.config.vocab_size, buckets=spec.ngram_buckets,
            max_tokens_per_seq=max_tokens_per_seq, pairs=False, identity=self.identity(spec),
            count_cap=count_cap,
        )  # fmt: skip
        if not holdout:
            return [fit]
        held = NgramCollector(
            vocab_size=backbone.config.vocab_size, buckets=spec.ngram_buckets,
            max_tokens_per_seq=max_tokens_per_seq, pairs=True,
            # private: the node's mechanism recomputes the curve from them, then drops them
            send_pairs=_sends_pairs(spec) or (private and _sends_curve(spec)),
            identity=self.identity(spec, 0.0), count_cap=count_cap, fit=fit,
            curve_grid=_mu_grid(spec) if _sends_curve(spec) else None, alpha=spec.ngram_alpha,
        )  # fmt: skip
        return [fit, held]

    def sample_settings(self, spec) -> dict | None:
        if not spec.ngram_sample > 0:
            return None
        return {"ngram_sample": spec.ngram_sample, "ngram_sample_max": spec.ngram_sample_max}

    def check_sampling(self, spec, expert) -> None:
        from dume_dist.model.ngram_sample import start_token

        if self.sample_settings(spec) is not None:
            try:
                start_token(expert.config, expert.path)
            except ValueError as exc:
                raise ValueError(f"expert {expert.name}: {exc}") from None

    def sampled(self, spec, backbone, expert, *, real_tokens, max_tokens_per_seq, fingerprint,
                device, dtype=None, private=False):  # fmt: skip
        from dume_dist.model.ngram_sample import SampledBatches, sample_shape, start_token

        if private:  # its size follows the data's: a private contribution counts no sample
            return None

        limit = getattr(expert.config, "max_position_embeddings", None)
        limit = min(limit, max_tokens_per_seq) if limit else max_tokens_per_seq
        sequences, length = sample_shape(real_tokens, spec.ngram_sample, spec.ngram_sample_max,
                                         limit)  # fmt: skip
        if sequences == 0:
            return None
        start = start_token(expert.config, expert.path)

        def make_model():  # the expert's own model: it writes its domain best (docs/routing.md)
            from dume_dist.model.ngram_sample import expert_model

            return expert_model(expert, device, dtype)

        return SampledBatches(make_model, fingerprint, sequences, length, start, device)

    # -- solve and checkpoint -----------------------------------------------------------------

    def solve(self, spec, fit: Mapping, num_experts: int, holdout: Mapping):
        from dume_dist.model.ngram_select import select_mu, select_mu_likelihood, select_switch
        from dume_dist.model.ngram_shares import ngram_routing_shares
        from dume_dist.model.routing import SolvedRouting

        selection, mu = None, spec.mu
        if mu == "auto" and spec.mu_criterion == "bigrams":
            selection = select_mu(fit, holdout[0.0], num_experts, _mu_grid(spec), spec.ngram_alpha)
            mu = selection.lam
        elif mu == "auto":
            selection = select_mu_likelihood(holdout[0.0], num_experts, _mu_grid(spec))
            mu = selection.lam
        tables = ngram_tables(fit, num_experts, float(mu), spec.ngram_alpha)
        switch, switch_selection = spec.switch, None
        if switch == "auto" and num_experts < 2:  # one expert: every rate routes alike
            switch = 0.0
        elif switch == "auto":
            switch_selection = select_switch(
                tables, holdout[0.0], num_experts, evidence_scale=spec.evidence_scale
            )
            switch = switch_selection.lam
        chosen = {"mu": float(mu), "switch": float(switch)}
        shares = ngram_routing_shares(
            tables, fit, holdout.get(0.0), num_experts, switch=float(switch),
            switch_rates=spec.switch_rates, evidence_scale=spec.evidence_scale,
        )  # fmt: skip
        if holdout.get(0.0):  # chosen on the held-out part: the tables then count it too
            tables = ngram_tables(
                with_heldout_counts(fit, holdout[0.0]), num_experts, float(mu), spec.ngram_alpha
            )
        extras = {"switch": float(switch), "switch_selection": switch_selection, "shares": shares,
                  "switch_rates": spec.switch_rates, "evidence_scale": spec.evidence_scale}  # fmt: skip
        return SolvedRouting(tables, spec, float(mu), 0.0, selection, chosen, extras)

    def config_routing(self, solved) -> dict:
        spec = solved.spec
        ngram = solved.routers.config()
        switch = getattr(solved, "switch", 0.0)
        if switch > 0:
            ngram["switch"] = switch
        if getattr(solved, "switch_rates", None):
            ngram["switch_rates"] = list(solved.switch_rates)
        if getattr(solved, "evidence_scale", 1.0) != 1.0:
            ngram["evidence_scale"] = solved.evidence_scale
        out = {"kind": self.name, **NGRAM_LEGACY, "lam": solved.lam, "mu": solved.lam,
               "ngram": ngram}  # fmt: skip
        if spec.min_weight and spec.top_k > 1:
            out["min_weight"] = float(spec.min_weight)
        if spec.preset:
            out["preset"] = spec.preset
        return out

    def manifest_routing(self, solved) -> dict:
        selection = getattr(solved, "switch_selection", None)
        rates = getattr(solved, "switch_rates", None)
        return {"mu": solved.lam, "switch": getattr(solved, "switch", 0.0),
                **(self.sample_settings(solved.spec) or {}),
                "bucket_fill": bucket_fill(solved.routers.bigram_EH),
                "switch_rates": list(rates) if rates else None,
                "evidence_scale": getattr(solved, "evidence_scale", 1.0),
                "switch_selection": None if selection is None else selection.to_json()}  # fmt: skip

    def check_routers(self, routers, routing: Mapping, num_experts: int, backbone_config) -> None:
        if not isinstance(routers, NgramTables):
            raise ValueError(
                "n-gram routing needs the n-gram router's tables, and only it uses them"
            )
        ngram = {
            k: v for k, v in (routing.get("ngram") or {}).items() if k not in NGRAM_OPTIONAL_KEYS
        }
        if ngram != routers.config():
            raise ValueError(f"routing.ngram {routing.get('ngram')} does not match the tables")
        want = (num_experts, backbone_config.vocab_size)
        for name in ("unigram_EV", "context_EV"):
            if tuple(getattr(routers, name).shape) != want:
                raise ValueError(
                    f"n-gram {name} has shape {tuple(getattr(routers, name).shape)}, expected {want}"
                )
        if routers.bigram_EH.shape[0] != num_experts:
            raise ValueError(
                f"n-gram tables have {routers.bigram_EH.shape[0]} experts, not {num_experts}"
            )

    def checkpoint_tensors(self, routers, num_layers: int):
        prefix = NgramInference.sequence_router_name
        yield None, f"{prefix}.bigram_counts", routers.bigram_EH.float()
        yield None, f"{prefix}.context_counts", routers.context_EV.float()
        yield None, f"{prefix}.unigram_counts", routers.unigram_EV.float()

    def config_identity(self, routing: Mapping) -> str:
        return ngram_feature_map(routing["ngram"]["buckets"])


def _clipped_curve(curve_fn, alpha, fit, pairs_K3, mu_grid, clip):
    return curve_fn(fit, pairs_K3, mu_grid, alpha, clip=clip)


def _mu_grid(spec) -> tuple[float, ...]:
    from dume_dist.model.ngram_select import DEFAULT_MU_GRID

    return tuple(float(m) for m in (spec.mu_grid or DEFAULT_MU_GRID))


def _sends_curve(spec) -> bool:
    """Held-out statistics carry the held-out curve (μ chosen by held-out likelihood)."""
    return spec.mu == "auto" and spec.mu_criterion == "likelihood"


def _sends_pairs(spec) -> bool:
    """Held-out statistics carry the exact held-out bigrams: μ chosen on them (the switch rate
    is chosen on text simulated from the held-out counts)."""
    return spec.mu == "auto" and spec.mu_criterion == "bigrams"


register_kind(NgramKind())
