"""``--format mixtral``: a DUME checkpoint as a standard ``MixtralForCausalLM`` checkpoint.

The exported directory loads with ``AutoModelForCausalLM.from_pretrained(dir)`` (no remote code)
in transformers v5, and in the tools that read hub Mixtral checkpoints (transformers v4, vLLM,
llama.cpp's converter), because its tensors use the names hub Mixtral checkpoints use and that
transformers v5.23's own ``MixtralForCausalLM.save_pretrained`` writes.

What Mixtral can represent, and how DUME maps onto it
-----------------------------------------------------
* Dense family: llama or mistral, with ``silu`` MLPs, no attention or MLP biases. Anything else
  is refused with a one-line ValueError before anything is written.
* Router: Mixtral computes ``logits = W x`` (no bias), softmax over all experts, top-k, and
  renormalises the k probabilities — which equals a softmax over the k chosen logits, exactly
  DUME's routing rule. It has no intercept and no temperature, so the exported router is the
  ridge solution **without intercept** (``solve_routers(..., bias=False)``) re-solved from the
  statistics saved in the DUME checkpoint (``stats/<expert name>.safetensors``), rows normalised
  as usual, with the temperature folded in: ``W / T``. It is *not* DUME's router with the bias
  dropped. ``load_dume_with_bias_free_routers`` builds the DUME model with the same routers, the
  reference the export is numerically equal to.
* Router precision: Mixtral's gate runs in the model's dtype (DUME's routers run in fp32), so a
  bf16 export can pick a different expert where two logits nearly tie; fp32 is exact.
* Experts: expert ``j``'s ``gate_proj / up_proj / down_proj`` become Mixtral's ``w1 / w3 / w2``.
* Everything else (attention, norms, embeddings, lm_head, rope parameters — Llama-3 scaling
  included —, token ids, tied embeddings, sliding window for mistral) is carried over unchanged.

Tensor layouts (verified against transformers 5.23 ``modeling_mixtral.py`` and
``conversion_mapping.py``):

``per_expert`` (default; what ``save_pretrained`` writes and hub checkpoints use)
    ``model.layers.{l}.block_sparse_moe.gate.weight`` [E, H];
    ``model.layers.{l}.block_sparse_moe.experts.{j}.w1.weight`` [I, H] (gate_proj),
    ``.w3.weight`` [I, H] (up_proj), ``.w2.weight`` [H, I] (down_proj).
    v5 converts these on load: ``block_sparse_moe`` -> ``mlp``, ``w1``/``w3`` stacked over experts
    and concatenated (gate first) into ``mlp.experts.gate_up_proj``, ``w2`` stacked into
    ``mlp.experts.down_proj``.
``fused`` (v5's in-memory parameter names; loads in transformers v5 only)
    ``model.layers.{l}.mlp.gate.weight`` [E, H];
    ``model.layers.{l}.mlp.experts.gate_up_proj`` [E, 2I, H] = ``cat([gate_proj, up_proj], 0)``
    per expert (v5 splits the product with ``.chunk(2, dim=-1)``: gate first);
    ``model.layers.{l}.mlp.experts.down_proj`` [E, H, I] (each an ``nn.Linear`` weight).

Tensors are streamed one layer at a time into safetensors shards; the directory is published
atomically (temporary directory + ``os.replace``), nothing is left behind on error.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import MixtralConfig, PretrainedConfig

from dume_dist.core.solve import Router, solve_routers
from dume_dist.core.stats import load_stats
from dume_dist.model.experts import (
    SAFETENSORS_DTYPES,
    TOKENIZER_FILES,
    TensorInfo,
    load_tensor,
    read_weight_index,
)
from dume_dist.model.writer import (
    DEFAULT_SHARD_BYTES,
    MANIFEST_NAME,
    ShardedWriter,
    atomic_directory,
    check_output_dir,
    verify_checkpoint,
)

SUPPORTED_FAMILIES = ("llama", "mistral")
LAYOUTS = ("per_expert", "fused")
STATS_DIR = "stats"
EXPORT_INFO_NAME = "dume_export.json"
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")
# Mixtral per-expert names of the dense MLP's projections.
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


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


# -- what Mixtral can represent -------------------------------------------------------------------


def check_mixtral_compatible(ckpt: DumeCheckpoint) -> None:
    """Raise a one-line ValueError naming the first thing a Mixtral checkpoint cannot hold."""
    dense = ckpt.dense
    family = dense.model_type
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"cannot export to Mixtral: experts of family {family!r} are not supported "
            f"(Mixtral holds {' or '.join(SUPPORTED_FAMILIES)} experts)"
        )
    if getattr(dense, "attention_bias", False):
        raise ValueError("cannot export to Mixtral: the experts have attention_bias=True")
    if getattr(dense, "mlp_bias", False):
        raise ValueError("cannot export to Mixtral: the experts have mlp_bias=True")
    if dense.hidden_act != "silu":
        raise ValueError(
            f"cannot export to Mixtral: the experts' hidden_act is {dense.hidden_act!r}, "
            "Mixtral runtimes assume 'silu'"
        )
    rope = getattr(dense, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope or "rope_theta" not in rope:
        raise ValueError(
            f"cannot export to Mixtral: unsupported rope_parameters {rope!r} "
            "(expected one dict with rope_type and rope_theta)"
        )
    routing = ckpt.config.routing or {}
    if routing.get("features", "token") != "token":
        raise ValueError(
            f"cannot export to Mixtral: routing features {routing.get('features')!r} "
            "(Mixtral's gate reads the MLP input: only 'token' features)"
        )
    if routing.get("smoothing", 0.0) or routing.get("solver", "ridge") != "ridge":
        raise ValueError(
            "cannot export to Mixtral: routing with smoothing or a non-ridge solver "
            f"(smoothing={routing.get('smoothing', 0.0)}, solver={routing.get('solver', 'ridge')!r}); "
            "Mixtral's gate is a plain linear map of the MLP input"
        )
    _check_tensor_names(ckpt)


def _expected_tensors(ckpt: DumeCheckpoint) -> dict[str, tuple[int, ...] | None]:
    """Every tensor name a Mixtral-exportable DUME checkpoint holds, with the shapes we rely on."""
    dense = ckpt.dense
    hid, inter, num_e = dense.hidden_size, dense.intermediate_size, ckpt.num_experts
    out: dict[str, tuple[int, ...] | None] = {
        "model.embed_tokens.weight": (dense.vocab_size, hid),
        "model.norm.weight": (hid,),
    }
    if not dense.tie_word_embeddings:
        out["lm_head.weight"] = (dense.vocab_size, hid)
    for layer in range(ckpt.num_layers):
        pre = f"model.layers.{layer}"
        for proj in _ATTN:
            out[f"{pre}.self_attn.{proj}.weight"] = None  # shapes: Mixtral's attention = Llama's
        out[f"{pre}.input_layernorm.weight"] = (hid,)
        out[f"{pre}.post_attention_layernorm.weight"] = (hid,)
        out[f"{pre}.mlp.router.weight"] = (num_e, hid)
        for j in range(num_e):
            out[f"{pre}.mlp.experts.{j}.gate_proj.weight"] = (inter, hid)
            out[f"{pre}.mlp.experts.{j}.up_proj.weight"] = (inter, hid)
            out[f"{pre}.mlp.experts.{j}.down_proj.weight"] = (hid, inter)
    return out


def _check_tensor_names(ckpt: DumeCheckpoint) -> None:
    expected = _expected_tensors(ckpt)
    for name, shape in expected.items():
        if name not in ckpt.index:
            raise ValueError(f"DUME checkpoint {ckpt.path} has no tensor {name}")
        if shape is not None and tuple(ckpt.index[name].shape) != shape:
            raise ValueError(
                f"DUME checkpoint tensor {name} has shape {tuple(ckpt.index[name].shape)}, "
                f"expected {shape}"
            )
    # Router biases are replaced by the bias-free solve; a tied lm_head copy is redundant.
    ignored = {f"model.layers.{layer}.mlp.router.bias" for layer in range(ckpt.num_layers)}
    if ckpt.dense.tie_word_embeddings:
        ignored.add("lm_head.weight")
    for name in sorted(ckpt.index):
        if name not in expected and name not in ignored:
            raise ValueError(
                f"cannot export to Mixtral: tensor {name} has no place in a Mixtral model"
            )


# -- routers --------------------------------------------------------------------------------------


def recorded_lam(ckpt: DumeCheckpoint) -> float:
    """The ridge λ the DUME routers were solved with (``lam`` in the manifest)."""
    lam = ckpt.manifest.get("lam")
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not lam > 0:
        raise ValueError(f"{ckpt.path / MANIFEST_NAME} records no valid lam: pass lam explicitly")
    return float(lam)


def _bias_free_routers(ckpt: DumeCheckpoint, lam: float) -> list[Router]:
    names = list(ckpt.config.expert_names)
    contributions = {}
    for j, name in enumerate(names):
        path = ckpt.path / STATS_DIR / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(
                f"cannot solve bias-free routers: no statistics for expert {name!r} ({path} missing)"
            )
        stats = load_stats(path)
        if stats.feature_map != "token":
            raise ValueError(
                f"statistics {path} are of feature map {stats.feature_map!r}, not 'token'"
            )
        stats.validate(num_layers=ckpt.num_layers, feature_dim=ckpt.dense.hidden_size)
        contributions[name] = (j, stats)
    return solve_routers(contributions, len(names), lam=lam, bias=False)


def bias_free_routers(dume_dir: str | Path, lam: float | None = None) -> list[Router]:
    """Per layer, the ridge router without intercept solved from the checkpoint's statistics
    (fp64, unit-norm rows, temperature not applied). ``lam`` defaults to the manifest's."""
    ckpt = read_dume_checkpoint(dume_dir)
    return _bias_free_routers(ckpt, recorded_lam(ckpt) if lam is None else float(lam))


