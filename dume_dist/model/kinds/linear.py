"""The ``linear`` router kind: per-layer linear routers solved from Gram statistics (DESIGN §2).

Statistics: ``core.stats.RouterStats``, one Gram of the router features per MoE layer (identity
``feature_map``: the features' name, ``"<features>+ema:<β>"`` for held-out Grams of smoothed
features), collected by ``collect.GramCollector`` on the dense model (backbone + own expert).
Solve: ``core.solve`` (``ridge`` or ``lda``; ``priors`` ``tokens`` or ``equal``); ``ridge_lambda``
/ ``lda_shrinkage`` / ``smoothing`` ``"auto"`` are chosen on held-out Grams (``core.select``).
Checkpoint: ``mlp.router.weight`` and ``bias`` per layer; inference: ``routing_dume.LinearInference``.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping

from dume_dist.core.private import lam_floor
from dume_dist.core.select import default_lam_grid, select_routing
from dume_dist.core.solve import Router, solve_routers
from dume_dist.core.stats import (
    STATS_SCHEMA,
    RouterStats,
    check_gram_values,
    gram_from_tensors,
    gram_layout,
    gram_to_bytes,
)
from dume_dist.model.kinds import BackboneShape, RouterKind, register_kind
from dume_dist.model.routing_dume import LinearInference, routing_feature_dim
from dume_dist.model.routing_options import AUTO, LINEAR_OPTIONS

_PARAM = {"ridge": "ridge_lambda", "lda": "lda_shrinkage"}  # the solver's own parameter


class LinearKind(RouterKind):
    name = LinearInference.name
    options = LINEAR_OPTIONS
    schema = STATS_SCHEMA
    stats_label = "Gram statistics (RouterStats)"
    stats_type = RouterStats

    # -- options ------------------------------------------------------------------------------

    def claims(self, named: Mapping) -> bool:
        return named.get("features") in LINEAR_OPTIONS[0].choices or named.get("solver") in _PARAM

    def from_named(self, named: dict, base: Mapping | None = None) -> dict:
        named = dict(named)
        solver = named.get("solver", (base or {}).get("solver", "ridge"))
        if "lam" in named:  # earlier versions: λ of whichever solver
            named[_PARAM.get(solver, "ridge_lambda")] = named.pop("lam")
        return named

    def legacy_view(self, options: Mapping) -> dict:
        return {"lam": options[_PARAM[options["solver"]]]}

    def selected_option(self, options: Mapping) -> str | None:
        return _PARAM.get(options.get("solver", "ridge"))

    def holdout_parts(self, spec) -> tuple[float, ...]:
        if not spec.needs_holdout:
            return ()
        if spec.smoothing == AUTO:
            return tuple(sorted(set(spec.smoothing_grid) | {0.0}))
        return (float(spec.smoothing),)

    def widest_changes(self, specs) -> dict:
        return {
            "smoothing_grid": tuple(sorted({0.0} | {b for s in specs for b in s.smoothing_grid}))
        }

    def identity(self, spec, part: float | None = None) -> str:
        part = float(part or 0.0)
        return spec.features if part == 0.0 else f"{spec.features}+ema:{part!r}"

    def statistics_settings(self, spec) -> dict | None:
        if spec.features == "token" and not spec.needs_holdout:
            return None  # the paper's statistics: submission ids as before routing options
        return {"features": spec.features}

    # -- statistics ---------------------------------------------------------------------------

    def encode(self, stats) -> bytes:
        return gram_to_bytes(stats)

    def decode(self, tensors, meta) -> RouterStats:
        return gram_from_tensors(tensors, meta)

    def layout(self, spec, backbone: BackboneShape):
        dim = routing_feature_dim(spec.features, backbone.hidden_size)
        return gram_layout(backbone.num_layers, dim), ()

    def validate(self, stats, spec, backbone: BackboneShape) -> None:
        dim = routing_feature_dim(spec.features, backbone.hidden_size)
        stats.validate(num_layers=backbone.num_layers, feature_dim=dim)

    def check_values(self, stats, spec, backbone: BackboneShape) -> None:
        bound_L = backbone.feature_bound_L
        blocks = routing_feature_dim(spec.features, 1)  # token: 1, prefix_mean: 2
        check_gram_values(stats.gram_LPP, None if bound_L is None else blocks * bound_L)

    def check_dp(self, spec, dp) -> None:
        if dp.unit != "sequence":
            raise ValueError(
                "--dp-unit token does not hold for Gram statistics (one token changes the hidden "
                "states of every later token of its window): use --dp-unit sequence"
            )

    def dp_bounds(self, spec, backbone, dp):
        from dume_dist.model.collect import default_clip

        self.check_dp(spec, dp)
        return (dp.clip if dp.clip is not None else default_clip(backbone, spec.features)), None

    def collectors(self, spec, backbone, expert, *, holdout, max_tokens_per_seq, device,
                   dtype=None, clip=None, count_cap=None, private=False):  # fmt: skip
        from dume_dist.model.collect import GramCollector, dense_model_for, stats_compute_dtype

        made = []

        def model():  # built at the first batch, once for both parts
            if not made:
                run_dtype = stats_compute_dtype(expert, device, dtype)
                made.append(dense_model_for(backbone, expert, dtype=run_dtype, device=device))
            return made[0]

        config = backbone.config
        parts = [(0.0,)] + ([self.holdout_parts(spec)] if holdout else [])
        return [
            GramCollector(
                model, features=spec.features, smoothings=betas,
                max_tokens_per_seq=max_tokens_per_seq, device=device,
                names={b: self.identity(spec, b) for b in betas},
                num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, clip=clip,
            )
            for betas in parts
        ]  # fmt: skip

    # -- solve and checkpoint -----------------------------------------------------------------

    def solve(self, spec, fit: Mapping, num_experts: int, holdout: Mapping):
        from dume_dist.model.routing import SolvedRouting

        param = _PARAM[spec.solver]
        lam, smoothing, selection = spec.options[param], spec.smoothing, None
        priors = spec.priors
        floor = lam_floor(fit, num_experts, spec.solver, priors)  # noise of private contributions
        if floor and lam != AUTO:
            lam = max(float(lam), floor)
        if spec.needs_holdout:
            grid = spec.lam_grid or default_lam_grid(spec.solver, priors)
            lam_grid = grid if lam == AUTO else (lam,)
            if floor:
                lam_grid = [floor] + [x for x in lam_grid if x > floor]
            selection = select_routing(
                fit, holdout, num_experts, solver=spec.solver, lam_grid=lam_grid, priors=priors
            )
            lam = selection.lam if lam == AUTO else float(lam)
            smoothing = selection.smoothing if smoothing == AUTO else float(smoothing)
        routers = solve_routers(fit, num_experts, lam=float(lam), solver=spec.solver,
                                priors=priors)  # fmt: skip
        gc.collect()
        chosen = {param: float(lam), "smoothing": float(smoothing)}
        shares = _shares(routers, fit, holdout.get(float(smoothing)), num_experts)
        return SolvedRouting(routers, spec, float(lam), float(smoothing), selection, chosen,
                             {"shares": shares})  # fmt: skip

    def config_routing(self, solved) -> dict:
        spec = solved.spec
        out = {"kind": self.name, "features": spec.features, "solver": spec.solver}
        out["lam"] = solved.lam
        out[_PARAM[spec.solver]] = solved.lam
        if solved.smoothing:
            out["smoothing"] = solved.smoothing
        if spec.priors != "tokens":  # the paper's configs stay as they were
            out["priors"] = spec.priors
        return _common_config(out, spec)

    def manifest_routing(self, solved) -> dict:
        spec = solved.spec
        return {"features": spec.features, "solver": spec.solver, "priors": spec.priors,
                _PARAM[spec.solver]: solved.lam}  # fmt: skip

    def bias_free_unsupported(self, solved) -> str | None:
        spec = solved.spec
        if spec.features != "token":
            return (
                f"routing features {spec.features!r}: a gate without intercept reads the MLP "
                "input, only 'token' features"
            )
        if solved.smoothing or spec.solver != "ridge":
            return (
                f"routing with smoothing or a non-ridge solver (smoothing={solved.smoothing}, "
                f"solver={spec.solver!r}); the gate is a plain linear map of the MLP input"
            )
        return None

    def bias_free_routers(self, solved, fit: Mapping, num_experts: int):
        reason = self.bias_free_unsupported(solved)
        if reason:
            raise ValueError(reason)
        return solve_routers(fit, num_experts, lam=solved.lam, bias=False,
                             priors=solved.spec.priors)  # fmt: skip

    def check_routers(self, routers, routing: Mapping, num_experts: int, backbone_config) -> None:
        num_layers = backbone_config.num_hidden_layers
        if not isinstance(routers, (list, tuple)) or len(routers) != num_layers:
            got = len(routers) if isinstance(routers, (list, tuple)) else type(routers).__name__
            raise ValueError(f"got {got} routers for {num_layers} layers")
        features = routing.get("features", "token")
        dim = routing_feature_dim(features, backbone_config.hidden_size)
        for router in routers:
            if not isinstance(router, Router) or router.bias_E is None:
                raise ValueError("DUME checkpoints need routers with a bias (solve with bias=True)")
            if tuple(router.weight_EF.shape) != (num_experts, dim):
                raise ValueError(
                    f"router weight has shape {tuple(router.weight_EF.shape)}, expected "
                    f"({num_experts}, {dim}) for {features!r} features"
                )

    def checkpoint_tensors(self, routers, num_layers: int):
        for layer in range(num_layers):
            prefix = f"model.layers.{layer}.mlp.router"
            yield layer, f"{prefix}.weight", routers[layer].weight_EF.float()
            yield layer, f"{prefix}.bias", routers[layer].bias_E.float()

    def config_identity(self, routing: Mapping) -> str:
        return routing.get("features", "token")


def _common_config(out: dict, spec) -> dict:
    if spec.min_weight and spec.top_k > 1:
        out["min_weight"] = float(spec.min_weight)
    if spec.preset:
        out["preset"] = spec.preset
    return out


register_kind(LinearKind())


def _shares(routers, fit, held, num_experts: int) -> dict | None:
    """Estimated routing shares on the held-out statistics (fit ones when there are none):
    ``core.shares``, recorded in the manifest as ``routing.shares``."""
    from dume_dist.core.select import class_grams
    from dume_dist.core.shares import routing_shares

    if num_experts < 2:
        return None
    out = routing_shares(routers, class_grams(held or fit, num_experts))
    out["statistics"] = "held-out" if held else "fit"
    return out
