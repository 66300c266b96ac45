"""Statistics of the sequence-level n-gram router: token counts that add per contributor.

The ``ngram`` routing option routes a whole sequence by naive Bayes on its token bigrams (the
formula lives in ``modeling_dume.DumeNgramRouter``). What it needs of each contributor is three
count vectors over the tokens of its data (the same windows and masks as the Gram statistics):

* ``unigram_V``: how often each token id occurs;
* ``context_V``: how often each token id is followed by a token (the bigram contexts);
* ``bigram_H``: bigram counts hashed into ``H`` buckets (``modeling_dume.ngram_bucket``).

They add across contributors and subtract exactly (integer counts in fp64), so joining and exact
unlearning work as for the Gram statistics. The statistics identity ``feature_map`` is
``"ngram:<H>"``; statistics of different identities never mix. A blob stores the bigram counts
sparse (``bigram_index``: the non-empty buckets, increasing; ``bigram_count``: their counts), so
its size follows the distinct bigrams, not ``H``; blobs with the dense ``bigram`` vector of
earlier versions still read.

``H`` defaults to 2^22: collisions cost routing accuracy once a table's distinct bigrams pass
about a third of its buckets (measured with 0.5-20M tokens per domain, docs/routing.md), and
real contributors' text fills 2^18 buckets many times over.

Held-out statistics (to choose the smoothing strength ``mu`` without moving data) are the same
counts of the held-out slice plus its **held-out curve**: for every ``mu`` of the grid
(``curve_mu_M``), the log-likelihood (``curve_M``, nats, summed) of the slice's bigrams under the
contributor's own fit counts (``model.ngram_select.heldout_curve``), and the number of bigrams it
scores (``curve_count_1``: the held-out bigram total; under differential privacy released with
the curve, noisy). The curve is computed on the node, adds across contributors
and releases a dozen numbers, not text. Only the exact criterion (``mu_criterion: bigrams``)
needs ``pairs_K3``, the exact ``(previous id, id, count)`` bigrams of the
held-out slice, sorted: text fragments, sent only when the contributor says so. Identities:
``"ngram:<H>"`` (fit), ``"ngram:<H>+curve"`` and ``"ngram:<H>+curve+pairs"`` (held-out).

Shapes: ``V`` vocabulary, ``H`` buckets, ``E`` experts, ``K`` distinct held-out bigrams, ``M``
values of ``mu`` in the held-out curve.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from safetensors.torch import save as st_save

from dume_dist.core import dp
from dume_dist.core.stats import check_same_backbone, parse_extra

NGRAM_SCHEMA = "dume-ngram-stats/1"
DEFAULT_BUCKETS = 1 << 22
MAX_BUCKETS = 1 << 24  # 128 MiB of fp64 counts: the most a blob may make a reader allocate
DEFAULT_ALPHA = 0.1
BIGRAM_FORMS = ("bigram", "bigram_index", "bigram_count")  # a blob holds the first or the others


def ngram_feature_map(buckets: int, pairs: bool = False, curve: bool = False) -> str:
    return f"ngram:{int(buckets)}" + ("+curve" if curve else "") + ("+pairs" if pairs else "")


def buckets_of(feature_map: str) -> int | None:
    """``H`` of an n-gram identity ``"ngram:<H>[+...]"`` (``ngram_feature_map``); None for any
    other string."""
    head = str(feature_map).split("+")[0]
    digits = head.removeprefix("ngram:")
    return int(digits) if digits != head and digits.isascii() and digits.isdigit() else None


MAX_CURVE_POINTS = 64


@dataclass(frozen=True)
class NgramStats:
    """Token counts of one contribution (or a sum of them); see the module docstring."""

    unigram_V: torch.Tensor
    context_V: torch.Tensor
    bigram_H: torch.Tensor
    feature_map: str = ""
    backbone_fingerprint: str = ""
    expert_fingerprint: str = ""
    extra: dict = field(default_factory=dict)
    pairs_K3: torch.Tensor | None = None
    curve_M: torch.Tensor | None = None
    curve_mu_M: torch.Tensor | None = None
    curve_count_1: torch.Tensor | None = None

    def __post_init__(self):
        if not self.feature_map:
            object.__setattr__(self, "feature_map", self._own_feature_map())

    def _own_feature_map(self) -> str:
        return ngram_feature_map(self.buckets, self.pairs_K3 is not None, self.curve_M is not None)

    @property
    def num_bigrams(self) -> int:
        """Bigrams counted (what a held-out curve scores)."""
        return int(round(float(self.context_V.sum())))

    @property
    def num_tokens(self) -> int:
        return int(round(float(self.unigram_V.sum())))

    @property
    def vocab_size(self) -> int:
        return self.unigram_V.shape[0]

    @property
    def buckets(self) -> int:
        return self.bigram_H.shape[0]

    def _check_compatible(self, other) -> None:
        if not isinstance(other, NgramStats) or self.feature_map != other.feature_map:
            got = getattr(other, "feature_map", type(other).__name__)
            raise ValueError(
                f"cannot combine statistics of feature map {self.feature_map!r} with {got!r}"
            )
        if self.vocab_size != other.vocab_size:
            raise ValueError(
                f"cannot combine n-gram statistics over vocabularies of {self.vocab_size} "
                f"and {other.vocab_size} tokens"
            )
        check_same_backbone(self.backbone_fingerprint, other.backbone_fingerprint)

    def _combined(self, other: NgramStats, sign: int) -> NgramStats:
        self._check_compatible(other)
        pairs = None
        if self.pairs_K3 is not None:
            pairs = merge_pairs(self.pairs_K3, other.pairs_K3, sign)
        curve = None
        if self.curve_M is not None:
            if not torch.equal(self.curve_mu_M, other.curve_mu_M):
                raise ValueError("cannot combine held-out curves over different mu grids")
            curve = self.curve_M + sign * other.curve_M
            count = self.curve_count_1 + sign * other.curve_count_1
        return NgramStats(
            self.unigram_V + sign * other.unigram_V,
            self.context_V + sign * other.context_V,
            self.bigram_H + sign * other.bigram_H,
            self.feature_map,
            self.backbone_fingerprint or other.backbone_fingerprint,
            self.expert_fingerprint if self.expert_fingerprint == other.expert_fingerprint else "",
            pairs_K3=pairs,
            curve_M=curve,
            curve_mu_M=None if curve is None else self.curve_mu_M,
            curve_count_1=None if curve is None else count,
        )

    def __add__(self, other: NgramStats) -> NgramStats:
        return self._combined(other, 1)

    def __sub__(self, other: NgramStats) -> NgramStats:
        return self._combined(other, -1)

    def validate(self, vocab_size: int | None = None, buckets: int | None = None) -> None:
        """Raise ValueError (one line, naming the problem) unless these are sound counts."""
        for name in ("unigram_V", "context_V", "bigram_H"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.float64:
                raise ValueError(f"n-gram statistics {name} must be a 1-D float64 tensor")
            if not torch.isfinite(t).all() or (t < 0).any() or not torch.equal(t, t.round()):
                raise ValueError(f"n-gram statistics {name} must hold non-negative integer counts")
        if self.context_V.shape != self.unigram_V.shape:
            raise ValueError("n-gram statistics: unigram and context counts differ in length")
        if vocab_size is not None and self.vocab_size != vocab_size:
            raise ValueError(
                f"n-gram statistics cover {self.vocab_size} token ids, the model has {vocab_size}"
            )
        if buckets is not None and self.buckets != buckets:
            raise ValueError(f"n-gram statistics have {self.buckets} buckets, expected {buckets}")
        if self.feature_map != self._own_feature_map():
            raise ValueError(
                f"n-gram statistics with {self.buckets} buckets cannot be of feature map "
                f"{self.feature_map!r}"
            )
        if self.num_tokens < 1:
            raise ValueError("n-gram statistics count no tokens")
        if (self.context_V > self.unigram_V).any():
            raise ValueError("n-gram statistics: a token is a bigram context more often than seen")
        if float(self.context_V.sum()) != float(self.bigram_H.sum()):
            raise ValueError("n-gram statistics: bigram and context counts differ in total")
        if self.pairs_K3 is not None:
            _validate_pairs(self.pairs_K3, self.vocab_size)
        if any(t is not None for t in (self.curve_M, self.curve_mu_M, self.curve_count_1)):
            _validate_curve(self.curve_M, self.curve_mu_M, self.curve_count_1)

    def with_meta(self, **kwargs) -> NgramStats:
        return replace(self, **kwargs)

    def counts_only(self) -> NgramStats:
        """The three count vectors alone (held-out bigrams and curve dropped), identity anew."""
        return self.with_meta(pairs_K3=None, curve_M=None, curve_mu_M=None, curve_count_1=None,
                              feature_map="")  # fmt: skip

    def privatized(self, held: dict, spec, *, tokens_per_unit: int, clip=None, gen,
                   heldout_curve=None):  # fmt: skip
        """Differential privacy of n-gram counts (``core.private.privatize``): the fit and each
        held-out part are one Gaussian release each, with the sensitivity of ``spec.unit``; a
        held-out curve is one more (``private_curve``), computed from the noisy fit counts by
        ``heldout_curve(fit, pairs_K3, mu_grid, clip_nats)`` (the model layer's formula) on the
        held-out bigrams the node kept for it, which are then dropped."""
        curves = sorted(b for b, h in held.items() if h.curve_M is not None)
        if any(h.pairs_K3 is None for b, h in held.items() if b in curves):
            raise ValueError("a private held-out curve needs the held-out bigrams on the node")
        if any(h.pairs_K3 is not None for b, h in held.items() if b not in curves):
            raise ValueError(
                "exact held-out bigrams are not released with differential privacy: use mu "
                "'auto' with mu_criterion likelihood, or a fixed mu"
            )
        if curves and heldout_curve is None:
            raise ValueError("a private held-out curve needs the router's formula")
        releases = 1 + len(held) + len(curves)
        z = dp.calibrate(spec.epsilon, spec.delta, releases)
        sens = {"counts": dp.ngram_sensitivity(spec.unit, tokens_per_unit, spec.count_cap)}
        if curves:
            sens["curve"] = curve_sensitivity(
                spec.unit, tokens_per_unit, len(held[curves[0]].curve_M)
            )
        guarantee = dp.Guarantee(
            epsilon=spec.epsilon, delta=spec.delta, unit=spec.unit, noise_multiplier=z,
            num_releases=releases, sensitivity=sens, sigma={k: z * v for k, v in sens.items()},
            clip=None, count_cap=spec.count_cap if spec.unit == "sequence" else None,
        )  # fmt: skip
        fit = noisy_ngram(self, z * sens["counts"], gen)
        noisy = {}
        for b, h in sorted(held.items()):
            counts = noisy_ngram(h.counts_only(), z * sens["counts"], gen)
            if b in curves:
                counts = private_curve(counts, fit, h, heldout_curve, z * sens["curve"], gen)
            noisy[b] = dp.with_guarantee(counts, guarantee)
        return dp.with_guarantee(fit, guarantee), noisy, guarantee


CURVE_CLIP_NATS = 20.0  # a private held-out curve counts each bigram's log-probability >= -this


def curve_sensitivity(unit: str, tokens_per_unit: int, points: int) -> float:
    """L2 sensitivity of a held-out curve of ``points`` values, each a sum of bigram
    log-probabilities clipped to [-CURVE_CLIP_NATS, 0], released with its bigram count scaled by
    ``CURVE_CLIP_NATS * sqrt(points)`` (the same sensitivity as the curve): one token is in at
    most two bigrams, a sequence of T tokens in at most T."""
    bigrams = 2 if unit == "token" else tokens_per_unit
    return bigrams * CURVE_CLIP_NATS * math.sqrt(points) * math.sqrt(2)


def private_curve(counts: NgramStats, fit: NgramStats, held: NgramStats, heldout_curve, sigma,
                  gen) -> NgramStats:  # fmt: skip
    """``counts`` (the noisy held-out counts) with the held-out curve of ``held``'s bigrams under
    the noisy ``fit`` counts (post-processing), clipped per bigram, and their number (scaled to
    the curve's sensitivity), one vector plus Gaussian noise of ``sigma``; post-processed into a
    valid curve: a count >= 0, each value within [-CURVE_CLIP_NATS, 0] per counted bigram."""
    grid = held.curve_mu_M
    raw = heldout_curve(fit, held.pairs_K3, grid.tolist(), CURVE_CLIP_NATS)
    scale = CURVE_CLIP_NATS * math.sqrt(len(grid))
    vec = torch.cat([raw, held.curve_count_1 * scale])
    noisy = vec + dp.gaussian(vec.shape, sigma, gen)
    count = (noisy[-1:] / scale).clamp_min(0.0)
    curve = torch.maximum(noisy[:-1].clamp_max(0.0), -CURVE_CLIP_NATS * count)
    return counts.with_meta(curve_M=curve, curve_mu_M=grid.clone(), curve_count_1=count,
                            feature_map="")  # fmt: skip


def ngram_layout(
    vocab_size: int, buckets: int, pairs: bool, curve_points: int | None = None
) -> dict[str, tuple[str, tuple]]:
    """The safetensors tensors of an n-gram statistics blob (`ngram_to_bytes`): the bigram counts
    sparse (``bigram_index``, ``bigram_count``: as many as non-empty buckets, at most ``buckets``,
    checked on decoding) or dense (``bigram``, earlier versions); the number of held-out bigrams
    is free (bounded by `check_count_values`)."""
    out = {"unigram": ("F64", (vocab_size,)), "context": ("F64", (vocab_size,)),
           "bigram_index": ("I64", (None,)), "bigram_count": ("F64", (None,)),
           "bigram": ("F64", (buckets,))}  # fmt: skip
    if pairs:
        out["pairs"] = ("I64", (None, 3))
    if curve_points is not None:
        out["curve"] = ("F64", (curve_points,))
        out["curve_mu"] = ("F64", (curve_points,))
        out["curve_count"] = ("F64", (1,))
    return out


def check_count_values(stats: NgramStats, max_tokens: int, alpha: float = DEFAULT_ALPHA) -> None:
    """What the router needs of one contribution's counts (after `NgramStats.validate`): no
    more tokens than one submission may claim, every count within the token count (so sums stay
    exact integers and every published log-probability finite), held-out bigrams no more than
    the tokens they came from."""
    n = float(stats.unigram_V.sum())
    if not n <= max_tokens:
        raise ValueError(f"n-gram statistics count {n:.3g} tokens, more than one submission may ({max_tokens})")  # fmt: skip
    if float(stats.bigram_H.sum()) > n:
        raise ValueError("n-gram statistics: more bigrams than tokens")
    if stats.pairs_K3 is not None and len(stats.pairs_K3):
        if float(stats.pairs_K3[:, 2].double().sum()) > n:
            raise ValueError("n-gram statistics: more held-out bigrams than tokens")
        if float(stats.pairs_K3[:, 2].double().sum()) != float(stats.context_V.sum()):
            raise ValueError(
                "n-gram statistics: held-out bigrams and bigram counts differ in total"
            )
    if stats.curve_M is not None:
        count = float(stats.curve_count_1)
        if "dp" not in stats.extra and count != stats.num_bigrams:
            raise ValueError(
                f"held-out curve scores {count:.6g} bigrams, its counts hold {stats.num_bigrams}"
            )
        if not count <= max_tokens:
            raise ValueError(f"held-out curve scores {count:.3g} bigrams, more than one submission may")  # fmt: skip
        check_curve_bounds(stats.curve_M, stats.curve_mu_M, count, max_tokens, alpha,
                           stats.vocab_size)  # fmt: skip


def curve_floor(mu: torch.Tensor, max_tokens: int, alpha: float, vocab_size: int) -> torch.Tensor:
    """The least log-probability the router's bigram model gives any bigram, per ``mu``, with at
    most ``max_tokens`` fit tokens: ``p >= mu q / (n(u) + mu)``, ``q >= alpha / (N + alpha V)``."""
    n = float(max_tokens)
    return mu.log() + math.log(alpha) - (n + mu).log() - math.log(n + alpha * vocab_size)


def check_curve_bounds(curve_M, mu_M, num_bigrams: float, max_tokens: int, alpha: float,
                       vocab_size: int) -> None:  # fmt: skip
    """A held-out curve is a sum of ``num_bigrams`` log-probabilities: each in [floor, 0]."""
    low_M = num_bigrams * curve_floor(mu_M, max_tokens, alpha, vocab_size)
    if (curve_M > 0).any() or (curve_M < low_M).any():
        raise ValueError(
            f"held-out curve is not a sum of {num_bigrams:.6g} bigram log-probabilities (each in "
            f"[{float(low_M[0]) / max(num_bigrams, 1):.3g}, 0] nats)"
        )


def _validate_pairs(pairs_K3: torch.Tensor, vocab_size: int) -> None:
    if pairs_K3.dtype != torch.int64 or pairs_K3.dim() != 2 or pairs_K3.shape[1] != 3:
        raise ValueError("held-out bigrams must be an int64 tensor [K, 3] (prev, id, count)")
    if pairs_K3.numel() == 0:
        return
    ids = pairs_K3[:, :2]
    if (ids < 0).any() or (ids >= vocab_size).any():
        raise ValueError(f"held-out bigram token ids must be in [0, {vocab_size})")
    if (pairs_K3[:, 2] < 1).any():
        raise ValueError("held-out bigram counts must be positive")
    key = pairs_K3[:, 0] * vocab_size + pairs_K3[:, 1]
    if not (key[1:] > key[:-1]).all():
        raise ValueError("held-out bigrams must be sorted and distinct")


def _validate_curve(curve_M, mu_M, count_1) -> None:
    for name, t in (("curve", curve_M), ("curve_mu", mu_M), ("curve_count", count_1)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.float64:
            raise ValueError(f"held-out {name} must be a 1-D float64 tensor")
        if not torch.isfinite(t).all():
            raise ValueError(f"held-out {name} must be finite")
    if curve_M.shape != mu_M.shape or not 1 <= len(mu_M) <= MAX_CURVE_POINTS:
        raise ValueError(
            f"held-out curve and its mu grid must have the same length in [1, {MAX_CURVE_POINTS}]"
        )
    if (mu_M <= 0).any() or not (mu_M[1:] > mu_M[:-1]).all():
        raise ValueError("held-out curve's mu grid must be positive and increasing")
    if count_1.shape != (1,) or float(count_1) < 0:
        raise ValueError("held-out curve_count must be one non-negative number")


def merge_pairs(a_K3: torch.Tensor | None, b_K3: torch.Tensor | None, sign: int = 1):
    """Sum (or difference) of two sorted bigram-count lists; zero counts are dropped."""
    if a_K3 is None or b_K3 is None:
        raise ValueError("cannot combine held-out n-gram statistics with statistics without pairs")
    both = torch.cat([a_K3, torch.cat([b_K3[:, :2], sign * b_K3[:, 2:]], dim=1)])
    return coalesce_pairs(both)


def coalesce_pairs(pairs_K3: torch.Tensor) -> torch.Tensor:
    """Sorted, distinct ``(prev, id, count)`` rows with equal bigrams summed; zero counts dropped;
    negative ones (removing what was never added) are an error."""
    if pairs_K3.numel() == 0:
        return pairs_K3.reshape(0, 3).long()
    pairs_K3 = pairs_K3.long()
    keys, inverse = torch.unique(pairs_K3[:, :2], dim=0, return_inverse=True)
    counts = torch.zeros(keys.shape[0], dtype=torch.int64).index_add_(0, inverse, pairs_K3[:, 2])
    if (counts < 0).any():
        raise ValueError("held-out bigram counts would become negative")
    keep = counts > 0
    return torch.cat([keys[keep], counts[keep, None]], dim=1).contiguous()


# -- serialisation ---------------------------------------------------------------------------


def ngram_to_bytes(stats: NgramStats) -> bytes:
    index_K = stats.bigram_H.nonzero().squeeze(1)
    tensors = {"unigram": stats.unigram_V, "context": stats.context_V, "bigram_index": index_K,
               "bigram_count": stats.bigram_H[index_K]}  # fmt: skip
    if stats.pairs_K3 is not None:
        tensors["pairs"] = stats.pairs_K3.contiguous()
    if stats.curve_M is not None:
        tensors["curve"], tensors["curve_mu"] = stats.curve_M, stats.curve_mu_M
        tensors["curve_count"] = stats.curve_count_1
    meta = {
        "schema": NGRAM_SCHEMA,
        "feature_map": stats.feature_map,
        "backbone_fingerprint": stats.backbone_fingerprint,
        "expert_fingerprint": stats.expert_fingerprint,
        "extra": json.dumps(stats.extra, sort_keys=True),
    }
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def ngram_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> NgramStats:
    missing = [k for k in ("unigram", "context") if k not in tensors]
    if missing:
        raise ValueError(f"n-gram statistics blob lacks tensor {missing[0]!r}")
    stats = NgramStats(
        tensors["unigram"],
        tensors["context"],
        _dense_bigrams(tensors, meta.get("feature_map", "")),
        feature_map=meta.get("feature_map", ""),
        backbone_fingerprint=meta.get("backbone_fingerprint", ""),
        expert_fingerprint=meta.get("expert_fingerprint", ""),
        extra=parse_extra(meta),
        pairs_K3=tensors.get("pairs"),
        curve_M=tensors.get("curve"),
        curve_mu_M=tensors.get("curve_mu"),
        curve_count_1=tensors.get("curve_count"),
    )
    stats.validate()
    return stats


def _dense_bigrams(tensors: Mapping[str, torch.Tensor], feature_map: str) -> torch.Tensor:
    """The bigram counts [H] of a blob: its dense vector, or its sparse pairs scattered into the
    ``H`` buckets its identity names (non-empty buckets, increasing, each once)."""
    sparse = [k for k in ("bigram_index", "bigram_count") if k in tensors]
    if "bigram" in tensors and not sparse:
        return tensors["bigram"]
    if "bigram" in tensors or len(sparse) != 2:
        raise ValueError("n-gram statistics blob needs either 'bigram' or both 'bigram_index' "
                         "and 'bigram_count'")  # fmt: skip
    buckets = buckets_of(feature_map)
    if buckets is None:
        raise ValueError(f"n-gram statistics have feature map {feature_map!r}, not 'ngram:<H>'")
    index_K, count_K = tensors["bigram_index"], tensors["bigram_count"]
    if not 1 <= buckets <= MAX_BUCKETS:
        raise ValueError(f"n-gram statistics claim {buckets} buckets, at most {MAX_BUCKETS}")
    if index_K.dtype != torch.int64 or count_K.dtype != torch.float64:
        raise ValueError("n-gram bigram_index must be int64 and bigram_count float64")
    if index_K.dim() != 1 or index_K.shape != count_K.shape or len(index_K) > buckets:
        raise ValueError(f"n-gram bigram_index and bigram_count must be 1-D, of one length <= {buckets}")  # fmt: skip
    if len(index_K) and (index_K[0] < 0 or index_K[-1] >= buckets):
        raise ValueError(f"n-gram bigram_index must be in [0, {buckets})")
    if not (index_K[1:] > index_K[:-1]).all() or not (count_K > 0).all():
        raise ValueError("n-gram bigram_index must be increasing, each count positive")
    return torch.zeros(buckets, dtype=torch.float64).index_copy_(0, index_K, count_K)


FILL_WARN = 0.3  # bucket fill beyond which collisions measurably cost routing (docs/routing.md)


def bucket_fill(bigram_EH: torch.Tensor) -> list[float]:
    """Each expert's share of non-empty buckets in the summed bigram table."""
    return (bigram_EH > 0).double().mean(dim=1).tolist()


def fill_warnings(fill: Sequence[float], names: Sequence[str], buckets: int) -> list[str]:
    """One line per expert whose table is fuller than ``FILL_WARN``, with a bucket count of at
    least 4x its distinct bigrams (estimated from the fill, ``n ≈ -H ln(1-f)``)."""
    out = []
    for name, f in zip(names, fill):
        if f > FILL_WARN:
            distinct = max(1.0, -buckets * math.log(max(1.0 - f, 1.0 / buckets)))
            want = min(MAX_BUCKETS, 1 << max(0, math.ceil(math.log2(4 * distinct))))
            out.append(
                f"expert {name} fills {f:.0%} of its {buckets} n-gram buckets (about "
                f"{distinct:,.0f} distinct bigrams): collisions cost routing accuracy; "
                f"rebuild with --ngram-buckets {want}"
            )
    return out


# -- solving and choosing mu ----------------------------------------------------------------


@dataclass(frozen=True)
class NgramTables:
    """The n-gram router of a model: per-expert counts (fp64) and the smoothing it uses."""

    unigram_EV: torch.Tensor
    context_EV: torch.Tensor
    bigram_EH: torch.Tensor
    mu: float
    alpha: float

    @property
    def buckets(self) -> int:
        return self.bigram_EH.shape[1]

    def config(self) -> dict:
        """``routing.ngram`` of the model config."""
        return {"buckets": self.buckets, "mu": self.mu, "alpha": self.alpha}


def per_expert_counts(
    contributions: Mapping[str, tuple[int, NgramStats]], num_experts: int
) -> list[NgramStats]:
    """Each expert's summed counts, contributions added in canonical (sorted-name) order."""
    if not contributions:
        raise ValueError("no contributions to solve routers from")
    totals: list[NgramStats | None] = [None] * num_experts
    for name in sorted(contributions):
        expert, stats = contributions[name]
        if not 0 <= expert < num_experts:
            raise ValueError(f"contribution {name!r} names expert {expert}, have {num_experts}")
        if not isinstance(stats, NgramStats):
            raise ValueError(f"statistics of {name!r} are not n-gram counts")
        totals[expert] = stats if totals[expert] is None else totals[expert] + stats
    missing = [j for j, t in enumerate(totals) if t is None or t.num_tokens < 1]
    if missing:
        raise ValueError(f"experts {missing} have no statistics: every expert needs data")
    return totals


def ngram_tables(
    contributions: Mapping[str, tuple[int, NgramStats]],
    num_experts: int,
    mu: float,
    alpha: float = DEFAULT_ALPHA,
) -> NgramTables:
    if not mu > 0 or not alpha > 0:
        raise ValueError(f"n-gram mu and alpha must be > 0, got {mu}, {alpha}")
    totals = per_expert_counts(contributions, num_experts)
    return NgramTables(
        torch.stack([t.unigram_V for t in totals]),
        torch.stack([t.context_V for t in totals]),
        torch.stack([t.bigram_H for t in totals]),
        float(mu),
        float(alpha),
    )


def noisy_ngram(stats: NgramStats, sigma: float, gen: torch.Generator) -> NgramStats:
    """Noise on the three count vectors, post-processed into counts that pass validation: a
    context count never above its unigram count, bigram counts summing to the context counts."""
    uni_V = dp.noisy_counts(stats.unigram_V, sigma, gen)
    ctx_V = torch.minimum(dp.noisy_counts(stats.context_V, sigma, gen), uni_V)
    big_H = dp.noisy_counts(stats.bigram_H, sigma, gen)
    if not float(uni_V.sum()) > 0:  # everything under the threshold: one count, anywhere
        uni_V[int(torch.argmax(stats.unigram_V + dp.gaussian(uni_V.shape, sigma, gen)))] = 1.0
    if float(big_H.sum()) > 0:
        big_H = dp.rescale_to_total(big_H, float(ctx_V.sum()))
    else:
        ctx_V = torch.zeros_like(ctx_V)
    return stats.with_meta(unigram_V=uni_V, context_V=ctx_V, bigram_H=big_H)