def load_dume_with_bias_free_routers(
    dume_dir: str | Path,
    *,
    lam: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    **from_pretrained_kwargs,
):
    """The DUME model of ``dume_dir`` with every router replaced by the bias-free solution (bias
    zero), and optionally another temperature / k: the model a Mixtral export of the same
    arguments is numerically equal to (in fp32)."""
    from dume_dist.model.modeling_dume import DumeForCausalLM

    ckpt = read_dume_checkpoint(dume_dir)
    routers = _bias_free_routers(ckpt, recorded_lam(ckpt) if lam is None else float(lam))
    temperature, top_k = _routing_settings(ckpt, temperature, top_k)
    model = DumeForCausalLM.from_pretrained(str(dume_dir), **from_pretrained_kwargs)
    with torch.no_grad():
        for layer, router in zip(model.model.layers, routers):
            block = layer.mlp
            block.router.weight.copy_(router.weight_EF.to(block.router.weight.dtype))
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


# -- the Mixtral checkpoint -----------------------------------------------------------------------


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


def mixtral_config(ckpt: DumeCheckpoint, *, top_k: int, dtype: torch.dtype) -> MixtralConfig:
    """The ``MixtralConfig`` of the export: the dense config's shape, rope and token settings."""
    dense = ckpt.dense
    head_dim = getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads
    sliding = getattr(dense, "sliding_window", None) if dense.model_type == "mistral" else None
    return MixtralConfig(
        architectures=["MixtralForCausalLM"],
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads or dense.num_attention_heads,
        head_dim=head_dim,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        initializer_range=dense.initializer_range,
        rms_norm_eps=dense.rms_norm_eps,
        use_cache=dense.use_cache,
        pad_token_id=dense.pad_token_id,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        tie_word_embeddings=bool(dense.tie_word_embeddings),
        sliding_window=sliding,
        attention_dropout=dense.attention_dropout or 0.0,
        num_experts_per_tok=top_k,
        num_local_experts=ckpt.num_experts,
        output_router_logits=False,
        router_jitter_noise=0.0,
        # Always explicit (rope_theta included): Mixtral's default theta is 1e6, Llama's 1e4.
        rope_parameters=json.loads(json.dumps(dense.rope_parameters)),
        dtype=str(dtype).removeprefix("torch."),
    )


