"""Router kinds: one interface, registered by name.

A router kind is everything DUME needs to know about one way of routing: its options (declared
in ``routing_options``), its statistics (type, identity, blob schema, validation), how a
contributor collects them (`Collector`: add batches, a flat fp64 layout that distributed workers
all-reduce, rows they gather), the solve from contributions in canonical order with held-out
selection of its parameters, and what it writes into a checkpoint (router tensors and the
config's ``routing`` dict, read by its inference code in ``routing_dume.py``).

Build, collection, workers, agent, coordinator, writer, eval and bench call this interface and
never branch on a kind's name. The built-in kinds are ``linear`` (per-layer routers solved from
Gram statistics, ``kinds/linear.py``) and ``ngram`` (sequence-level naive Bayes on token bigrams,
``kinds/ngram.py``); docs/routing.md says how to add one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from tqdm.auto import tqdm

from dume_dist.model.data import keep_mask
from dume_dist.model.routing_dume import kind_name_of_config
from dume_dist.model.routing_options import AUTO, Option


@dataclass(frozen=True)
class BackboneShape:
    """What statistics are validated against: the backbone's layers and hidden size, its
    vocabulary size and per layer the largest ``|x|²`` of one token's MLP input
    (``model.feature_bounds``; None: unknown) — these two may be callables, read on use."""

    num_layers: int
    hidden_size: int
    vocab: int | Callable[[], int]
    bound: object = None

    @property
    def vocab_size(self) -> int:
        return self.vocab() if callable(self.vocab) else self.vocab

    @property
    def feature_bound_L(self):
        return self.bound() if callable(self.bound) else self.bound

    @classmethod
    def of_config(cls, config) -> BackboneShape:
        return cls(config.num_hidden_layers, config.hidden_size, config.vocab_size)


class Collector:
    """One contributor's statistics of one data part (fit, or held-out), batch by batch.

    ``flat`` / ``load_flat``: the additive state as one fp64 vector (workers all-reduce it);
    ``rows`` / ``load_rows``: int64 rows that do not add but are gathered and merged (None: none);
    ``result``: ``{part key: statistics}`` (fit: ``{0.0: stats}``; held-out: one per key of
    ``RouterKind.holdout_parts``), without fingerprints."""

    def add(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> None:
        raise NotImplementedError

    def flat(self) -> torch.Tensor:
        raise NotImplementedError

    def load_flat(self, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def rows(self) -> torch.Tensor | None:
        return None

    def load_rows(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict:
        raise NotImplementedError


def feed(collector: Collector, batches, max_tokens_per_seq: int, *, progress: bool = True,
         desc: str = "statistics") -> int:  # fmt: skip
    """Give ``collector`` every ``(ids, mask)`` batch, with a progress bar of the tokens it keeps
    (the first ``max_tokens_per_seq`` real ones of each sequence); returns their number.
    ValueError when there are none."""
    seen = 0
    with tqdm(disable=not progress, unit="tok", desc=desc) as bar:
        for ids_BT, mask_BT in batches:
            collector.add(ids_BT, mask_BT)
            kept = int(keep_mask(mask_BT, max_tokens_per_seq).sum())
            seen += kept
            bar.update(kept)
    if seen == 0:
        raise ValueError("no tokens to collect statistics from")
    return seen


def feed_sample(collector: Collector, sample, progress: bool = True, desc: str = "sample",
                batches=None, on_batch=None) -> int:  # fmt: skip
    """Give ``collector`` the batches ``batches`` (default: all) of ``sample`` (what
    ``RouterKind.sampled`` returns; None: nothing), with a progress bar of sampled tokens
    (``on_batch(tokens)`` after each batch); the sample's model is released after. Returns the
    tokens of the whole sample (0 for None)."""
    if sample is None:
        return 0
    mine = list(range(sample.num_batches) if batches is None else batches)
    try:
        total = sum(sample.tokens_of(b) for b in mine)
        with tqdm(disable=not progress, unit="tok", desc=desc, total=total) as bar:
            for b in mine:
                collector.add(*sample.batch(b))
                bar.update(sample.tokens_of(b))
                if on_batch is not None:
                    on_batch(sample.tokens_of(b))
    finally:
        sample.release()
    return sample.num_tokens


class RouterKind:
    """Base of a router kind; subclasses override what their kind needs (see the module)."""

    name: str = ""
    options: tuple[Option, ...] = ()
    schema: str = ""  # of its statistics blobs
    stats_type: type = object
    stats_label: str = "statistics"  # what its statistics are, in words (error messages)
    # A kind outside the package: the module the checkpoint's remote code imports for its
    # inference code (``routing.module`` in the config).
    remote_module: str | None = None

    # -- options ------------------------------------------------------------------------------

    def claims(self, named: Mapping) -> bool:
        """Whether routing options given without a ``kind`` (older settings) name this kind."""
        return False

    def from_named(self, named: dict, base: Mapping | None = None) -> dict:
        """Options written by older versions (``lam``, ...) in this kind's names (``base``: the
        options they change)."""
        return named

    def legacy_view(self, options: Mapping) -> dict:
        """The older names of this kind's settings (``features``, ``solver``, ``lam``, ...)."""
        return {}

    def check(self, spec) -> None:
        """Constraints between options (each option is checked on its own already)."""

    def selected_option(self, options: Mapping) -> str | None:
        """The solver parameter that held-out selection chooses (its meaning)."""
        return None

    def holdout_parts(self, spec) -> tuple[float, ...]:
        """Keys of the held-out statistics a contributor computes (none when nothing is auto)."""
        return (0.0,) if spec.needs_holdout else ()

    def identity(self, spec, part: float | None = None) -> str:
        """Identity of fit statistics (``part`` None) or of held-out part ``part``."""
        raise NotImplementedError

    def widest(self, specs) -> object:
        """A spec whose statistics serve every one of ``specs`` (same identity): everything
        that can be chosen on held-out statistics set to ``"auto"`` (benchmarks)."""
        autos = {o.name: AUTO for o in self.options if o.auto}
        changes = autos | self.widest_changes(specs)
        return specs[0].replace(**changes, holdout_fraction=max(specs[0].holdout_fraction, 0.1))

    def widest_changes(self, specs) -> dict:
        """What ``widest`` sets besides the options chosen "auto" (one ``replace``, checked once)."""
        return {}

    def heldout_as_fit(self, stats):
        """Held-out statistics of part 0.0 as fit statistics (they add to them)."""
        return stats

    def heldout_for(self, spec, stats, part: float):
        """Held-out statistics of part ``part`` collected for a wider spec (``widest``), as a
        contributor computes them for ``spec`` (benchmarks)."""
        return stats

    def statistics_settings(self, spec) -> dict | None:
        """What a contributor's statistics depend on besides data, expert and backbone (part of
        a node's submission id; None: nothing, as for the paper's statistics)."""
        return None

    # -- statistics ---------------------------------------------------------------------------

    def encode(self, stats) -> bytes:
        raise NotImplementedError

    def decode(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]):
        raise NotImplementedError

    def layout(self, spec, backbone: BackboneShape) -> tuple[dict, tuple[str, ...]]:
        """``({tensor: (dtype, shape)}, optional tensor names)`` of its blobs, checked on the
        safetensors header before any tensor is read (``core.header.check_layout``)."""
        raise NotImplementedError

    def validate(self, stats, spec, backbone: BackboneShape) -> None:
        """Structure: shapes, dtypes, finiteness, counts, identity (one-line ValueError)."""
        raise NotImplementedError

    def check_values(self, stats, spec, backbone: BackboneShape) -> None:
        """What the solve needs of a hostile contributor's statistics, after ``validate``
        (bounds, definiteness): the coordinator's check."""

    def collectors(
        self, spec, backbone, expert, *, holdout: bool, max_tokens_per_seq: int, device,
        dtype=None, clip: float | None = None, count_cap: int | None = None,
        private: bool = False,
    ) -> list[Collector]:  # fmt: skip
        """The fit collector and, with ``holdout``, the held-out one (``backbone`` a
        ``model.backbone.Backbone``, ``expert`` an ``ExpertSpec``; ``dtype`` of a model run;
        ``clip`` / ``count_cap``: the bounds of ``dp_bounds``; ``private``: the statistics will
        be made differentially private on the node, keep what ``privatized`` needs)."""
        raise NotImplementedError

    def sample_settings(self, spec) -> dict | None:
        """What the batches of ``sampled`` depend on (part of ``statistics_settings``, and of a
        saved statistics directory's key); None: no sample."""
        return None

    def check_sampling(self, spec, expert) -> None:
        """ValueError (one line) when ``expert`` cannot write the sample ``spec`` asks for:
        checked before anything is collected."""

    def sampled(self, spec, backbone, expert, *, real_tokens: int, max_tokens_per_seq: int,
                fingerprint: str, device, dtype=None, private: bool = False):  # fmt: skip
        """Token batches the contributor's own expert writes, which its fit collector counts
        after its data's ``real_tokens`` kept tokens: an object with ``num_batches``,
        ``num_tokens``, ``tokens_of(b)``, ``batch(b)`` (the same bits on any worker) and
        ``release()``; None: none (most kinds; ``private``: statistics made differentially
        private on the node)."""
        return None

    # -- differential privacy -----------------------------------------------------------------

    def heldout_settings(self, spec) -> dict | None:
        """Options of ``spec`` its held-out statistics depend on beyond their identity (a saved
        statistics directory recomputes them when these change); None: none."""
        return None

    def heldout_release(self, spec) -> str | None:
        """What its held-out statistics of ``spec`` release beyond sums and summaries (None:
        nothing; else a node sends them only when its contributor says so, and never with
        differential privacy)."""
        return None

    def check_dp(self, spec, dp) -> None:
        """A one-line ValueError when this routing cannot be made differentially private by
        ``dp`` (a ``core.dp.DpSpec``)."""
        raise ValueError(f"router kind {self.name!r} has no differentially private statistics")

    def dp_mechanism_options(self, spec) -> dict:
        """Keyword options the statistics' ``privatized`` needs from the model layer (passed
        through ``core.private.privatize``); empty for most kinds."""
        return {}

    def dp_bounds(self, spec, backbone, dp) -> tuple[float | None, int | None]:
        """``(feature clip, count cap)`` that collection applies under ``dp``."""
        raise ValueError(f"router kind {self.name!r} has no differentially private statistics")

    # -- solve and checkpoint -----------------------------------------------------------------

    def solve(self, spec, fit: Mapping, num_experts: int, holdout: Mapping):
        """``SolvedRouting`` from ``{name: (expert, stats)}`` in canonical (sorted) order."""
        raise NotImplementedError

    def config_routing(self, solved) -> dict:
        raise NotImplementedError

    def manifest_routing(self, solved) -> dict:
        return {}

    def bias_free_unsupported(self, solved) -> str | None:
        """Why these routers have no bias-free linear form on the MLP input (what a gate
        without intercept, Mixtral's, can hold); None when they have one."""
        features = solved.spec.to_json().get("features", self.name)
        return (
            f"routing features {features!r}: a gate without intercept reads the MLP input, "
            "only 'token' features"
        )

    def bias_free_routers(self, solved, fit: Mapping, num_experts: int):
        raise ValueError(self.bias_free_unsupported(solved))

    def check_routers(self, routers, routing: Mapping, num_experts: int, backbone_config) -> None:
        raise NotImplementedError

    def checkpoint_tensors(self, routers, num_layers: int) -> Iterator[tuple]:
        """``(layer, name, tensor)`` of the routers (fp32): ``layer`` None for tensors written
        before the layers, else the layer whose experts follow."""
        raise NotImplementedError

    def config_identity(self, routing: Mapping) -> str:
        """Identity of the fit statistics that solved a checkpoint of config ``routing``."""
        raise NotImplementedError


