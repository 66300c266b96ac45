"""Router statistics: per-layer Gram matrices of router features (DESIGN §2).

For one contributor and one MoE layer, the statistic is ``G = Σ f̃ f̃ᵀ`` over the
contributor's real tokens, where ``f̃ = [f, 1]`` and ``f`` is the router feature of a
token (the MLP input ``x`` for the paper's ``token`` feature map). ``G`` is symmetric,
``(F+1)×(F+1)``; its last column is ``Σ f̃`` and ``G[F, F]`` is the token count.

Everything here is pure tensor math: no Ray, no fsspec. Shapes use suffixes:
``L`` layers, ``N`` tokens, ``F`` feature dim, ``P = F + 1`` (features plus the constant).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dume_dist.core import dp

STATS_SCHEMA = "dume-stats/1"


@dataclass(frozen=True)
class RouterStats:
    """Gram matrices of one contribution (or a sum of them), one per MoE layer.

    ``gram_LPP`` is float64. ``feature_map`` names the router features the Gram was
    computed on; statistics of different feature maps never mix. The fingerprints name
    the backbone and expert weights the features came from (empty for sums).
    """

    gram_LPP: torch.Tensor
    feature_map: str = "token"
    backbone_fingerprint: str = ""
    expert_fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.gram_LPP.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.gram_LPP.shape[1] - 1

    @property
    def num_tokens(self) -> int:
        """Token count (the same in every layer for a well-formed contribution)."""
        return int(round(self.gram_LPP[0, -1, -1].item()))

    def _check_compatible(self, other: RouterStats) -> None:
        if self.feature_map != other.feature_map:
            raise ValueError(
                f"cannot combine statistics of feature map {self.feature_map!r} "
                f"with {other.feature_map!r}"
            )
        if self.gram_LPP.shape != other.gram_LPP.shape:
            raise ValueError(
                f"cannot combine statistics of shape {tuple(self.gram_LPP.shape)} "
                f"with {tuple(other.gram_LPP.shape)}"
            )
        check_same_backbone(self.backbone_fingerprint, other.backbone_fingerprint)

    def _combined(self, other: RouterStats, gram_LPP: torch.Tensor) -> RouterStats:
        backbone = self.backbone_fingerprint or other.backbone_fingerprint
        expert = (
            self.expert_fingerprint if self.expert_fingerprint == other.expert_fingerprint else ""
        )
        return RouterStats(gram_LPP, self.feature_map, backbone, expert)

    def __add__(self, other: RouterStats) -> RouterStats:
        self._check_compatible(other)
        return self._combined(other, self.gram_LPP + other.gram_LPP)

    def __sub__(self, other: RouterStats) -> RouterStats:
        self._check_compatible(other)
        return self._combined(other, self.gram_LPP - other.gram_LPP)

    def validate(self, num_layers: int | None = None, feature_dim: int | None = None) -> None:
        """Raise ValueError (one line, naming the problem) unless this is a sound contribution."""
        validate_gram(self.gram_LPP, num_layers, feature_dim)

    def with_meta(self, **kwargs) -> RouterStats:
        return replace(self, **kwargs)

    def privatized(self, held: dict, spec, *, tokens_per_unit: int, clip, gen):
        """Differential privacy of a Gram contribution (``core.private.privatize``): every layer
        of the fit and held-out parts and each part's count is one Gaussian release; symmetric
        noise of the ``clip``-bounded features' sensitivity."""
        if clip is None:
            raise ValueError("Gram statistics need the feature clip they were collected with")
        if spec.unit != "sequence":
            raise ValueError(
                "--dp-unit token does not hold for Gram statistics (one token changes the hidden "
                "states of every later token of its window): use --dp-unit sequence"
            )
        releases = gram_releases(self.num_layers, len(held))
        z = dp.calibrate(spec.epsilon, spec.delta, releases)
        sens_gram, sens_count = dp.gram_sensitivity(clip, tokens_per_unit)
        sigma = {"gram": z * sens_gram, "count": z * sens_count}
        guarantee = dp.Guarantee(
            epsilon=spec.epsilon, delta=spec.delta, unit=spec.unit, noise_multiplier=z,
            num_releases=releases, sensitivity={"gram": sens_gram, "count": sens_count},
            sigma=sigma, clip=float(clip), count_cap=None,
        )  # fmt: skip
        (noisy_fit,) = dp.noisy_grams([self.gram_LPP], sigma["gram"], sigma["count"], gen)
        betas = sorted(held)
        noisy_held = dp.noisy_grams(
            [held[b].gram_LPP for b in betas], sigma["gram"], sigma["count"], gen
        ) if betas else []  # fmt: skip
        out_held = {
            b: dp.with_guarantee(held[b].with_meta(gram_LPP=g), guarantee)
            for b, g in zip(betas, noisy_held)
        }
        return dp.with_guarantee(self.with_meta(gram_LPP=noisy_fit), guarantee), out_held, guarantee