def _write_tensors(
    ckpt: DumeCheckpoint,
    writer: ShardedWriter,
    gates: list[torch.Tensor],
    dtype: torch.dtype,
    layout: str,
) -> None:
    def copy(name: str, out_name: str | None = None) -> None:
        writer.add(out_name or name, ckpt.tensor(name).to(dtype))

    copy("model.embed_tokens.weight")
    for layer in range(ckpt.num_layers):
        pre = f"model.layers.{layer}"
        copy(f"{pre}.input_layernorm.weight")
        for proj in _ATTN:
            copy(f"{pre}.self_attn.{proj}.weight")
        copy(f"{pre}.post_attention_layernorm.weight")
        experts = [f"{pre}.mlp.experts.{j}" for j in range(ckpt.num_experts)]
        if layout == "per_expert":
            moe = f"{pre}.block_sparse_moe"
            writer.add(f"{moe}.gate.weight", gates[layer].to(dtype))
            for j, expert in enumerate(experts):
                for param in _EXPERT_PARAMS:
                    copy(
                        f"{expert}.{param}.weight",
                        f"{moe}.experts.{j}.{_MIXTRAL_NAMES[param]}.weight",
                    )
        else:
            writer.add(f"{pre}.mlp.gate.weight", gates[layer].to(dtype))
            gate_up_EIH = torch.stack(
                [
                    torch.cat(
                        [ckpt.tensor(f"{e}.gate_proj.weight"), ckpt.tensor(f"{e}.up_proj.weight")]
                    ).to(dtype)
                    for e in experts
                ]
            )
            writer.add(f"{pre}.mlp.experts.gate_up_proj", gate_up_EIH)
            del gate_up_EIH
            down_EHI = torch.stack(
                [ckpt.tensor(f"{e}.down_proj.weight").to(dtype) for e in experts]
            )
            writer.add(f"{pre}.mlp.experts.down_proj", down_EHI)
            del down_EHI
    copy("model.norm.weight")
    if not ckpt.dense.tie_word_embeddings:
        copy("lm_head.weight")


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
) -> Path:
    """Write ``dume_dir`` as a ``MixtralForCausalLM`` checkpoint at ``out_dir``; returns it.

    Routers: ridge without intercept re-solved from ``dume_dir/stats`` with ``lam`` (default: the
    manifest's), divided by ``temperature`` (default: the DUME config's); ``top_k`` defaults to
    the DUME config's k. ``layout``: ``"per_expert"`` (hub layout, default) or ``"fused"`` (v5
    parameter names). ``verify``: check the source files against its manifest's checksums first.
    Everything is checked before anything is written; the directory appears atomically,
    complete, or not at all.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if Path(out_dir).resolve() == Path(dume_dir).resolve():
        raise ValueError(f"cannot export {dume_dir} onto itself: choose another output directory")
    check_output_dir(out_dir, overwrite)
    ckpt = read_dume_checkpoint(dume_dir, verify=verify)
    check_mixtral_compatible(ckpt)
    lam = recorded_lam(ckpt) if lam is None else float(lam)
    temperature, top_k = _routing_settings(ckpt, temperature, top_k)
    routers = _bias_free_routers(ckpt, lam)
    gates = [router.weight_EF / temperature for router in routers]  # fp64 until written
    dtype = checkpoint_dtype(ckpt)
    config = mixtral_config(ckpt, top_k=top_k, dtype=dtype)
    info = {
        "format": "mixtral",
        "layout": layout,
        "source_manifest_sha256": _manifest_sha256(ckpt.path),
        "expert_names": list(ckpt.config.expert_names),
        "lam": lam,
        "temperature": temperature,
        "top_k": top_k,
        "router": "ridge without intercept from the DUME statistics, unit-norm rows, divided by T",
    }
    with atomic_directory(out_dir, overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        _write_tensors(ckpt, writer, gates, dtype, layout)
        writer.close()
        config.save_pretrained(str(tmp))
        for fname in (*TOKENIZER_FILES, "generation_config.json"):
            if (ckpt.path / fname).is_file():
                shutil.copyfile(ckpt.path / fname, tmp / fname)
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return Path(out_dir)


def _manifest_sha256(path: Path) -> str | None:
    manifest = path / MANIFEST_NAME
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
