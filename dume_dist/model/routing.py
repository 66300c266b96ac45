"""Routing options: what the routers see, how they are solved, and how λ / β are chosen.

A ``RoutingSpec`` is everything a build needs to know about routing:

* ``features``: the router's feature map (``token``: the MLP input, the paper; ``prefix_mean``:
  ``[x_t, mean of x over the sequence's real tokens so far]``). The formula lives in
  ``modeling_dume.causal_features``, shared by statistics and inference.
* ``solver``: ``ridge`` (the paper) or ``lda`` (see ``dume_dist.core.solve``).
* ``lam``: ridge λ or lda shrinkage, a number or ``"auto"`` (chosen from held-out statistics).
* ``smoothing``: decay β of the causal moving average of router logits (0 off, 1 running mean),
  a number or ``"auto"`` (chosen from held-out statistics on ``smoothing_grid``).
* ``top_k``, and ``holdout_fraction``: the share of each contributor's documents kept out of the
  fit statistics for choosing the ``"auto"`` settings (needed when any is ``"auto"``).

Statistics identity (``RouterStats.feature_map``): the feature map's name for fit statistics, and
``"<features>+ema:<β>"`` for held-out Grams of features smoothed with decay β > 0. Statistics of
different identities never mix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from dume_dist.core.ngram import (
    DEFAULT_ALPHA,
    DEFAULT_BUCKETS,
    NgramTables,
    ngram_feature_map,
    ngram_tables,
)
from dume_dist.core.private import lam_floor
from dume_dist.core.select import DEFAULT_LAM_GRID, Selection, select_routing
from dume_dist.core.solve import SOLVERS, Router, solve_routers
from dume_dist.core.stats import RouterStats
from dume_dist.model.modeling_dume import ROUTING_FEATURES, routing_feature_dim
from dume_dist.model.ngram_select import DEFAULT_MU_GRID, select_mu, select_switch

AUTO = "auto"
DEFAULT_SMOOTHING_GRID = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 1.0)
DEFAULT_HOLDOUT_FRACTION = 0.1

Contributions = Mapping[str, tuple[int, RouterStats]]


ROUTING_SOLVERS = (*SOLVERS, "nb")


def feature_map_name(
    features: str, smoothing: float = 0.0, buckets: int = DEFAULT_BUCKETS, heldout: bool = False
) -> str:
    """Identity of statistics computed on ``features`` smoothed with decay ``smoothing`` (for
    ``ngram``: counts in ``buckets`` buckets; ``heldout`` ones carry the exact bigrams)."""
    if features not in ROUTING_FEATURES:
        raise ValueError(f"features must be one of {ROUTING_FEATURES}, got {features!r}")
    if features == "ngram":
        return ngram_feature_map(buckets, pairs=heldout)
    smoothing = float(smoothing)
    return features if smoothing == 0.0 else f"{features}+ema:{smoothing!r}"


@dataclass(frozen=True)
class RoutingSpec:
    features: str = "token"
    solver: str = "ridge"
    lam: float | str = 1e-2
    smoothing: float | str = 0.0
    top_k: int = 1
    holdout_fraction: float = 0.0
    smoothing_grid: tuple[float, ...] = DEFAULT_SMOOTHING_GRID
    lam_grid: tuple[float, ...] | None = None
    preset: str | None = None
    ngram_buckets: int = DEFAULT_BUCKETS
    ngram_alpha: float = DEFAULT_ALPHA
    min_weight: float = 0.0
    switch: float | str = 0.0

    def __post_init__(self):
        if self.features not in ROUTING_FEATURES:
            raise ValueError(f"features must be one of {ROUTING_FEATURES}, got {self.features!r}")
        if self.solver not in ROUTING_SOLVERS:
            raise ValueError(f"solver must be one of {ROUTING_SOLVERS}, got {self.solver!r}")
        if (self.features == "ngram") != (self.solver == "nb"):
            raise ValueError("the 'nb' solver goes with 'ngram' features, and only with them")
        if self.features == "ngram":
            if self.smoothing not in (0, 0.0):
                raise ValueError("ngram routing is cumulative already: smoothing must be 0")
            b = self.ngram_buckets
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"ngram_buckets must be a positive integer, got {b!r}")
            if not (isinstance(self.ngram_alpha, (int, float)) and self.ngram_alpha > 0):
                raise ValueError(f"ngram_alpha must be > 0, got {self.ngram_alpha!r}")
        _check_setting("lam", self.lam, lambda v: v > 0 and (self.solver != "lda" or v <= 1))
        _check_setting("smoothing", self.smoothing, lambda v: 0 <= v <= 1)
        _check_setting("switch", self.switch, lambda v: 0 <= v < 0.5)
        if self.features != "ngram" and self.switch not in (0, 0.0):
            raise ValueError(
                "switch (the switch rate of the n-gram posterior) needs ngram features"
            )
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        mw = self.min_weight
        if isinstance(mw, bool) or not isinstance(mw, (int, float)) or not 0 <= mw < 0.5:
            raise ValueError(f"min_weight must be in [0, 0.5), got {mw!r}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.needs_holdout and self.holdout_fraction == 0:
            raise ValueError("lam or smoothing 'auto' needs a holdout_fraction > 0")
        grid = tuple(float(b) for b in self.smoothing_grid)
        if not grid or any(not 0 <= b <= 1 for b in grid):
            raise ValueError(f"smoothing_grid must be values in [0, 1], got {self.smoothing_grid}")
        object.__setattr__(self, "smoothing_grid", grid)

    @property
    def needs_holdout(self) -> bool:
        return AUTO in (self.lam, self.smoothing, self.switch)

    @property
    def feature_map(self) -> str:
        """Identity of this spec's fit statistics."""
        return feature_map_name(self.features, buckets=self.ngram_buckets)

    def holdout_feature_map(self, smoothing: float) -> str:
        """Identity of this spec's held-out statistics for decay ``smoothing``."""
        return feature_map_name(self.features, smoothing, self.ngram_buckets, heldout=True)

    def feature_dim(self, hidden_size: int) -> int:
        return routing_feature_dim(self.features, hidden_size)

    def holdout_smoothings(self) -> tuple[float, ...]:
        """Decays whose held-out Grams a contributor computes (none when nothing is 'auto')."""
        if not self.needs_holdout:
            return ()
        if self.smoothing == AUTO:
            return tuple(sorted(set(self.smoothing_grid) | {0.0}))
        return (float(self.smoothing),)

    def replace(self, **changes) -> RoutingSpec:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["smoothing_grid"] = list(self.smoothing_grid)
        out["lam_grid"] = None if self.lam_grid is None else list(self.lam_grid)
        return out


