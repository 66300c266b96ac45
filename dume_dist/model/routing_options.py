"""Routing options: the one definition of every option of every router kind, and the presets.

Each option has a name, a type, a default, its check and its help. Everything that takes routing
options derives from this table: `RoutingSpec` (``dume_dist.model.routing``), the CLI flags of
`dume build` / `dume coordinator start` and their YAML keys, the coordinator's settings check, and
``DumeConfig``'s check of a checkpoint's ``routing`` dict. The file imports only the standard
library: the CLI reads it without torch, and it is copied next to ``modeling_dume.py`` into every
checkpoint.

A router kind (``dume_dist.model.kinds``) names its options here; a kind that is not built in
passes its own `Option` tuple to ``register_kind``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

AUTO = "auto"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Option:
    """One routing option. ``type`` is ``float``, ``int``, ``choice`` or ``grid`` (a tuple of
    floats); ``low`` / ``high`` bound a number (``*_open``: excluded); ``auto``: the value may
    be ``"auto"`` (chosen on held-out statistics); ``flag``: a CLI flag and a YAML key."""

    name: str
    type: str
    default: object
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    auto: bool = False
    flag: bool = True

    def check(self, value, where: str = ""):
        """The value, normalised (grids become tuples); a one-line ValueError naming the option."""
        key = f"{where}{self.name}"
        if value == AUTO and self.auto:
            return AUTO
        if self.type == "choice":
            if value not in self.choices:
                raise ValueError(f"{key} must be one of {self.choices}, got {value!r}")
            return value
        if self.type == "grid":
            if value is None:
                return None
            try:
                grid = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a list of numbers, got {value!r}") from None
            if not grid:
                raise ValueError(f"{key} must not be empty")
            for v in grid:
                self._check_number(key, v)
            return grid
        if self.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        if not _is_number(value):
            raise ValueError(f"{key} has a bad value {value!r}")
        self._check_number(key, value)
        return value

    def _check_number(self, key: str, value) -> None:
        if not math.isfinite(float(value)):
            raise ValueError(f"{key} must be finite, got {value!r}")
        low_bad = self.low is not None and (
            value <= self.low if self.low_open else value < self.low
        )
        high_bad = self.high is not None and (
            value >= self.high if self.high_open else value > self.high
        )
        if low_bad or high_bad:
            lo = "(" if self.low_open or self.low is None else "["
            hi = ")" if self.high_open or self.high is None else "]"
            low = "-inf" if self.low is None else self.low
            high = "inf" if self.high is None else self.high
            raise ValueError(f"{key} must be in {lo}{low}, {high}{hi}, got {value!r}")

    def parse(self, text: str):
        """A command-line string as this option's value (checked later, with the others)."""
        text = str(text).strip()
        if self.auto and text.lower() == AUTO:
            return AUTO
        if self.type == "choice":
            return text
        if self.type == "int":
            return int(text)
        if self.type == "grid":
            return tuple(float(v) for v in text.split(","))
        return float(text)

    @property
    def metavar(self) -> str | None:
        if self.type == "choice":
            return None
        return {"int": "N", "grid": "X,Y,..."}.get(self.type, "X") + ("|auto" if self.auto else "")


def options_by_name(options) -> dict[str, Option]:
    return {o.name: o for o in options}


# -- options of every kind -------------------------------------------------------------------

COMMON_OPTIONS = (
    Option("top_k", "int", 1, "experts per token k", low=1),
    Option(
        "min_weight", "float", 0.0,
        "with k > 1: experts whose routing weight is below this do not run (the rest are "
        "renormalised)",
        low=0.0, high=0.5, high_open=True,
    ),
    Option(
        "holdout_fraction", "float", 0.0,
        "share of each contributor's documents held out to choose 'auto' settings (default 0.1 "
        "when a setting is 'auto')",
        low=0.0, high=1.0, high_open=True,
    ),
)  # fmt: skip

DEFAULT_SMOOTHING_GRID = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 1.0)

