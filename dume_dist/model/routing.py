"""Routing of a build: which router kind, with which options, solved how.

A ``RoutingSpec`` is everything a build needs to know about routing: the router ``kind``
(``dume_dist.model.kinds``), the kind's options (declared once in ``routing_options``; e.g. the
``linear`` kind's ``features``, ``solver``, ``ridge_lambda``, ``lda_shrinkage``, ``smoothing``,
the ``ngram`` kind's ``ngram_buckets``, ``mu``), and the options every kind has: ``top_k``,
``min_weight`` and ``holdout_fraction`` (the share of each contributor's documents kept out of
the fit statistics to choose ``"auto"`` settings). Settings written by earlier versions (no
``kind``; ``lam`` for ridge λ, lda shrinkage or n-gram μ alike) still parse: the kind that claims
them translates them.

``solve_routing`` checks every contribution's statistics identity and hands the solve to the
kind; ``SolvedRouting`` carries the kind's routers and what the config and manifest record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dume_dist.model.kinds import RouterKind, get_kind, kind_of_named, kinds
from dume_dist.model.routing_options import (
    AUTO,
    COMMON_OPTIONS,
    DEFAULT_HOLDOUT_FRACTION,
    DEFAULT_PRESET,
    DEFAULT_SMOOTHING_GRID,
    ROUTING_SOLVERS,
    options_by_name,
)
from dume_dist.model.routing_options import PRESETS as PRESET_SETTINGS

__all__ = [
    "AUTO", "DEFAULT_HOLDOUT_FRACTION", "DEFAULT_PRESET", "DEFAULT_SMOOTHING_GRID", "PRESETS",
    "ROUTING_SOLVERS", "RoutingSpec", "SolvedRouting", "feature_map_name", "resolve_routing",
    "solve_routing",
]  # fmt: skip

Contributions = Mapping[str, tuple[int, object]]
_COMMON = options_by_name(COMMON_OPTIONS)


_LEGACY_FIELDS = ("features", "solver", "lam", "smoothing", "top_k", "holdout_fraction",
                  "smoothing_grid", "lam_grid", "preset", "ngram_buckets", "ngram_alpha",
                  "min_weight")  # fmt: skip


class RoutingSpec:
    """A router kind and its options (immutable; compares by value). Construct with the kind's
    option names, or with the names of earlier versions (``features``, ``solver``, ``lam``)."""

    __slots__ = ("kind", "options", "top_k", "min_weight", "holdout_fraction", "preset")

    def __init__(self, *args, preset: str | None = None, kind: str | None = None, **named):
        if len(args) == 1 and args[0] in kinds() and kind is None:
            kind = args[0]
        elif args:  # earlier versions: the fields of a dataclass, in their order
            named.update(zip(_LEGACY_FIELDS, args))
            preset = named.pop("preset", preset)
        common = {k: _COMMON[k].check(named.pop(k, _COMMON[k].default)) for k in _COMMON}
        router_kind = get_kind(kind) if kind else kind_of_named(named)
        named = router_kind.from_named(dict(named))
        declared = options_by_name(router_kind.options)
        for name, default in _foreign_defaults(router_kind).items():
            earlier = (default, *_EARLIER_DEFAULTS.get(name, ()))
            if name not in declared and named.get(name, default) in earlier:
                named.pop(name, None)  # earlier versions stored every kind's options
        unknown = sorted(set(named) - set(declared))
        if unknown:
            owner = [k.name for k in kinds().values() if unknown[0] in options_by_name(k.options)]
            if owner:
                raise ValueError(
                    f"routing option {unknown[0]!r} is the {owner[0]} kind's: it needs "
                    f"{owner[0]} features, not kind {router_kind.name!r}"
                )
            raise ValueError(f"unknown routing option {unknown[0]!r} for kind {router_kind.name!r}")
        options = {n: o.check(named[n] if n in named else o.default) for n, o in declared.items()}
        for key, value in (("kind", router_kind.name), ("options", options), ("preset", preset),
                           *common.items()):  # fmt: skip
            object.__setattr__(self, key, value)
        if self.needs_holdout and self.holdout_fraction == 0:
            names = " or ".join(n for n, v in options.items() if v == AUTO)
            raise ValueError(f"{names} 'auto' needs a holdout_fraction > 0")
        router_kind.check(self)

    def __setattr__(self, key, value):
        raise AttributeError("RoutingSpec is immutable: use replace()")

    def __getattr__(self, name):
        """The kind's options, and their older names (``features``, ``lam``, ...)."""
        if name.startswith("_") or name in RoutingSpec.__slots__:
            raise AttributeError(name)
        options = object.__getattribute__(self, "options")
        if name in options:
            return options[name]
        legacy = self.router_kind.legacy_view(options)
        if name in legacy:
            return legacy[name]
        raise AttributeError(f"routing kind {self.kind!r} has no option {name!r}")

    @property
    def router_kind(self) -> RouterKind:
        return get_kind(self.kind)

    @property
    def needs_holdout(self) -> bool:
        return AUTO in self.options.values()

    @property
    def feature_map(self) -> str:
        """Identity of this spec's fit statistics."""
        return self.router_kind.identity(self)

    def holdout_feature_map(self, part: float) -> str:
        """Identity of this spec's held-out statistics of part ``part``."""
        return self.router_kind.identity(self, float(part))

    def holdout_smoothings(self) -> tuple[float, ...]:
        """Keys of the held-out statistics a contributor computes (none when nothing is auto)."""
        return self.router_kind.holdout_parts(self)

    def named(self) -> dict:
        """Every setting by its name: ``kind``, the common options, the kind's options."""
        common = {k: getattr(self, k) for k in _COMMON}
        return {"kind": self.kind, **common, **self.options, "preset": self.preset}

    def replace(self, **changes) -> RoutingSpec:
        """The same kind with ``changes`` (its options, older names, or common options)."""
        changes = dict(changes)
        preset = changes.pop("preset", self.preset)
        common = {k: changes.pop(k, getattr(self, k)) for k in _COMMON}
        options = {**self.options, **self.router_kind.from_named(changes, self.options)}
        return RoutingSpec(self.kind, preset=preset, **common, **options)

    def to_json(self) -> dict:
        """Every setting, and the older names of the kind's settings (for earlier readers)."""
        out = {**self.named(), **self.router_kind.legacy_view(self.options)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def __eq__(self, other) -> bool:
        return isinstance(other, RoutingSpec) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.to_json().items())))

    def __repr__(self) -> str:
        return f"RoutingSpec({', '.join(f'{k}={v!r}' for k, v in self.named().items())})"


