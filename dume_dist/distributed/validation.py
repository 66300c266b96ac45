"""What the coordinator accepts: settings at genesis, and every field of a node's submission.

Everything a contributor sends is checked here before anything is written: names, sizes and
types of the request fields, then the statistics (identity, shapes, fingerprints, token claim)
and their held-out companions. A refusal is a one-line ``ValueError``.
"""

from __future__ import annotations

from dume_dist.core.header import check_layout, parse_header
from dume_dist.distributed.artifacts import ROUTING_KEYS, SETTINGS_KEYS, routing_of
from dume_dist.distributed.state import NodeRecord, Registry

MAX_FIELD_CHARS = 256  # submission ids, reasons, fingerprints: short strings only


def check_text(what: str, value, max_chars: int = MAX_FIELD_CHARS) -> str:
    """A short, single-line string field of a request."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value or len(value) > max_chars or not value.isprintable():
        raise ValueError(f"{what} must be 1-{max_chars} printable characters on one line")
    return value


def check_public_key(key) -> str:
    """A base64 Ed25519 public key (32 bytes)."""
    import base64

    try:
        if isinstance(key, str) and len(key) <= 64 and len(base64.b64decode(key, validate=True)) == 32:  # fmt: skip
            return key
    except ValueError:
        pass
    raise ValueError("public_key must be a base64 Ed25519 public key (32 bytes)")


def check_credential_hash(value) -> str:
    if (
        not isinstance(value, str)
        or not value.startswith("scrypt$")
        or len(value) > MAX_FIELD_CHARS
    ):
        raise ValueError("credential_hash must be a hash made by hash_secret")
    return value


def check_mlp_header(mlp, mlp_layout: dict) -> None:
    """An expert upload has exactly the backbone's MLP tensors (names, dtypes, shapes), read
    from its safetensors header before any tensor is."""
    if not isinstance(mlp, (bytes, bytearray)):
        raise ValueError(f"expert MLP weights must be bytes, got {type(mlp).__name__}")
    _, entries = parse_header(mlp, "expert MLP blob")
    layout = {name: (dtype, tuple(shape)) for name, (dtype, shape) in mlp_layout.items()}
    check_layout("expert MLP blob", entries, layout)


def check_count(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {type(value).__name__}")
    return value


def parse_stats(stats):
    """Statistics of any router kind, from bytes (decoded and validated) or as they are."""
    from dume_dist.model.kinds import kind_of_stats, stats_from_bytes

    try:
        if isinstance(stats, (bytes, bytearray)):
            return stats_from_bytes(bytes(stats))
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"statistics blob is malformed: {exc!r}") from None
    try:
        kind_of_stats(stats)
    except ValueError:
        raise ValueError(
            f"statistics must be bytes or a router kind's statistics, got {type(stats).__name__}"
        ) from None
    return stats


def stats_bytes(stats, parsed) -> bytes:
    from dume_dist.model.kinds import stats_to_bytes

    return bytes(stats) if isinstance(stats, (bytes, bytearray)) else stats_to_bytes(parsed)


# -- settings ------------------------------------------------------------------------------------


def _setting(key: str, value):
    """A routing setting as given (YAML / CLI strings of numbers become numbers)."""
    from dume_dist.model.kinds import kinds
    from dume_dist.model.routing_options import COMMON_OPTIONS

    if not isinstance(value, str):
        return value
    options = {o.name: o for k in kinds().values() for o in k.options}
    options.update({o.name: o for o in COMMON_OPTIONS})
    option = options.get(key)
    if key == "lam" or (option is not None and option.type in ("float", "int")):
        try:
            return "auto" if value.strip().lower() == "auto" else float(value)
        except ValueError:
            raise ValueError(f"{key} must be a number or 'auto', got {value!r}") from None
    return value


def check_settings(settings: dict) -> dict:
    """The registry's settings from what genesis was given: the routing (a ``routing`` preset
    name or dict of `RoutingSpec` settings, default ``DEFAULT_PRESET``, with any routing option
    on top: ``artifacts.ROUTING_KEYS``), ``temperature`` and ``max_tokens_per_seq``. Stored: the
    resolved spec (``routing``, its JSON), its ``feature_map``, and ``lam`` / ``top_k`` (as the
    spec has them) for readers of older registries. Every routing option is checked by its one
    definition (``dume_dist.model.routing_options``)."""
    from dume_dist.model.routing import resolve_routing

    if not isinstance(settings, dict):
        raise ValueError(f"settings must be a dict, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        raise ValueError(f"unknown coordinator setting {unknown[0]!r}")
    overrides = {
        k: _setting(k, settings[k]) for k in ROUTING_KEYS if k != "routing" and k in settings
    }
    try:
        temperature = float(settings.get("temperature", 1.0))
        max_tps = settings.get("max_tokens_per_seq", 1024)
        spec = resolve_routing(settings.get("routing"), **overrides)
    except TypeError as exc:
        raise ValueError(f"bad coordinator settings: {exc}") from None
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(max_tps, bool) or not isinstance(max_tps, int) or max_tps < 1:
        raise ValueError(f"max_tokens_per_seq must be a positive integer, got {max_tps!r}")
    given_map = settings.get("feature_map")
    if given_map is not None and given_map != spec.feature_map:
        raise ValueError(
            f"feature_map {given_map!r} does not match the routing's {spec.feature_map!r}"
        )
    return {
        "lam": spec.to_json().get("lam"),  # the older name of the solver's parameter, if any
        "temperature": temperature,
        "top_k": spec.top_k,
        "max_tokens_per_seq": max_tps,
        "feature_map": spec.feature_map,
        "routing": spec.to_json(),
    }


# -- statistics ----------------------------------------------------------------------------------


class StatsValidator:
    """Checks a submission against one registry. ``vocab_size`` and ``feature_bound`` are the
    backbone's (callables: they may need the backbone's files): its vocabulary size, and per
    layer the largest ``|x|²`` of one token's MLP input (`model.feature_bounds`; None: unknown)."""

    def __init__(self, reg: Registry, vocab_size, feature_bound=lambda: None):
        self.reg = reg
        self.spec = routing_of(reg.settings)
        self._vocab_size = vocab_size
        self._feature_bound = feature_bound

    def _shape(self):
        from dume_dist.model.kinds import BackboneShape

        backbone = self.reg.backbone
        return BackboneShape(backbone["num_layers"], backbone["feature_dim"], self._vocab_size,
                             self._feature_bound)  # fmt: skip

    def _check_header(self, data: bytes) -> None:
        """Names, dtypes and shapes from the safetensors header, before any tensor is read."""
        _, entries = parse_header(data, "statistics blob")
        layout, optional = self.spec.router_kind.layout(self.spec, self._shape())
        check_layout("statistics blob", entries, layout, optional=optional)

    def _check_kind(self, parsed) -> None:
        from dume_dist.model.kinds import kind_of_stats

        kind, shape = self.spec.router_kind, self._shape()
        if type(parsed) is not kind.stats_type:
            raise ValueError(
                f"statistics are {kind_of_stats(parsed).stats_label} of feature map "
                f"{parsed.feature_map!r}; the coordinator's {kind.name} routing needs "
                f"{kind.stats_label}"
            )
        kind.validate(parsed, self.spec, shape)
        kind.check_values(parsed, self.spec, shape)

    def stats(self, node: NodeRecord, name: str, stats, num_tokens, feature_map: str):
        backbone = self.reg.backbone
        if isinstance(stats, (bytes, bytearray)):
            self._check_header(stats)
        parsed = parse_stats(stats)
        self._check_kind(parsed)
        if parsed.feature_map != feature_map:
            raise ValueError(
                f"statistics use feature map {parsed.feature_map!r}, the model {feature_map!r}"
            )
        if parsed.backbone_fingerprint != backbone["fingerprint"]:
            raise ValueError(
                f"statistics were computed on backbone {parsed.backbone_fingerprint[:12] or '(none)'}, "
                f"the model's is {backbone['fingerprint'][:12]}: recompute them"
            )
        if node.expert is None:
            raise ValueError(
                f"node {name!r} has no expert registered: upload its MLP weights first"
            )
        if parsed.expert_fingerprint != node.expert.fingerprint:
            raise ValueError(
                f"statistics were computed with expert {parsed.expert_fingerprint[:12] or '(none)'}, "
                f"node {name!r} registered {node.expert.fingerprint[:12]}: recompute them"
            )
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens != parsed.num_tokens:  # fmt: skip
            raise ValueError(
                f"submission claims {str(num_tokens)[:40]} tokens, its statistics count {parsed.num_tokens}"
            )
        return parsed

    def holdout(self, node: NodeRecord, name: str, fit, holdout) -> dict[float, tuple[object, bytes]]:  # fmt: skip
        """``{β: (statistics, bytes)}`` of a submission's held-out statistics, each checked like
        fit statistics (identity ``spec.holdout_feature_map(part)``); exactly the parts the
        routing needs."""
        spec = self.spec
        needed = spec.holdout_smoothings()
        given = _holdout_by_decay(holdout)
        missing = [b for b in needed if b not in given]
        if missing:
            raise ValueError(
                f"the coordinator's routing ({spec.kind}, "
                f"{', '.join(f'{k}={v}' for k, v in spec.options.items() if v == 'auto')}) "
                "needs held-out statistics for smoothing "
                f"{', '.join(map(str, needed))}; the submission lacks {missing[0]} "
                "(a node agent of this version computes them)"
            )
        extra = sorted(set(given) - set(needed))
        if extra:
            raise ValueError(
                f"held-out statistics for smoothing {extra[0]} are not used by the coordinator's "
                f"routing (it needs {list(needed) or 'none'})"
            )
        out = {}
        for beta in needed:
            value = given[beta]
            claim = parse_stats(value).num_tokens
            parsed = self.stats(node, name, value, claim, spec.holdout_feature_map(beta))
            if parsed.expert_fingerprint != fit.expert_fingerprint:
                raise ValueError("held-out and fit statistics were computed with different experts")
            out[beta] = (parsed, stats_bytes(value, parsed))
        return out


def _holdout_by_decay(holdout) -> dict:
    if holdout is not None and not isinstance(holdout, dict):
        raise ValueError(
            f"holdout must be a dict {{smoothing: statistics}}, got {type(holdout).__name__}"
        )
    if holdout is not None and len(holdout) > 16:
        raise ValueError(f"holdout has {len(holdout)} entries (at most 16 decays)")
    given = {}
    for key, value in (holdout or {}).items():
        try:
            beta = float(key)
        except (TypeError, ValueError):
            raise ValueError(
                f"held-out statistics key {str(key)[:40]!r} is not a smoothing decay"
            ) from None
        given[beta] = value
    return given