# Per-layer linear routers solved from Gram statistics (core/stats, core/solve, core/select).
LINEAR_OPTIONS = (
    Option(
        "features", "choice", "token",
        "router features: 'token' (the MLP input, the paper) or 'prefix_mean' (with the mean of "
        "the sequence so far)",
        choices=("token", "prefix_mean"),
    ),
    Option("solver", "choice", "ridge", "router solver: 'ridge' (the paper) or 'lda'",
           choices=("ridge", "lda")),
    Option(
        "priors", "choice", "tokens",
        "how experts weigh in the solve: 'tokens' (by the tokens each claims, the paper) or "
        "'equal' (each expert's statistics normalised by its token count: claimed volume buys no "
        "traffic; ridge λ is then relative to one expert's moments)",
        choices=("tokens", "equal"),
    ),
    Option("ridge_lambda", "float", 1e-2, "ridge solver's λ (> 0), or 'auto'",
           low=0.0, low_open=True, auto=True),
    Option("lda_shrinkage", "float", 1e-2,
           "lda solver's covariance shrinkage in (0, 1], or 'auto'",
           low=0.0, high=1.0, low_open=True, auto=True),
    Option(
        "smoothing", "float", 0.0,
        "decay in [0, 1] of the causal moving average of router logits (0 off, 1 running mean), "
        "or 'auto'",
        low=0.0, high=1.0, auto=True,
    ),
    Option("smoothing_grid", "grid", DEFAULT_SMOOTHING_GRID, "candidate decays for 'auto'",
           low=0.0, high=1.0, flag=False),
    Option("lam_grid", "grid", None, "candidate λ / shrinkages for 'auto'",
           low=0.0, low_open=True, flag=False),
)  # fmt: skip

# Sequence-level naive Bayes on hashed token bigrams (core/ngram, model/ngram_select).
MAX_SWITCH_RATES = 8  # the posterior keeps (rates x experts) numbers per sequence
DEFAULT_SAMPLE_MAX = 1 << 20  # sampled tokens per contributor: minutes for an 8B expert on a GPU
NGRAM_OPTIONS = (
    Option("ngram_buckets", "int", 1 << 22, "hash buckets of the n-gram router's bigram counts "
           "(about 3x the distinct bigrams of the largest expert's text or more)", low=1,
           high=1 << 24),
    Option("ngram_alpha", "float", 0.1, "n-gram router's unigram smoothing α (> 0)",
           low=0.0, low_open=True, flag=False),
    Option("mu", "float", 100.0, "n-gram router's bigram smoothing μ (> 0), or 'auto'",
           low=0.0, low_open=True, auto=True),
    Option("mu_grid", "grid", None, "candidate μ for 'auto'", low=0.0, low_open=True,
           flag=False),
    Option(
        "mu_criterion", "choice", "likelihood",
        "how μ 'auto' is chosen: 'likelihood' (each node sends its held-out log-likelihood at "
        "each μ of the grid, no text) or 'bigrams' (nodes send their exact held-out bigrams)",
        choices=("likelihood", "bigrams"),
    ),
    Option(
        "switch", "float", 0.0,
        "n-gram router: rate in [0, 0.5) at which the posterior lets the domain switch before a "
        "token (0: cumulative), or 'auto': chosen on held-out bigrams",
        low=0.0, high=0.5, high_open=True, auto=True,
    ),
    Option(
        "switch_rates", "grid", None,
        "n-gram router: switch rates in [0, 0.5), one switching posterior each, averaged with "
        "weights by how well each predicted the text so far (instead of one rate 'switch'; at "
        f"most {MAX_SWITCH_RATES})",
        low=0.0, high=0.5, high_open=True,
    ),
    Option(
        "ngram_sample", "float", 0.0,
        "n-gram router: each contributor's expert writes this many times as many tokens as its "
        "data gave (from its BOS token, temperature 1; 0: none) and counts them with its data's "
        "(docs/routing.md, counts of text the experts write)",
        low=0.0, high=16.0,
    ),
    Option(
        "ngram_sample_max", "int", DEFAULT_SAMPLE_MAX,
        "n-gram router: the most tokens one contributor's expert writes for ngram_sample",
        low=1, high=1 << 30,
    ),
    Option(
        "evidence_scale", "float", 1.0,
        "n-gram router: weight in (0, 1] on each token's bigram log-likelihoods before the "
        "posterior (1: naive Bayes; < 1 tempers its overconfidence)",
        low=0.0, high=1.0, low_open=True,
    ),
)  # fmt: skip

BUILTIN_KIND_OPTIONS = {"linear": LINEAR_OPTIONS, "ngram": NGRAM_OPTIONS}

