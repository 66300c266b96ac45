"""Single-machine MoErge: dense experts + their domain text → one DUME model directory.

Order of work: validate every input (experts, data, options, output path) before anything is
written; build the backbone; for each expert in order run its dense model (backbone + its own MLPs
= the MoE with it forced) over its data and collect statistics; solve the routers in closed form;
write the checkpoint atomically.

Statistics: returned in ``BuildResult.stats`` and, unless ``save_stats=False``, stored in the
output directory as ``stats/<name>.safetensors`` (``dume_dist.core.stats`` blobs, listed in the
manifest), so a later build can add or remove experts without recomputing the others. They are
Gram matrices of the experts' data; leave them out of a model published to untrusted readers.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from dume_dist.core.solve import Router, solve_routers
from dume_dist.core.stats import RouterStats
from dume_dist.model.backbone import Backbone
from dume_dist.model.collect import collect_stats, dense_model_for, resolve_device
from dume_dist.model.data import load_domain_texts, token_batches
from dume_dist.model.experts import ExpertSpec, expert_fingerprint, load_expert_specs
from dume_dist.model.writer import check_output_dir, write_dume_checkpoint


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict
    stats: dict[str, RouterStats]
    routers: list[Router]
    backbone_fingerprint: str
    expert_fingerprints: dict[str, str]
    num_tokens: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)


def _check_options(
    *, lam, temperature, top_k, num_experts, max_tokens_per_seq, max_tokens, batch_size, seq_len
) -> None:
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, {num_experts}], got {top_k!r}")
    for key, value in (
        ("max_tokens_per_seq", max_tokens_per_seq),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")


def _load_data(experts: Sequence[ExpertSpec], data: Mapping[str, Sequence]) -> dict[str, list[str]]:
    names = [s.name for s in experts]
    unknown = [d for d in data if d not in names]
    if unknown:
        raise ValueError(
            f"data given for unknown expert {unknown[0]!r} (experts: {', '.join(names)})"
        )
    without = [n for n in names if not data.get(n)]
    if without:
        raise ValueError(f"expert {without[0]} has no data")
    return {n: load_domain_texts(n, data[n]) for n in names}


def build_dume(
    experts: Mapping[str, str | Path],
    data: Mapping[str, Sequence[str | Path]],
    out_dir: str | Path,
    *,
    backbone: str = "average",
    lam: float = 1e-2,
    temperature: float = 1.0,
    top_k: int = 1,
    max_tokens_per_seq: int = 1024,
    max_tokens: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    save_stats: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildResult:
    """MoErge ``experts`` (``{name: HF dir}``, in expert-index order) using ``data``
    (``{name: [.txt/.jsonl paths]}``) into a DUME model at ``out_dir``.

    ``seq_len`` (window length) defaults to ``max_tokens_per_seq``; statistics run in fp32 on
    ``device``; ``dtype`` casts the written weights (default: keep the experts' dtype).
    """
    t0 = time.perf_counter()
    check_output_dir(out_dir, overwrite)
    specs = load_expert_specs(experts)
    seq_len = seq_len if seq_len is not None else max_tokens_per_seq
    _check_options(
        lam=lam, temperature=temperature, top_k=top_k, num_experts=len(specs),
        max_tokens_per_seq=max_tokens_per_seq, max_tokens=max_tokens,
        batch_size=batch_size, seq_len=seq_len,
    )  # fmt: skip
    max_positions = getattr(specs[0].config, "max_position_embeddings", None)
    if max_positions and min(seq_len, max_tokens_per_seq) > max_positions:
        raise ValueError(
            f"sequences of {min(seq_len, max_tokens_per_seq)} tokens exceed the experts' "
            f"max_position_embeddings={max_positions}: lower seq_len or max_tokens_per_seq"
        )
    texts = _load_data(specs, data)
    device = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(specs[0].path))
    bb = Backbone.from_spec(backbone, specs)
    seconds = {"validate_and_backbone": time.perf_counter() - t0}

    stats: dict[str, RouterStats] = {}
    fingerprints: dict[str, str] = {}
    for spec in specs:
        t1 = time.perf_counter()
        fingerprints[spec.name] = expert_fingerprint(spec)
        model = dense_model_for(bb, spec, dtype=torch.float32, device=device)
        batches = token_batches(
            tokenizer, texts[spec.name], batch_size, seq_len, max_tokens_per_seq, max_tokens
        )
        collected = collect_stats(
            model, batches, max_tokens_per_seq=max_tokens_per_seq, device=device, progress=progress
        )
        stats[spec.name] = collected.with_meta(
            backbone_fingerprint=bb.fingerprint, expert_fingerprint=fingerprints[spec.name]
        )
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        seconds[f"stats:{spec.name}"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    routers = solve_routers(
        {s.name: (j, stats[s.name]) for j, s in enumerate(specs)}, len(specs), lam=lam
    )
    seconds["solve"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    manifest = write_dume_checkpoint(
        out_dir, bb, specs, routers,
        top_k=top_k, temperature=temperature, lam=lam, dtype=dtype, stats=stats,
        expert_fingerprints=fingerprints, save_stats=save_stats, overwrite=overwrite,
        extra_manifest={"build": {"max_tokens_per_seq": max_tokens_per_seq, "seq_len": seq_len, "max_tokens": max_tokens}},
    )  # fmt: skip
    seconds["write"] = time.perf_counter() - t3
    return BuildResult(
        out_dir=Path(out_dir),
        manifest=manifest,
        stats=stats,
        routers=routers,
        backbone_fingerprint=bb.fingerprint,
        expert_fingerprints=fingerprints,
        num_tokens={n: s.num_tokens for n, s in stats.items()},
        seconds=seconds,
    )
