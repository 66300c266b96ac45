"""Single-machine MoErge: dense experts + their domain text → one DUME model directory.

Order of work: validate every input (experts, data, options, output path) before anything is
written; build the backbone; for each expert in order run its dense model (backbone + its own MLPs
= the MoE with it forced) over its data and collect statistics; solve the routers in closed form;
write the checkpoint atomically.

Routing (``dume_dist.model.routing.RoutingSpec``: features, solver, λ, smoothing, k): with an
``"auto"`` setting each expert's documents are split (by a hash of each document, so the split is
stable) into a fit part and a held-out part of ``holdout_fraction``; fit statistics solve the
routers, held-out statistics (one Gram per candidate smoothing) choose λ / β (``core.select``);
n-gram tables then count the held-out part as well (``kinds.ngram.with_heldout_counts``).

Statistics: returned in ``BuildResult.stats`` (fit) and ``BuildResult.holdout_stats``; never
written into the model directory (they are data about the experts' text). ``save_stats=DIR``
keeps them in ``DIR`` (``model.stats_dir``, outside the model), and a later build with the same
``DIR`` reuses those that still match and computes only the rest.

Differential privacy (``dp``, a ``core.dp.DpSpec``): each expert's statistics are collected with
features clipped and counts capped, and made private (``core.private``) before anything else sees
them; the guarantee goes into each statistic and the manifest's ``privacy``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dume_dist.core.dp import DpSpec
from dume_dist.core.private import privatize
from dume_dist.model.backbone import Backbone
from dume_dist.model.collect import release_memory, resolve_device, stats_compute_dtype
from dume_dist.model.data import load_domain_texts, token_batches
from dume_dist.model.experts import ExpertSpec, expert_fingerprint, load_expert_specs
from dume_dist.model.formats import (
    BuildStats,
    CheckpointInput,
    Provenance,
    WriteOptions,
    get_format,
    write_checkpoint,
)
from dume_dist.model.formats.base import DEFAULT_SHARD_BYTES
from dume_dist.model.kinds import feed, feed_sample
from dume_dist.model.routing import RoutingSpec, SolvedRouting, resolve_routing, solve_routing
from dume_dist.model.stats_dir import StatsDir, check_outside, stats_key
from dume_dist.model.stats_files import StatsFiles, contributions
from dume_dist.model.tokenizer import experts_tokenizer, sample_texts
from dume_dist.model.writer import check_output_dir

DEFAULT_MAX_TOKENS_PER_SEQ = 1024


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict
    stats: dict[str, object]  # the router kind's statistics
    routers: object  # the router kind's routers (per-layer linear routers, n-gram tables, ...)
    backbone_fingerprint: str
    expert_fingerprints: dict[str, str]
    num_tokens: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    holdout_stats: dict[float, dict[str, object]] = field(default_factory=dict)
    routing: SolvedRouting | None = None
    reused_stats: list[str] = field(default_factory=list)
    privacy: dict[str, dict] = field(default_factory=dict)
    # of num_tokens, how many the experts wrote (ngram_sample)
    sampled_tokens: dict[str, int] = field(default_factory=dict)


def _check_options(
    *, temperature, top_k, num_experts, max_tokens_per_seq, max_tokens, batch_size, seq_len
) -> None:
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


def chunk_documents(texts: Sequence[str], pieces: int) -> list[str]:
    """``texts`` cut on line boundaries (on spaces within a very long line) into about ``pieces``
    chunks of similar size, in order: held-out splits of a few long documents."""
    size = max(1, -(-sum(len(t) for t in texts) // pieces))
    out: list[str] = []
    for text in texts:
        cur = ""
        for line in text.splitlines(keepends=True):
            while len(cur) + len(line) > size and len(line) > size:  # a very long line
                cut = line.rfind(" ", 0, size - len(cur)) + 1 or max(1, size - len(cur))
                out.append(cur + line[:cut])
                cur, line = "", line[cut:]
            cur += line
            if len(cur) >= size:
                out.append(cur)
                cur = ""
        out.append(cur)
    return [t.strip() for t in out if t.strip()]


def split_holdout(texts: Sequence[str], fraction: float, name: str) -> tuple[list, list]:
    """``(fit, held_out)`` documents: a document is held out when a hash of its text falls below
    ``fraction`` (stable under reordering and added documents); both parts are non-empty. Fewer
    than ``4 / fraction`` documents (one long file, say) are first cut into that many chunks."""
    if fraction <= 0:
        return list(texts), []
    wanted = math.ceil(4 / fraction)
    if len(texts) < wanted:
        texts = chunk_documents(texts, wanted)
    keys = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") / 2**64 for t in texts]
    held = [i for i, k in enumerate(keys) if k < fraction] or [
        min(range(len(texts)), key=keys.__getitem__)
    ]
    if len(held) == len(texts):
        raise ValueError(
            f"expert {name} has {len(texts)} document(s): too few to hold out {fraction:.0%}"
        )
    held_set = set(held)
    return [t for i, t in enumerate(texts) if i not in held_set], [texts[i] for i in held]


def expert_statistics(
    backbone,
    spec: ExpertSpec,
    tokenizer,
    texts: Sequence[str],
    routing: RoutingSpec,
    *,
    batch_size: int,
    seq_len: int,
    max_tokens_per_seq: int,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    fingerprint: str | None = None,
    dtype: torch.dtype | None = None,
    dp: DpSpec | None = None,
    dp_seed: int | None = None,
) -> tuple[object, dict[float, object]]:
    """One contributor's statistics of ``routing``'s router kind (``dume_dist.model.kinds``):
    fit statistics and, when ``routing`` chooses a setting on held-out data, ``{part: held-out
    statistics}`` for ``routing.holdout_smoothings``. Both carry the backbone's and the expert's
    fingerprints. ``dtype``: what a model that collects them runs in (``stats_compute_dtype``).
    With ``dp`` they are collected within the kind's bounds (``dp_bounds``) and made private
    (noise from ``dp_seed``, tests only; else from the system's entropy)."""
    fit, held = raw_statistics(
        backbone, spec, tokenizer, texts, routing, batch_size=batch_size, seq_len=seq_len,
        max_tokens_per_seq=max_tokens_per_seq, max_tokens=max_tokens, device=device,
        progress=progress, fingerprint=fingerprint, dtype=dtype, dp=dp,
    )  # fmt: skip
    if dp is None:
        return fit, held
    clip, _ = routing.router_kind.dp_bounds(routing, backbone, dp)
    fit, held, _ = privatize(
        fit, held, dp, tokens_per_unit=min(seq_len, max_tokens_per_seq), clip=clip, seed=dp_seed,
        **routing.router_kind.dp_mechanism_options(routing),
    )  # fmt: skip
    return fit, held


def raw_statistics(
    backbone, spec, tokenizer, texts, routing, *, batch_size, seq_len, max_tokens_per_seq,
    max_tokens, device, progress, fingerprint, dtype, dp,
):  # fmt: skip
    clip, cap = routing.router_kind.dp_bounds(routing, backbone, dp) if dp else (None, None)
    fraction = routing.holdout_fraction if routing.needs_holdout else 0.0  # fixed: no held-out
    fit_texts, held_texts = split_holdout(texts, fraction, spec.name)
    meta = dict(
        backbone_fingerprint=backbone.fingerprint,
        expert_fingerprint=fingerprint or expert_fingerprint(spec),
    )
    collectors = routing.router_kind.collectors(
        routing, backbone, spec, holdout=routing.needs_holdout,
        max_tokens_per_seq=max_tokens_per_seq, device=device, dtype=dtype, clip=clip,
        count_cap=cap, **({"private": True} if dp else {}),
    )  # fmt: skip
    results, sampled = [], 0
    for collector, part in zip(collectors, (fit_texts, held_texts)):
        batches = token_batches(
            tokenizer, part, batch_size, seq_len, max_tokens_per_seq, max_tokens
        )
        real = feed(collector, batches, max_tokens_per_seq, progress=progress,
                    desc=f"statistics {spec.name}")  # fmt: skip
        if not results:  # the fit part: then what the expert writes (kinds that count it)
            sample = routing.router_kind.sampled(
                routing, backbone, spec, real_tokens=real, max_tokens_per_seq=max_tokens_per_seq,
                fingerprint=meta["expert_fingerprint"], device=device, dtype=dtype,
                private=dp is not None,
            )  # fmt: skip
            sampled = feed_sample(collector, sample, progress, f"sample {spec.name}")
        results.append(collector.result())
    del collectors
    release_memory(device)
    fit = results[0][0.0].with_meta(**meta)
    if sampled:
        fit = fit.with_meta(extra={**fit.extra, "sampled_tokens": sampled})
    held = {}
    if len(results) > 1:
        held = {p: st.with_meta(**meta, extra={"split": "holdout"}) for p, st in results[1].items()}
    return fit, held


def _check_format(name: str, backbone, specs, routing: RoutingSpec, temperature: float) -> None:
    """Refuse, before any statistics are computed, a build the output format cannot hold."""
    smoothing = 0.0 if getattr(routing, "smoothing", 0.0) in (0, 0.0) else 1.0  # 'auto': > 0?
    preview = CheckpointInput(
        backbone=backbone, experts=specs, routing=SolvedRouting([], routing, 1.0, smoothing, None),
        top_k=routing.top_k, temperature=temperature,
        stats=BuildStats(fit={s.name: None for s in specs}),
    )  # fmt: skip
    get_format(name).check(preview)


def build_dume(
    experts: Mapping[str, str | Path],
    data: Mapping[str, Sequence[str | Path]],
    out_dir: str | Path,
    *,
    backbone: str = "average",
    lam: float | str | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    routing: str | RoutingSpec | Mapping | None = None,
    holdout_fraction: float | None = None,
    max_tokens_per_seq: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    save_stats: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    output_format: str = "dume",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    stats_dtype: torch.dtype | None = None,
    dp: DpSpec | None = None,
    dp_seed: int | None = None,
) -> BuildResult:
    """MoErge ``experts`` (``{name: HF dir}``, in expert-index order) using ``data``
    (``{name: [.txt/.jsonl paths]}``) into a DUME model at ``out_dir``.

    ``routing`` is a preset name (``paper``, ``context``, ``ngram``; None: ``DEFAULT_PRESET``, the
    default everywhere), a ``RoutingSpec`` or a dict of its settings; ``lam`` (the kind's solver
    parameter, a number or ``"auto"``), ``top_k`` and ``holdout_fraction`` override it.
    ``max_tokens_per_seq`` defaults to the experts' ``max_position_embeddings`` (at most 1024),
    ``seq_len`` (window length) to ``max_tokens_per_seq``; statistics run on ``device``
    in ``stats_dtype`` (default: the experts' dtype; products fp32, sums fp64); ``dtype`` casts
    the written weights (default: keep the experts' dtype).
    ``output_format`` names the back end (``model.formats``: ``dume``, ``mixtral``), checked
    before any statistics are computed; ``max_shard_bytes`` bounds a safetensors shard.
    ``save_stats``: a directory outside ``out_dir`` where statistics are kept and reused (module
    docstring); ``dp``: differential privacy per expert (``dp_seed``: reproducible noise, tests).

    Memory: one dense model (the expert whose statistics are computed), the backbone, and one
    contributor's statistics plus the running sums; statistics wait in files, tensors stream
    from the experts' files to the writer one at a time.
    """
    t0 = time.perf_counter()
    check_output_dir(out_dir, overwrite)
    get_format(output_format)  # a known name
    spec_routing = resolve_routing(routing, lam=lam, top_k=top_k, holdout_fraction=holdout_fraction)
    specs = load_expert_specs(experts)
    if spec_routing.preset and spec_routing.top_k > len(specs):  # a preset's k, more than there are
        spec_routing = spec_routing.replace(top_k=len(specs))
    max_positions = getattr(specs[0].config, "max_position_embeddings", None)
    if max_tokens_per_seq is None:  # the experts' position limit, at most the paper's 1024
        max_tokens_per_seq = min(
            DEFAULT_MAX_TOKENS_PER_SEQ, max_positions or DEFAULT_MAX_TOKENS_PER_SEQ
        )
    seq_len = seq_len if seq_len is not None else max_tokens_per_seq
    _check_options(
        temperature=temperature, top_k=spec_routing.top_k, num_experts=len(specs),
        max_tokens_per_seq=max_tokens_per_seq, max_tokens=max_tokens,
        batch_size=batch_size, seq_len=seq_len,
    )  # fmt: skip
    if max_positions and min(seq_len, max_tokens_per_seq) > max_positions:
        raise ValueError(
            f"sequences of {min(seq_len, max_tokens_per_seq)} tokens exceed the experts' "
            f"max_position_embeddings={max_positions}: lower seq_len or max_tokens_per_seq"
        )
    _load_data(specs, data)  # every expert has readable, non-empty data (then dropped)
    _check_dp(dp, spec_routing)
    saved = StatsDir(check_outside(save_stats, out_dir)) if save_stats is not None else None
    device = resolve_device(device)
    # one tokenizer: the experts' as AutoTokenizer resolves it, checked alike on their text
    sample = sample_texts(load_domain_texts(s.name, data[s.name]) for s in specs)
    tokenizer = experts_tokenizer([(s.name, s.path) for s in specs], sample)
    if dp is None:  # a private contribution counts no sample
        for s in specs:
            spec_routing.router_kind.check_sampling(spec_routing, s)
    bb = Backbone.from_spec(backbone, specs)
    _check_format(output_format, bb, specs, spec_routing, temperature)
    seconds = {"validate_and_backbone": time.perf_counter() - t0}

    # Statistics go to files as each expert's are computed: memory holds one contributor's.
    fit_files = StatsFiles()
    held_files: dict[float, StatsFiles] = {}
    fingerprints: dict[str, str] = {}
    reused: dict[str, bool] = {}
    privacy: dict[str, dict] = {}
    sampled: dict[str, int] = {}
    sample_key = spec_routing.router_kind.sample_settings(spec_routing)  # text experts write
    for spec in specs:
        t1 = time.perf_counter()
        fingerprints[spec.name] = expert_fingerprint(spec)
        key = stats_key(fingerprints[spec.name], bb.fingerprint, list(data[spec.name]), {
            "routing": [spec_routing.feature_map, spec_routing.holdout_fraction,
                        list(spec_routing.holdout_smoothings())],
            "heldout": [[spec_routing.holdout_feature_map(b) for b in
                         spec_routing.holdout_smoothings()],
                        spec_routing.router_kind.heldout_settings(spec_routing)],
            "windows": [seq_len, max_tokens_per_seq, max_tokens],
            "dp": None if dp is None else dp.to_json(),
            "tokenizer": spec.tokenizer_hash,
            **({"sample": sample_key} if sample_key else {}),
            # what the dense model runs in (a kind whose statistics need no model run, such as
            # token counts without a sample, recomputes needlessly when only this changes)
            "stats_dtype": str(stats_compute_dtype(spec, device, stats_dtype)),
        })  # fmt: skip
        loaded = saved.load(spec.name, key) if saved is not None else None
        if loaded is not None:
            fit, held = loaded
        else:
            fit, held = expert_statistics(
                bb, spec, tokenizer, load_domain_texts(spec.name, data[spec.name]), spec_routing,
                batch_size=batch_size, seq_len=seq_len, max_tokens_per_seq=max_tokens_per_seq,
                max_tokens=max_tokens, device=device, progress=progress,
                fingerprint=fingerprints[spec.name], dtype=stats_dtype, dp=dp,
                dp_seed=None if dp_seed is None else dp_seed + len(fingerprints),
            )  # fmt: skip
            if saved is not None:
                saved.save(spec.name, key, fit, held)
        reused[spec.name] = loaded is not None
        if "dp" in fit.extra:
            privacy[spec.name] = fit.extra["dp"]
        sampled[spec.name] = int(fit.extra.get("sampled_tokens", 0))
        fit_files.put(spec.name, fit)
        for beta, held_stats in held.items():
            held_files.setdefault(beta, StatsFiles(fit_files.root / f"holdout-{len(held_files)}"))
            held_files[beta].put(spec.name, held_stats)
        del fit, held
        seconds[f"stats:{spec.name}"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    index = {s.name: j for j, s in enumerate(specs)}
    solved = solve_routing(
        spec_routing,
        contributions(fit_files, index),
        len(specs),
        {b: contributions(files, index) for b, files in held_files.items()},
    )
    seconds["solve"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    inp = CheckpointInput(
        backbone=bb, experts=specs, routing=solved, top_k=spec_routing.top_k,
        temperature=temperature, dtype=dtype, tokenizer=tokenizer, tokenizer_sample=tuple(sample),
        stats=BuildStats(fit=fit_files, holdout=held_files, save=False),
        provenance=Provenance(
            expert_fingerprints=fingerprints,
            extra_manifest={
                "build": {"max_tokens_per_seq": max_tokens_per_seq, "seq_len": seq_len, "max_tokens": max_tokens},
                "routing": solved.manifest_routing(),
                **({"privacy": privacy} if privacy else {}),
            },
        ),
    )  # fmt: skip
    manifest = write_checkpoint(
        output_format, inp, out_dir,
        WriteOptions(overwrite=overwrite, max_shard_bytes=max_shard_bytes),
    )  # fmt: skip
    seconds["write"] = time.perf_counter() - t3
    return BuildResult(
        out_dir=Path(out_dir),
        manifest=manifest,
        stats=fit_files,
        routers=solved.routers,
        backbone_fingerprint=bb.fingerprint,
        expert_fingerprints=fingerprints,
        num_tokens={n: fit_files[n].num_tokens for n in fit_files},
        seconds=seconds,
        holdout_stats=held_files,
        routing=solved,
        reused_stats=[n for n, r in reused.items() if r],
        privacy=privacy,
        sampled_tokens=sampled,
    )


def _check_dp(dp: DpSpec | None, routing: RoutingSpec) -> None:
    """Refuse, before any statistics are computed, a routing its kind cannot make private."""
    if dp is not None:
        routing.router_kind.check_dp(routing, dp)
