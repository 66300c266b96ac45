"""``dume export --format mixtral`` of an existing DUME directory: its configs, tensors and
statistics are opened as a ``model.formats.CheckpointInput`` and written by the ``mixtral``
back end (``model/formats/mixtral.py``, which ``dume build --format mixtral`` uses directly,
without a DUME directory). The back end's docstring says what Mixtral can represent.

``load_dume_with_bias_free_routers`` builds the DUME model with the routers a Mixtral export
holds: the reference the export is numerically equal to (in fp32).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from dume_dist.core.solve import Router
from dume_dist.model.experts import SAFETENSORS_DTYPES, TensorInfo, load_tensor, read_weight_index
from dume_dist.model.formats.base import BuildStats, CheckpointInput, Provenance, WriteOptions
from dume_dist.model.formats.mixtral import EXPORT_INFO_NAME, LAYOUTS, MixtralFormat
from dume_dist.model.kinds import load_stats
from dume_dist.model.routing import RoutingSpec, SolvedRouting
from dume_dist.model.writer import (
    DEFAULT_SHARD_BYTES,
    MANIFEST_NAME,
    ShardedWriter,
    check_output_dir,
    verify_checkpoint,
)

__all__ = ["EXPORT_INFO_NAME", "LAYOUTS", "ShardedWriter", "export_mixtral"]
STATS_DIR = "stats"
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")
# per-layer routers, and sequence-level routers (top-level modules beside model. and lm_head.)
_ROUTER_KEY = re.compile(r"^model\.layers\.\d+\.mlp\.router\.|^(?!model\.|lm_head\.)")


@dataclass(frozen=True)
class DumeCheckpoint:
    """A DUME model directory opened for reading: configs, tensor index, manifest."""

    path: Path
    config: PretrainedConfig  # DumeConfig
    dense: PretrainedConfig  # the experts' own config (LlamaConfig, MistralConfig, ...)
    index: dict[str, TensorInfo]
    manifest: dict

    @property
    def num_layers(self) -> int:
        return self.dense.num_hidden_layers

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.index:
            raise ValueError(f"DUME checkpoint {self.path} has no tensor {name}")
        return load_tensor(self.index[name], name)


def read_dume_checkpoint(dume_dir: str | Path, verify: bool = False) -> DumeCheckpoint:
    """Open a DUME model directory; raise a one-line ValueError if it is not one. ``verify``
    checks every file against the manifest's checksums first (and requires a manifest)."""
    from dume_dist.model.modeling_dume import DumeConfig

    path = Path(dume_dir)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"no config.json in {path}")
    try:
        raw = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ValueError(f"cannot read {config_path}: {exc}") from None
    if raw.get("model_type") != "dume":
        raise ValueError(
            f"{path} is not a DUME checkpoint (model_type {raw.get('model_type')!r}, expected 'dume')"
        )
    try:
        config = DumeConfig.from_pretrained(str(path))
        dense = config.build_base_config()
    except Exception as exc:  # transformers raises several types for bad configs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read the DUME config in {path}: {first}") from None
    manifest_path = path / MANIFEST_NAME
    manifest = {}
    if verify:
        manifest = verify_checkpoint(path)
    elif manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise ValueError(f"cannot read {manifest_path}: {exc}") from None
    return DumeCheckpoint(path, config, dense, read_weight_index(path), manifest)


# -- the checkpoint as a build's input -------------------------------------------------------------


class _CheckpointBackbone:
    """The checkpoint's non-expert, non-router tensors, read one at a time."""

    def __init__(self, ckpt: DumeCheckpoint):
        self.ckpt = ckpt
        self.config = ckpt.dense
        self._names = sorted(
            n for n in ckpt.index if not _EXPERT_KEY.match(n) and not _ROUTER_KEY.match(n)
        )

    def names(self) -> list[str]:
        return list(self._names)

    def tensor(self, name: str) -> torch.Tensor:
        return self.ckpt.tensor(name)

    def provenance(self) -> dict:
        return dict(self.ckpt.manifest.get("backbone") or {})


class _CheckpointExpert:
    """Expert ``j`` of the checkpoint under the dense model's MLP names."""

    def __init__(self, ckpt: DumeCheckpoint, j: int):
        self.ckpt, self.j = ckpt, j
        self.name = ckpt.config.expert_names[j]
        self.path = ckpt.path
        self.model_type = ckpt.dense.model_type
        self._source: dict[str, str] = {}
        for key in ckpt.index:
            m = _EXPERT_KEY.match(key)
            if m and int(m.group(2)) == j:
                self._source[f"model.layers.{m.group(1)}.mlp.{m.group(3)}"] = key
        self.index = {n: ckpt.index[k] for n, k in self._source.items()}

    def mlp_names(self) -> list[str]:
        return sorted(self._source)

    def mlp_names_of_layer(self, layer: int) -> list[str]:
        return [n for n in self.mlp_names() if n.startswith(f"model.layers.{layer}.mlp.")]

    def tensor(self, name: str) -> torch.Tensor:
        return self.ckpt.tensor(self._source[name])