# Earlier versions told the kinds apart by `features` and `solver` (config, settings, flags):
# `ngram` routing was features "ngram" with solver "nb". Those names still read.
NGRAM_LEGACY = {"features": "ngram", "solver": "nb"}
ROUTING_FEATURES = (*LINEAR_OPTIONS[0].choices, NGRAM_LEGACY["features"])
ROUTING_SOLVERS = (*LINEAR_OPTIONS[1].choices, NGRAM_LEGACY["solver"])


def routing_option_names(extra_kinds=()) -> tuple[str, ...]:
    """Names of the routing options that have a flag (and a YAML / settings key): the common
    ones, then each kind's, without repeats; ``extra_kinds``: option tuples of other kinds."""
    names: list[str] = []
    for options in (COMMON_OPTIONS, *BUILTIN_KIND_OPTIONS.values(), *extra_kinds):
        names += [o.name for o in options if o.flag and o.name not in names]
    return tuple(names)


# -- named settings ---------------------------------------------------------------------------

DEFAULT_HOLDOUT_FRACTION = 0.1
FOLLOW_SWITCH_RATES = (0.0, 1e-4, 1e-3, 1e-2)
# `follow` counts text each contributor's expert writes, half as many tokens as its data gave,
# and weighs evidence by 0.3: against no sample at 0.2, every domain of three expert sets within
# 1% of oracle (the joining `ocaml` 97.3% -> 99.4%) and more of mixed text kept on all three
# (docs/routing.md, "Text the experts write: the default")
FOLLOW_SAMPLE = 0.5
FOLLOW_EVIDENCE_SCALE = 0.3
# `follow`'s second expert runs where its weight is at least 0.15: with the sample and β 0.3,
# against 0.1, 17-20% fewer second-expert tokens (set 2: 7.4% -> 5.9%, below the earlier
# default's 6.0%) for at most 0.06 points of the worst domain and 0.001 of mixed-text keep
# (docs/routing.md, speed)
FOLLOW_MIN_WEIGHT = 0.15

# `paper` is the paper's exact routing. `follow` is the best measured (docs/routing.md) and THE
# default (DEFAULT_PRESET) of `dume build`, `build_dume()`, `dume coordinator start` and
# `dume demo`; `ngram` is its cumulative posterior (the default of earlier versions). Smoothing
# is not in `context`: on prefix-mean features the held-out choice was always β = 0; its priors are equal (claimed volume buys no traffic; the same quality as tokens
# priors on both expert sets, docs/routing.md). `ngram`: k = 2 with weights below 0.05 dropped:
# the second expert runs only where the sequence's domain is still uncertain (about 1% of tokens
# on the shipped experts).
PRESETS: dict[str, dict] = {
    "paper": {"kind": "linear"},
    "context": {
        "kind": "linear", "features": "prefix_mean", "solver": "lda", "lda_shrinkage": AUTO,
        "priors": "equal", "holdout_fraction": DEFAULT_HOLDOUT_FRACTION,
    },
    "ngram": {
        "kind": "ngram", "mu": AUTO, "top_k": 2, "min_weight": 0.05,
        "holdout_fraction": DEFAULT_HOLDOUT_FRACTION,
    },
    # `ngram` whose posterior lets the domain switch before any token (rate chosen on held-out
    # bigrams): routing follows text whose domain changes (docs/routing.md, mixed-domain text).
    "switch": {
        "kind": "ngram", "mu": AUTO, "switch": AUTO, "top_k": 2, "min_weight": 0.05,
        "holdout_fraction": DEFAULT_HOLDOUT_FRACTION,
    },
    # THE default: `ngram` whose posterior averages switching chains of four fixed rates (0 among
    # them), each weighted by how well it predicted the text so far, on evidence weighted by 0.3
    # (naive Bayes is overconfident), with counts of text the experts write added to their
    # contributors' (FOLLOW_SAMPLE): text that changes domain is followed; no rate to choose
    # (docs/routing.md, mixed-domain text).
    "follow": {
        "kind": "ngram", "mu": AUTO, "switch_rates": FOLLOW_SWITCH_RATES,
        "evidence_scale": FOLLOW_EVIDENCE_SCALE, "ngram_sample": FOLLOW_SAMPLE, "top_k": 2,
        "min_weight": FOLLOW_MIN_WEIGHT, "holdout_fraction": DEFAULT_HOLDOUT_FRACTION,
    },
}  # fmt: skip
DEFAULT_PRESET = "follow"