# Defaults of earlier versions, which stored them on every routing (n-gram buckets: 2^18 until
# the default became 2^22).
_EARLIER_DEFAULTS = {"ngram_buckets": (1 << 18,)}


def _foreign_defaults(kind: RouterKind) -> dict:
    return {o.name: o.default for k in kinds().values() if k is not kind for o in k.options}


def feature_map_name(features: str, smoothing: float = 0.0, buckets: int | None = None,
                     heldout: bool = False) -> str:  # fmt: skip
    """Identity of statistics of the kind that takes ``features`` (older name), smoothed with
    decay ``smoothing`` (held-out part), or ``heldout`` (n-gram counts with their bigrams)."""
    named = {"features": features}
    if buckets is not None:
        named["ngram_buckets"] = buckets
    spec = RoutingSpec(**named)
    part = float(smoothing) if (heldout or smoothing) else None
    return spec.router_kind.identity(spec, part)


PRESETS: dict[str, RoutingSpec] = {
    name: RoutingSpec(**settings, preset=name) for name, settings in PRESET_SETTINGS.items()
}


def _spec_from(routing) -> RoutingSpec:
    if routing is None:
        routing = DEFAULT_PRESET
    if isinstance(routing, str):
        if routing not in PRESETS:
            raise ValueError(f"routing preset must be one of {sorted(PRESETS)}, got {routing!r}")
        return PRESETS[routing]
    if isinstance(routing, RoutingSpec):
        return routing
    if isinstance(routing, Mapping):
        fields = dict(routing)
        return RoutingSpec(
            kind=fields.pop("kind", None), preset=fields.pop("preset", None), **fields
        )
    raise ValueError(f"routing must be a preset name, a RoutingSpec or a dict, got {routing!r}")


def resolve_routing(routing: str | RoutingSpec | Mapping | None = None, **overrides) -> RoutingSpec:
    """A spec from a preset name (None: ``DEFAULT_PRESET``), a spec or a dict of settings, with
    ``overrides`` (None ignored). An override that names another kind (``kind``, or an older
    name such as ``features="ngram"``) starts from that kind's defaults. A solver parameter that
    changes meaning (another solver) and is not given becomes ``"auto"``; ``"auto"`` turns on
    the default holdout fraction unless one is given."""
    spec = _spec_from(routing)
    changes = {k: v for k, v in overrides.items() if v is not None}
    kind = get_kind(changes.pop("kind")) if "kind" in changes else None
    if kind is None and any(k.claims(changes) for k in kinds().values()):
        kind = kind_of_named(changes)
    kind = kind or spec.router_kind
    changes = {k: v for k, v in changes.items() if _differs(spec, k, v) or kind.name != spec.kind}
    if kind.name == spec.kind and not changes:
        return spec
    common = {k: changes.pop(k, getattr(spec, k)) for k in _COMMON}
    options = dict(spec.options) if kind.name == spec.kind else {}
    given = kind.from_named(dict(changes), options)
    before = spec.router_kind.selected_option(spec.options)
    options.update(given)
    after = kind.selected_option({**_defaults(kind), **options})
    if after is not None and after != before and after not in given:
        options[after] = AUTO  # it means something else now: choose it
    if AUTO in options.values() and common["holdout_fraction"] == 0:
        if overrides.get("holdout_fraction") is None:
            common["holdout_fraction"] = DEFAULT_HOLDOUT_FRACTION
    return RoutingSpec(kind.name, **common, **options)