class _SavedStats(Mapping):
    """Each expert's statistics, loaded (and validated) when read: from ``stats_dir`` (what
    ``dume build --save-stats DIR`` keeps, ``<name>/fit.safetensors``), else from an older
    checkpoint's own ``stats/``."""

    def __init__(self, ckpt: DumeCheckpoint, stats_dir: str | Path | None = None):
        self.ckpt = ckpt
        self.names = list(ckpt.config.expert_names)
        self.stats_dir = None if stats_dir is None else Path(stats_dir)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __getitem__(self, name: str):
        path = self.ckpt.path / STATS_DIR / f"{name}.safetensors"
        if self.stats_dir is not None:
            path = self.stats_dir / name / "fit.safetensors"
        if name not in self.names:
            raise KeyError(name)
        if not path.is_file():
            raise ValueError(
                f"cannot solve bias-free routers: no statistics for expert {name!r} ({path} "
                "missing; statistics are kept outside models: pass the --save-stats directory)"
            )
        stats = load_stats(path)
        if stats.feature_map != "token":
            raise ValueError(
                f"statistics {path} are of feature map {stats.feature_map!r}, not 'token'"
            )
        stats.validate(num_layers=self.ckpt.num_layers, feature_dim=self.ckpt.dense.hidden_size)
        return stats


def _recorded_routing(ckpt: DumeCheckpoint, lam: float) -> SolvedRouting:
    """The checkpoint's routing settings as a ``SolvedRouting`` (no router tensors)."""
    routing = ckpt.config.routing or {}
    named = {k: routing[k] for k in ("kind", "features", "solver", "smoothing", "priors")
             if k in routing}  # fmt: skip
    try:
        spec = RoutingSpec(kind=named.pop("kind", None), **named, lam=lam if lam > 0 else 1.0)
    except ValueError as exc:
        raise ValueError(f"cannot read the routing of {ckpt.path}: {exc}") from None
    return SolvedRouting([], spec, lam, float(getattr(spec, "smoothing", 0.0)), None)


def checkpoint_input(
    ckpt: DumeCheckpoint, *, lam: float, temperature: float, top_k: int, stats_dir=None
) -> CheckpointInput:
    return CheckpointInput(
        backbone=_CheckpointBackbone(ckpt),
        experts=[_CheckpointExpert(ckpt, j) for j in range(ckpt.num_experts)],
        routing=_recorded_routing(ckpt, lam),
        top_k=top_k,
        temperature=temperature,
        dtype=checkpoint_dtype(ckpt),
        stats=BuildStats(fit=_SavedStats(ckpt, stats_dir), save=False),
        provenance=Provenance(
            domains={
                e["name"]: e.get("domain", e["name"]) for e in ckpt.manifest.get("experts", [])
            },
            expert_fingerprints={
                e["name"]: e.get("expert_fingerprint", "") for e in ckpt.manifest.get("experts", [])
            },
            extra_manifest={"source_manifest_sha256": _manifest_sha256(ckpt.path)},
        ),
        tokenizer_dir=ckpt.path,
    )


def check_mixtral_compatible(ckpt: DumeCheckpoint) -> None:
    """Raise a one-line ValueError naming the first thing a Mixtral checkpoint cannot hold."""
    lam = ckpt.manifest.get("lam")
    lam = float(lam) if isinstance(lam, (int, float)) and not isinstance(lam, bool) else 1.0
    inp = checkpoint_input(ckpt, lam=lam, temperature=1.0, top_k=1)
    reason = MixtralFormat().unsupported(inp)
    if reason:
        raise ValueError(f"cannot export to Mixtral: {reason}")


# -- routers --------------------------------------------------------------------------------------


def recorded_lam(ckpt: DumeCheckpoint) -> float:
    """The ridge λ the DUME routers were solved with (``lam`` in the manifest)."""
    lam = ckpt.manifest.get("lam")
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not lam > 0:
        raise ValueError(f"{ckpt.path / MANIFEST_NAME} records no valid lam: pass lam explicitly")
    return float(lam)


def _bias_free_routers(ckpt: DumeCheckpoint, lam: float, stats_dir=None) -> list[Router]:
    inp = checkpoint_input(ckpt, lam=lam, temperature=1.0, top_k=1, stats_dir=stats_dir)
    return MixtralFormat().gates(inp)