def _check_setting(key: str, value, ok) -> None:
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise ValueError(f"{key} has a bad value {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{key} must be finite, got {value!r}")


# Named settings. `paper` is the paper's exact routing; `context` the best on the measurements
# (docs/routing.md: better than `paper` on every shipped domain) and the default of a build.
# Smoothing is not in `context`: on prefix-mean features the held-out choice was always β = 0.
PRESETS: dict[str, RoutingSpec] = {
    "paper": RoutingSpec(preset="paper"),
    "context": RoutingSpec(
        features="prefix_mean",
        solver="lda",
        lam=AUTO,
        holdout_fraction=DEFAULT_HOLDOUT_FRACTION,
        preset="context",
    ),
    # k = 2 with weights below 0.05 dropped: the second expert runs only where the sequence's
    # domain is still uncertain (about 1% of tokens on the shipped experts, docs/routing.md).
    "ngram": RoutingSpec(
        features="ngram",
        solver="nb",
        lam=AUTO,
        top_k=2,
        min_weight=0.05,
        holdout_fraction=DEFAULT_HOLDOUT_FRACTION,
        preset="ngram",
    ),
    # `ngram` whose posterior lets the domain switch before any token (rate chosen on held-out
    # bigrams): routing follows text whose domain changes (docs/routing.md, mixed-domain text).
    "switch": RoutingSpec(
        features="ngram",
        solver="nb",
        lam=AUTO,
        top_k=2,
        min_weight=0.05,
        holdout_fraction=DEFAULT_HOLDOUT_FRACTION,
        switch=AUTO,
        preset="switch",
    ),
}
DEFAULT_PRESET = "ngram"