_KINDS: dict[str, RouterKind] = {}


def register_kind(kind: RouterKind) -> RouterKind:
    """Make ``kind`` known by ``kind.name`` (re-registering the same class is a no-op)."""
    if not kind.name or not kind.schema:
        raise ValueError("a router kind needs a name and a statistics schema")
    old = _KINDS.get(kind.name)
    if old is not None and type(old) is not type(kind):
        raise ValueError(f"router kind {kind.name!r} is registered already")
    clash = [k.name for k in _KINDS.values() if k.schema == kind.schema and k.name != kind.name]
    if clash:
        raise ValueError(f"statistics schema {kind.schema!r} belongs to kind {clash[0]!r}")
    _KINDS[kind.name] = kind
    return kind


def kinds() -> dict[str, RouterKind]:
    _builtin()
    return dict(_KINDS)


def get_kind(name: str) -> RouterKind:
    _builtin()
    if name not in _KINDS:
        raise ValueError(f"unknown router kind {name!r} (known: {', '.join(sorted(_KINDS))})")
    return _KINDS[name]


def kind_of_named(named: Mapping) -> RouterKind:
    """The kind of routing options given without a ``kind`` (older settings): the one that
    claims them (the paper's kind, the fallback, asked last), else the paper's."""
    _builtin()
    fallback = _KINDS[_default_kind()]
    for kind in [k for k in _KINDS.values() if k is not fallback] + [fallback]:
        if kind.claims(named):
            return kind
    return fallback