def gram_releases(num_layers: int, num_held_parts: int) -> int:
    """Gaussian releases of a Gram contribution: every layer of every part, one count per part."""
    fit = num_layers + 1
    held = num_held_parts * num_layers + 1 if num_held_parts else 0
    return fit + held


def check_same_backbone(a: str, b: str) -> None:
    """Statistics computed on different backbones never combine (empty: a sum, any backbone)."""
    if a and b and a != b:
        raise ValueError(
            f"cannot combine statistics computed on different backbones ({a[:12]} vs {b[:12]})"
        )


def validate_gram(
    gram_LPP: torch.Tensor, num_layers: int | None = None, feature_dim: int | None = None
) -> None:
    """Check shape, dtype, finiteness, symmetry and token-count consistency."""
    if not isinstance(gram_LPP, torch.Tensor) or gram_LPP.dim() != 3:
        raise ValueError("statistics must be a 3-D tensor [layers, F+1, F+1]")
    num_l, p, q = gram_LPP.shape
    if p != q or p < 2:
        raise ValueError(f"statistics matrices must be square, got {p}x{q}")
    if num_layers is not None and num_l != num_layers:
        raise ValueError(f"statistics have {num_l} layers, the model has {num_layers}")
    if feature_dim is not None and p != feature_dim + 1:
        raise ValueError(f"statistics have feature dim {p - 1}, the model expects {feature_dim}")
    if gram_LPP.dtype != torch.float64:
        raise ValueError(f"statistics must be float64, got {gram_LPP.dtype}")
    if not torch.isfinite(gram_LPP).all():
        raise ValueError("statistics contain NaN or infinite values")
    if not torch.equal(gram_LPP, gram_LPP.transpose(1, 2)):
        raise ValueError("statistics matrices are not symmetric")
    counts_L = gram_LPP[:, -1, -1]
    if (counts_L < 1).any() or not torch.equal(counts_L, counts_L.round()):
        raise ValueError("statistics token count G[F,F] must be a positive integer")
    if not torch.equal(counts_L, counts_L[:1].expand_as(counts_L)):
        raise ValueError("statistics token count differs between layers")
    diag_LP = torch.diagonal(gram_LPP, dim1=1, dim2=2)
    if (diag_LP < 0).any():
        raise ValueError("statistics have a negative diagonal (not a Gram matrix)")


# What one submission may claim: 2**40 tokens (about 10^12). Counts and sums of many
# submissions then stay exact integers in fp64 (below 2**53).
MAX_TOKENS = 2**40
PSD_RTOL = 1e-6  # eigenvalues down to -PSD_RTOL * trace are fp32-product rounding, not an attack
NORM_RTOL = 1e-2  # slack on the per-token feature norm bound (rounding of the norm's output)