def resolve_routing(routing: str | RoutingSpec | Mapping | None = None, **overrides) -> RoutingSpec:
    """A spec from a preset name, a spec or a dict of fields, with ``overrides`` (None ignored).

    Overriding ``lam`` or ``smoothing`` with ``"auto"`` turns on the default holdout fraction
    unless one is given."""
    if routing is None:
        routing = DEFAULT_PRESET
    if isinstance(routing, str):
        if routing not in PRESETS:
            raise ValueError(f"routing preset must be one of {sorted(PRESETS)}, got {routing!r}")
        spec = PRESETS[routing]
    elif isinstance(routing, RoutingSpec):
        spec = routing
    elif isinstance(routing, Mapping):
        unknown = set(routing) - {f.name for f in dataclasses.fields(RoutingSpec)}
        if unknown:
            raise ValueError(f"unknown routing option {sorted(unknown)[0]!r}")
        spec = RoutingSpec(**routing)
    else:
        raise ValueError(f"routing must be a preset name, a RoutingSpec or a dict, got {routing!r}")
    changes = {k: v for k, v in overrides.items() if v is not None and v != getattr(spec, k)}
    if not changes:
        return spec
    features = changes.get("features", spec.features)
    if "solver" not in changes and (features == "ngram") != (spec.solver == "nb"):
        changes["solver"] = "nb" if features == "ngram" else "lda"  # the solver of those features
    if changes.get("solver", spec.solver) != spec.solver and "lam" not in changes:
        changes["lam"] = AUTO  # λ means something else for another solver: choose it
    settings = ("lam", "smoothing", "switch")
    if AUTO in [changes.get(k, getattr(spec, k)) for k in settings]:
        if "holdout_fraction" not in changes and spec.holdout_fraction == 0:
            changes["holdout_fraction"] = DEFAULT_HOLDOUT_FRACTION
    changes.setdefault("preset", None)  # no longer the named setting
    return spec.replace(**changes)


@dataclass(frozen=True)
class SolvedRouting:
    """Routers of a build, the settings they were solved with, and how those were chosen."""

    routers: list[Router] | NgramTables  # per-layer linear routers, or the n-gram router
    spec: RoutingSpec
    lam: float
    smoothing: float
    selection: Selection | None
    switch: float = 0.0
    switch_selection: Selection | None = None

    def config_routing(self) -> dict:
        """``DumeConfig.routing`` of the model (what inference reads, and how it was solved)."""
        out = {"features": self.spec.features, "solver": self.spec.solver, "lam": self.lam}
        if self.smoothing:
            out["smoothing"] = self.smoothing
        if isinstance(self.routers, NgramTables):
            out["ngram"] = self.routers.config()
            if self.switch > 0:
                out["ngram"]["switch"] = self.switch
        if self.spec.min_weight and self.spec.top_k > 1:
            out["min_weight"] = float(self.spec.min_weight)
        if self.spec.preset:
            out["preset"] = self.spec.preset
        return out

    def checkpoint_tensors(self) -> dict:
        """``{checkpoint name: tensor}`` of the routers (fp32), what a DUME checkpoint holds."""
        if isinstance(self.routers, NgramTables):
            return {
                "ngram_router.bigram_counts": self.routers.bigram_EH.float(),
                "ngram_router.context_counts": self.routers.context_EV.float(),
                "ngram_router.unigram_counts": self.routers.unigram_EV.float(),
            }
        out = {}
        for layer, router in enumerate(self.routers):
            out[f"model.layers.{layer}.mlp.router.weight"] = router.weight_EF.float()
            out[f"model.layers.{layer}.mlp.router.bias"] = router.bias_E.float()
        return out

    def bias_free_unsupported(self) -> str | None:
        """Why these routers have no bias-free linear form on the MLP input (what a router
        without intercept, Mixtral's gate, can hold); None when they have one."""
        if isinstance(self.routers, NgramTables) or self.spec.features != "token":
            return (
                f"routing features {self.spec.features!r}: a gate without intercept reads the "
                "MLP input, only 'token' features"
            )
        if self.smoothing or self.spec.solver != "ridge":
            return (
                f"routing with smoothing or a non-ridge solver (smoothing={self.smoothing}, "
                f"solver={self.spec.solver!r}); the gate is a plain linear map of the MLP input"
            )
        return None

    def bias_free_routers(self, fit: Contributions, num_experts: int) -> list[Router]:
        """Per layer the ridge router without intercept solved from the fit statistics with this
        routing's λ (unit-norm rows, temperature not applied)."""
        reason = self.bias_free_unsupported()
        if reason:
            raise ValueError(reason)
        return solve_routers(fit, num_experts, lam=self.lam, bias=False)

    def manifest_routing(self) -> dict:
        """The manifest's record: the spec as asked, the values used, and the held-out curves."""
        return {
            "spec": self.spec.to_json(),
            "features": self.spec.features,
            "solver": self.spec.solver,
            "lam": self.lam,
            "smoothing": self.smoothing,
            "top_k": self.spec.top_k,
            "feature_map": self.spec.feature_map,
            "selection": None if self.selection is None else self.selection.to_json(),
            "switch": self.switch,
            "switch_selection": None
            if self.switch_selection is None
            else self.switch_selection.to_json(),
        }