def _differs(spec: RoutingSpec, key: str, value) -> bool:
    try:
        return getattr(spec, key) != value
    except AttributeError:
        return True


def _defaults(kind: RouterKind) -> dict:
    return {o.name: o.default for o in kind.options}


@dataclass(frozen=True)
class SolvedRouting:
    """Routers of a build (the kind's own type), the spec, the chosen values, the selection."""

    routers: object
    spec: RoutingSpec
    lam: float  # the value of the kind's selected parameter (older name)
    smoothing: float
    selection: object | None
    chosen: Mapping | None = None  # {option name: value used} of the kind's chosen options
    extras: Mapping | None = None  # more the kind records (read as attributes: ``switch``, ...)

    def __getattr__(self, name):
        extras = self.__dict__.get("extras") or {}
        if name in extras:
            return extras[name]
        raise AttributeError(name)

    def config_routing(self) -> dict:
        """``DumeConfig.routing`` of the model (what inference reads, and how it was solved)."""
        return self.spec.router_kind.config_routing(self)

    def checkpoint_tensors(self) -> dict:
        """``{checkpoint name: tensor}`` of the routers (fp32), what a DUME checkpoint holds."""
        num_layers = len(self.routers) if isinstance(self.routers, list) else 0
        tensors = self.spec.router_kind.checkpoint_tensors(self.routers, num_layers)
        return {name: tensor for _, name, tensor in tensors}

    def bias_free_unsupported(self) -> str | None:
        """Why these routers have no bias-free linear form on the MLP input (what a router
        without intercept, Mixtral's gate, can hold); None when they have one."""
        return self.spec.router_kind.bias_free_unsupported(self)

    def bias_free_routers(self, fit: Contributions, num_experts: int):
        """Per layer the router without intercept solved from the fit statistics with this
        routing's parameter (unit-norm rows, temperature not applied)."""
        return self.spec.router_kind.bias_free_routers(self, fit, num_experts)

    def manifest_routing(self) -> dict:
        """The manifest's record: the spec as asked, the values used, and the held-out curves."""
        return {
            "spec": self.spec.to_json(),
            "kind": self.spec.kind,
            **self.spec.router_kind.legacy_view(self.spec.options),
            "lam": self.lam,
            "smoothing": self.smoothing,
            "top_k": self.spec.top_k,
            "feature_map": self.spec.feature_map,
            **self.spec.router_kind.manifest_routing(self),
            "selection": None if self.selection is None else self.selection.to_json(),
            **({"shares": self.extras["shares"]} if (self.extras or {}).get("shares") else {}),
        }


def check_contributions(contributions: Contributions, feature_map: str, what: str) -> None:
    """Every statistic must carry ``feature_map``: a one-line error names the first that does not."""
    for name in sorted(contributions):
        got = getattr(contributions[name][1], "feature_map", type(contributions[name][1]).__name__)
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
    settings, held-out statistics ``{part: {name: (expert, stats)}}`` (see
    ``RoutingSpec.holdout_smoothings``). Linear routers are solved on the fit statistics only;
    n-gram tables count the held-out part too once it has chosen (``kinds.ngram``)."""
    check_contributions(fit, spec.feature_map, "fit")
    parts = spec.holdout_smoothings()
    holdout = dict(holdout or {})
    missing = [b for b in parts if b not in holdout]
    if missing:
        raise ValueError(f"held-out statistics for smoothing {missing[0]} are missing")
    for part in parts:
        check_contributions(holdout[part], spec.holdout_feature_map(part), "held-out")
    return spec.router_kind.solve(spec, fit, num_experts, {p: holdout[p] for p in parts})


def routing_warnings(manifest: Mapping) -> list[str]:
    """What a checkpoint's manifest says its routing loses (one line each): n-gram tables whose
    buckets are too full for their text (``core.ngram.fill_warnings``)."""
    from dume_dist.core.ngram import buckets_of, fill_warnings

    routing = manifest.get("routing") or {}
    fill, buckets = routing.get("bucket_fill"), buckets_of(routing.get("feature_map", ""))
    if not fill or buckets is None:
        return []
    experts = sorted(manifest.get("experts") or [], key=lambda e: e.get("index", 0))
    return fill_warnings(fill, [e.get("name", "?") for e in experts], buckets)