def bias_free_routers(
    dume_dir: str | Path, lam: float | None = None, stats_dir: str | Path | None = None
) -> list[Router]:
    """Per layer, the ridge router without intercept solved from the checkpoint's statistics
    (fp64, unit-norm rows, temperature not applied). ``lam`` defaults to the manifest's."""
    ckpt = read_dume_checkpoint(dume_dir)
    gates = _bias_free_routers(ckpt, recorded_lam(ckpt) if lam is None else float(lam), stats_dir)
    return [Router(g, None) for g in gates]


def load_dume_with_bias_free_routers(
    dume_dir: str | Path,
    *,
    lam: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    stats_dir: str | Path | None = None,
    **from_pretrained_kwargs,
):
    """The DUME model of ``dume_dir`` with every router replaced by the bias-free solution (bias
    zero), and optionally another temperature / k: the model a Mixtral export of the same
    arguments is numerically equal to (in fp32)."""
    from dume_dist.model.modeling_dume import DumeForCausalLM

    ckpt = read_dume_checkpoint(dume_dir)
    gates = _bias_free_routers(ckpt, recorded_lam(ckpt) if lam is None else float(lam), stats_dir)
    temperature, top_k = _routing_settings(ckpt, temperature, top_k)
    model = DumeForCausalLM.from_pretrained(str(dume_dir), **from_pretrained_kwargs)
    with torch.no_grad():
        for layer, gate in zip(model.model.layers, gates):
            block = layer.mlp
            block.router.weight.copy_(gate.to(block.router.weight.dtype))
            if block.router.bias is not None:
                block.router.bias.zero_()
            block.temperature = temperature
            block.top_k = top_k
    model.config.router_temperature = temperature
    model.config.num_experts_per_tok = top_k
    return model


def _routing_settings(
    ckpt: DumeCheckpoint, temperature: float | None, top_k: int | None
) -> tuple[float, int]:
    temperature = ckpt.config.router_temperature if temperature is None else temperature
    top_k = ckpt.config.num_experts_per_tok if top_k is None else top_k
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature > 0
    ):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= ckpt.num_experts:
        raise ValueError(f"top_k must be an integer in [1, {ckpt.num_experts}], got {top_k!r}")
    return float(temperature), top_k


def _torch_dtype(value) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value not in ("", "auto"):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        return dtype if isinstance(dtype, torch.dtype) else None
    return None


def checkpoint_dtype(ckpt: DumeCheckpoint) -> torch.dtype:
    """The DUME checkpoint's dtype: its config's, else its dense config's, else the stored
    embedding's."""
    for value in (ckpt.config.dtype, (ckpt.config.base_config or {}).get("dtype")):
        dtype = _torch_dtype(value)
        if dtype is not None:
            return dtype
    return SAFETENSORS_DTYPES[ckpt.index["model.embed_tokens.weight"].dtype]


def export_mixtral(
    dume_dir: str | Path,
    out_dir: str | Path,
    *,
    lam: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    layout: str = "per_expert",
    overwrite: bool = False,
    verify: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    stats_dir: str | Path | None = None,
) -> Path:
    """Write ``dume_dir`` as a ``MixtralForCausalLM`` checkpoint at ``out_dir``; returns it.

    Gates: ridge without intercept re-solved from the statistics in ``stats_dir`` (the build's
    ``--save-stats`` directory; an older checkpoint's own ``stats/`` without it) with ``lam`` (default: the
    manifest's), divided by ``temperature`` (default: the DUME config's); ``top_k`` defaults to
    the DUME config's k. ``layout``: ``"per_expert"`` (hub layout) or ``"fused"``. ``verify``:
    check the source files against its manifest's checksums first. Everything is checked before
    anything is written; the directory appears atomically, complete, or not at all.
    """
    fmt = MixtralFormat(layout)
    if Path(out_dir).resolve() == Path(dume_dir).resolve():
        raise ValueError(f"cannot export {dume_dir} onto itself: choose another output directory")
    check_output_dir(out_dir, overwrite)
    ckpt = read_dume_checkpoint(dume_dir, verify=verify)
    check_mixtral_compatible(ckpt)
    lam = recorded_lam(ckpt) if lam is None else float(lam)
    temperature, top_k = _routing_settings(ckpt, temperature, top_k)
    inp = checkpoint_input(ckpt, lam=lam, temperature=temperature, top_k=top_k, stats_dir=stats_dir)
    fmt.write(inp, out_dir, WriteOptions(overwrite=overwrite, max_shard_bytes=max_shard_bytes))
    return Path(out_dir)


def _manifest_sha256(path: Path) -> str | None:
    manifest = path / MANIFEST_NAME
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