def _solve_ngram(spec, fit, num_experts, holdout) -> SolvedRouting:
    selection, mu = None, spec.lam
    if mu == AUTO:
        grid = spec.lam_grid or DEFAULT_MU_GRID
        selection = select_mu(fit, holdout[0.0], num_experts, grid, spec.ngram_alpha)
        mu = selection.lam
    tables = ngram_tables(fit, num_experts, float(mu), spec.ngram_alpha)
    switch, switch_selection = spec.switch, None
    if switch == AUTO:
        switch_selection = select_switch(tables, holdout[0.0], num_experts)
        switch = switch_selection.lam
    return SolvedRouting(tables, spec, float(mu), 0.0, selection, float(switch), switch_selection)


def check_contributions(contributions: Contributions, feature_map: str, what: str) -> None:
    """Every statistic must carry ``feature_map``: a one-line error names the first that does not."""
    for name in sorted(contributions):
        got = contributions[name][1].feature_map
        if got != feature_map:
            raise ValueError(
                f"{what} statistics of {name!r} are of feature map {got!r}, expected {feature_map!r}"
                " (statistics of different feature maps cannot be mixed)"
            )


def solve_routing(
    spec: RoutingSpec,
    fit: Contributions,
    num_experts: int,
    holdout: Mapping[float, Contributions] | None = None,
) -> SolvedRouting:
    """Routers for ``spec`` from fit statistics ``{name: (expert, stats)}`` and, for ``"auto"``
    settings, held-out statistics ``{β: {name: (expert, stats)}}`` (see
    ``RoutingSpec.holdout_smoothings``). The routers are solved on the fit statistics only."""
    check_contributions(fit, spec.feature_map, "fit")
    betas = spec.holdout_smoothings()
    holdout = dict(holdout or {})
    missing = [b for b in betas if b not in holdout]
    if missing:
        raise ValueError(f"held-out statistics for smoothing {missing[0]} are missing")
    for beta in betas:
        check_contributions(holdout[beta], spec.holdout_feature_map(beta), "held-out")
    if spec.features == "ngram":
        return _solve_ngram(spec, fit, num_experts, holdout)
    selection = None
    lam, smoothing = spec.lam, spec.smoothing
    floor = lam_floor(fit, num_experts, spec.solver)  # noise of private contributions
    if floor and lam != AUTO:
        lam = max(float(lam), floor)
    if spec.needs_holdout:
        lam_grid = (spec.lam_grid or DEFAULT_LAM_GRID[spec.solver]) if lam == AUTO else (lam,)
        if floor:
            lam_grid = [floor] + [x for x in lam_grid if x > floor]
        selection = select_routing(
            fit, {b: holdout[b] for b in betas}, num_experts, solver=spec.solver, lam_grid=lam_grid
        )
        lam = selection.lam if lam == AUTO else float(lam)
        smoothing = selection.smoothing if smoothing == AUTO else float(smoothing)
    routers = solve_routers(fit, num_experts, lam=float(lam), solver=spec.solver)
    return SolvedRouting(routers, spec, float(lam), float(smoothing), selection)