def kind_of_config(routing: Mapping | None) -> RouterKind:
    """The kind of a checkpoint's ``routing`` config dict."""
    return get_kind(kind_name_of_config(dict(routing or {})))


def _default_kind() -> str:
    from dume_dist.model.routing_options import PRESETS

    return PRESETS["paper"]["kind"]  # settings that name no kind are the paper's routing


_BUILTIN_LOADED = []


def _builtin() -> None:
    """Import the built-in kinds (they register themselves) on first use."""
    if not _BUILTIN_LOADED:
        _BUILTIN_LOADED.append(True)
        from dume_dist.model.kinds import linear, ngram  # noqa: F401


# -- statistics blobs ----------------------------------------------------------------------------


def read_metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def kind_of_stats(stats) -> RouterKind:
    _builtin()
    for kind in _KINDS.values():
        if type(stats) is kind.stats_type:
            return kind
    raise ValueError(f"{type(stats).__name__} are no router statistics")


def stats_to_bytes(stats) -> bytes:
    """One statistics blob (safetensors, the schema of the statistics' kind)."""
    return kind_of_stats(stats).encode(stats)


def stats_from_bytes(data: bytes):
    """Decode and validate a blob of any registered kind; a corrupt or foreign blob raises a
    one-line ValueError."""
    try:
        tensors = st_load(bytes(data))
        meta = read_metadata(bytes(data))
    except Exception as exc:  # safetensors raises several types
        raise ValueError(f"statistics blob is not valid safetensors: {exc}") from None
    _builtin()
    schema = meta.get("schema")
    for kind in _KINDS.values():
        if kind.schema == schema:
            try:
                return kind.decode(tensors, meta)
            except (KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
                raise ValueError(f"statistics blob is malformed: {exc!r}") from None
    raise ValueError(f"statistics blob has an unknown schema {schema!r}")


def load_stats(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"statistics file not found: {path}") from None
    return stats_from_bytes(data)


def auto_options(options: Mapping) -> list[str]:
    return [k for k, v in options.items() if v == AUTO]