def gram_layout(num_layers: int, feature_dim: int) -> dict[str, tuple[str, tuple]]:
    """The safetensors tensors of a Gram statistics blob (`stats_to_bytes`), for
    `core.header.check_layout`."""
    p = feature_dim + 1
    return {"gram_packed": ("F64", (num_layers, p * (p + 1) // 2))}


def check_gram_values(gram_LPP: torch.Tensor, feature_norm_sq_L: torch.Tensor | None = None,
                      max_tokens: int = MAX_TOKENS) -> None:  # fmt: skip
    """What the solve needs of one contribution (after `validate_gram`): a token count within
    ``max_tokens``; per layer, features no larger than a real token's can be (``Σ diag[:F] ≤
    n · feature_norm_sq_L[l]``, the bound on ``|f|²`` of one token that the backbone allows);
    and positive semi-definiteness (Cholesky of ``G + δI``, ``δ = PSD_RTOL · trace``: one
    ``(F+1)³/3`` factorisation per layer). With these, adding the contribution to any others
    keeps ``A + λI`` positive definite and every entry within ``max_tokens · max bound``."""
    n = float(gram_LPP[0, -1, -1])
    if n > max_tokens:
        raise ValueError(f"statistics count {n:.0f} tokens, more than one submission may ({max_tokens})")  # fmt: skip
    diag_LP = torch.diagonal(gram_LPP, dim1=1, dim2=2)
    trace_L = diag_LP.sum(dim=1)
    if feature_norm_sq_L is not None:
        limit_L = n * feature_norm_sq_L.double() * (1 + NORM_RTOL) + NORM_RTOL
        over = (trace_L - n > limit_L).nonzero()
        if len(over):
            raise ValueError(
                f"statistics of layer {int(over[0])} have larger features than the backbone "
                "allows (not a Gram of its tokens)"
            )
    eye = torch.eye(gram_LPP.shape[1], dtype=torch.float64)
    for layer in range(gram_LPP.shape[0]):
        delta = PSD_RTOL * max(float(trace_L[layer]), 1.0)
        _, info = torch.linalg.cholesky_ex(gram_LPP[layer] + delta * eye)
        if int(info) != 0:
            raise ValueError(
                f"statistics of layer {layer} are not positive semi-definite (not a Gram matrix)"
            )


class GramAccumulator:
    """Running per-layer ``Σ f̃ f̃ᵀ``: per-batch products in fp32 (or the input's
    precision), running sums in fp64 so that the order of batches barely matters and
    shard-and-sum equals all-at-once to fp64 rounding."""

    def __init__(self, num_layers: int, feature_dim: int, device: torch.device | str = "cpu"):
        p = feature_dim + 1
        self.feature_dim = feature_dim
        self.gram_LPP = torch.zeros(num_layers, p, p, dtype=torch.float64, device=device)

    def add(self, layer: int, feats_NF: torch.Tensor) -> None:
        """Add the tokens ``feats_NF`` (already masked: real tokens only) to ``layer``."""
        if feats_NF.dim() != 2 or feats_NF.shape[1] != self.feature_dim:
            raise ValueError(
                f"features must be [tokens, {self.feature_dim}], got {tuple(feats_NF.shape)}"
            )
        if feats_NF.shape[0] == 0:
            return
        f_NF = feats_NF if feats_NF.dtype == torch.float64 else feats_NF.float()
        gram_LPP = self.gram_LPP
        # The F×F block is the expensive product: fp32 (tensor cores on GPU), then fp64.
        gram_LPP[layer, :-1, :-1] += (f_NF.T @ f_NF).double()
        sum_F = f_NF.double().sum(dim=0)
        gram_LPP[layer, :-1, -1] += sum_F
        gram_LPP[layer, -1, :-1] += sum_F
        gram_LPP[layer, -1, -1] += f_NF.shape[0]

    def merge_(self, other_LPP: torch.Tensor) -> None:
        self.gram_LPP += other_LPP.to(self.gram_LPP.device, torch.float64)

    def result(self, **meta) -> RouterStats:
        # Symmetrise exactly: the fp32 block product is symmetric in exact arithmetic
        # but BLAS may round the two triangles differently.
        g_LPP = self.gram_LPP.cpu()
        g_LPP = torch.triu(g_LPP) + torch.triu(g_LPP, diagonal=1).transpose(1, 2)
        return RouterStats(g_LPP, **meta)


def add_stats(total: RouterStats | None, stats: RouterStats) -> RouterStats:
    """``total + stats`` with ``total``'s matrices updated in place (a copy of ``stats`` when
    ``total`` is None): the same fp64 additions as ``+``, so a running sum is bit-identical to
    summing all at once in the same order, and holds one running sum, not a new one per step."""
    if type(stats) is not RouterStats:  # other statistics types add out of place
        return stats if total is None else total + stats
    if total is None:
        return replace(stats, gram_LPP=stats.gram_LPP.clone())
    total._check_compatible(stats)
    return total._combined(stats, total.gram_LPP.add_(stats.gram_LPP))


def sum_stats(contributions: Mapping[str, RouterStats]) -> RouterStats:
    """Sum contributions in canonical order (sorted key), so the result is
    bit-identical whatever order they arrived in, and removing one contribution and
    summing again equals a build that never had it. Reads one contribution at a time."""
    if not contributions:
        raise ValueError("no statistics to sum")
    total = None
    for key in sorted(contributions):
        total = add_stats(total, contributions[key])
    return total


# -- serialisation: symmetric packing into safetensors ------------------------------


def pack_symmetric(gram_LPP: torch.Tensor) -> torch.Tensor:
    """Upper triangle (row-major) of each matrix: [L, P(P+1)/2]."""
    p = gram_LPP.shape[-1]
    rows, cols = torch.triu_indices(p, p)
    return gram_LPP[:, rows, cols].contiguous()


def unpack_symmetric(packed_LT: torch.Tensor, p: int) -> torch.Tensor:
    num_l, t = packed_LT.shape
    if t != p * (p + 1) // 2:
        raise ValueError(
            f"packed statistics have {t} entries per layer, expected {p * (p + 1) // 2}"
        )
    rows, cols = torch.triu_indices(p, p)
    gram_LPP = torch.zeros(num_l, p, p, dtype=packed_LT.dtype)
    gram_LPP[:, rows, cols] = packed_LT
    gram_LPP[:, cols, rows] = packed_LT
    return gram_LPP


def gram_to_bytes(stats: RouterStats) -> bytes:
    """One statistics blob (safetensors, schema ``STATS_SCHEMA``): the packed Grams."""
    meta = {
        "schema": STATS_SCHEMA,
        "feature_map": stats.feature_map,
        "feature_dim": str(stats.feature_dim),
        "num_layers": str(stats.num_layers),
        "backbone_fingerprint": stats.backbone_fingerprint,
        "expert_fingerprint": stats.expert_fingerprint,
        "extra": json.dumps(stats.extra, sort_keys=True),
    }
    return st_save({"gram_packed": pack_symmetric(stats.gram_LPP)}, metadata=meta)


def gram_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> RouterStats:
    """Decode and validate the tensors and metadata of a ``STATS_SCHEMA`` blob."""
    if meta.get("schema") != STATS_SCHEMA or "gram_packed" not in tensors:
        raise ValueError(f"statistics blob has an unknown schema {str(meta.get('schema'))[:40]!r}")
    missing = [k for k in ("feature_dim", "num_layers", "feature_map") if k not in meta]
    if missing:
        raise ValueError(f"statistics blob metadata lacks {missing[0]!r}")
    p = int(meta["feature_dim"]) + 1
    gram_LPP = unpack_symmetric(tensors["gram_packed"], p)
    stats = RouterStats(
        gram_LPP,
        feature_map=meta["feature_map"],
        backbone_fingerprint=meta.get("backbone_fingerprint", ""),
        expert_fingerprint=meta.get("expert_fingerprint", ""),
        extra=parse_extra(meta),
    )
    stats.validate(num_layers=int(meta["num_layers"]))
    return stats


MAX_EXTRA_CHARS = 1 << 16


def parse_extra(meta) -> dict:
    """A blob's free-form ``extra`` metadata: a JSON object of at most 64 KiB (deeply nested or
    oversized JSON is refused with a one-line ValueError, never a RecursionError)."""
    text = meta.get("extra") or "{}"
    if not isinstance(text, str) or len(text) > MAX_EXTRA_CHARS:
        raise ValueError(f"statistics metadata 'extra' is larger than {MAX_EXTRA_CHARS} characters")
    try:
        extra = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("statistics metadata 'extra' is not valid JSON") from None
    if not isinstance(extra, dict):
        raise ValueError("statistics metadata 'extra' must be a JSON object")
    return extra


def gram_from_bytes(data: bytes) -> RouterStats:
    """Decode and validate a Gram blob; a corrupt or foreign blob raises a one-line ValueError."""
    try:
        tensors = st_load(data)
        meta = _read_metadata(data)
    except Exception as exc:  # safetensors raises several types
        raise ValueError(f"statistics blob is not valid safetensors: {exc}") from None
    return gram_from_tensors(tensors, meta)


def _read_metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def save_stats(stats: RouterStats, path) -> None:
    with open(path, "wb") as f:
        f.write(gram_to_bytes(stats))


def load_stats(path) -> RouterStats:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"statistics file not found: {path}") from None
    return gram_from_bytes(data)
