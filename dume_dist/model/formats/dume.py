"""``dume``: the DUME checkpoint (remote-code model, contract in ``modeling_dume.py``).

Layout: the backbone's tensors in shards of their own, then one shard of router tensors, then
each expert's MLP tensors (``model.layers.{l}.mlp.experts.{j}.*``, every layer) in shards of
their own; the standard ``model.safetensors.index.json``. Config, remote code, tokenizer, model
card, statistics (when saved) and the manifest (written last, with every file's checksum). The
directory is written into a temporary sibling and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch

from dume_dist.model.card import write_model_card
from dume_dist.model.experts import SAFETENSORS_DTYPES, expert_fingerprint
from dume_dist.model.formats.base import CheckpointInput, OutputFormat, WriteOptions
from dume_dist.model.kinds import kind_of_config, stats_to_bytes
from dume_dist.model.tokenizer import has_tokenizer, load_tokenizer, write_checkpoint_tokenizer
from dume_dist.model.writer import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    MODELING_FILE,
    ShardedWriter,
    atomic_directory,
    file_checksums,
    remote_code_files,
)

_RESERVED_MANIFEST_KEYS = {"schema_version", "files"}


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def dume_config_dict(
    base_config: dict, expert_names: list[str], *, top_k: int, temperature: float,
    dtype: torch.dtype, routing: dict | None = None,
) -> dict:  # fmt: skip
    """config.json of a DUME checkpoint, from ``DumeConfig`` (modeling_dume.py)."""
    from dume_dist.model.modeling_dume import DumeConfig

    base = dict(base_config, dtype=str(dtype).removeprefix("torch."))
    config = DumeConfig(
        base_config=base,
        num_experts=len(expert_names),
        num_experts_per_tok=top_k,
        router_temperature=float(temperature),
        router_bias=True,
        expert_names=list(expert_names),
        routing=dict(routing or {"features": "token"}),
        dtype=dtype,
    )
    return json.loads(config.to_json_string(use_diff=True))


def output_dtype(inp: CheckpointInput) -> torch.dtype:
    first = inp.experts[0]
    return inp.dtype or SAFETENSORS_DTYPES[first.index[first.mlp_names()[0]].dtype]


def estimated_bytes(inp: CheckpointInput) -> int:
    """Bytes of the weights, from the first expert's index (every expert has its shapes)."""
    first = inp.experts[0]
    infos = {n: first.index[n] for n in first.index}
    mlp = set(first.mlp_names())
    scale = 1.0
    if inp.dtype is not None:
        src = SAFETENSORS_DTYPES[first.index[first.mlp_names()[0]].dtype]
        scale = inp.dtype.itemsize / src.itemsize
    size = {n: (i.end - i.start) * scale for n, i in infos.items()}
    return int(
        sum(v for n, v in size.items() if n not in mlp)
        + len(inp.experts) * sum(size[n] for n in mlp)
    )


def write_weights(tmp: Path, inp: CheckpointInput, max_shard_bytes: int) -> list[Path]:
    """Backbone, routers (fp32), then expert by expert: each part in shards of its own."""
    writer = ShardedWriter(tmp, max_shard_bytes, estimated_bytes(inp) > max_shard_bytes)
    cast = (lambda t: t.to(inp.dtype)) if inp.dtype is not None else (lambda t: t)
    try:
        for name in sorted(inp.backbone.names(), key=natural_key):
            writer.add(name, cast(inp.backbone.tensor(name)))
        writer.new_part()
        for name, tensor in inp.routing.checkpoint_tensors().items():
            writer.add(name, tensor)
        for j, spec in enumerate(inp.experts):
            writer.new_part()
            for layer in range(inp.num_layers):
                for name in spec.mlp_names_of_layer(layer):
                    param = name.split(".mlp.", 1)[1]
                    writer.add(
                        f"model.layers.{layer}.mlp.experts.{j}.{param}", cast(spec.tensor(name))
                    )
        return writer.close()
    finally:
        writer.abort()


class DumeFormat(OutputFormat):
    name = "dume"
    description = "DUME remote-code checkpoint (AutoModelForCausalLM, trust_remote_code=True)"

    def unsupported(self, inp: CheckpointInput) -> str | None:
        missing = [p for p in [MODELING_FILE, *remote_code_files()] if not p.is_file()]
        if missing:
            return f"{missing[0]} is missing: cannot write a loadable DUME model"
        return None

    def write(self, inp: CheckpointInput, out_dir: str | Path, options: WriteOptions) -> dict:
        self.check(inp)
        routing = inp.routing.config_routing()
        check_inputs(inp, routing)
        extra = dict(inp.provenance.extra_manifest)
        if _RESERVED_MANIFEST_KEYS & set(extra):
            raise ValueError(
                f"extra_manifest may not set {sorted(_RESERVED_MANIFEST_KEYS & set(extra))}"
            )
        config = dume_config_dict(
            inp.dense_config.to_dict(), inp.expert_names, top_k=inp.top_k,
            temperature=inp.temperature, dtype=output_dtype(inp), routing=routing,
        )  # fmt: skip
        with atomic_directory(out_dir, options.overwrite) as tmp:
            write_weights(tmp, inp, options.max_shard_bytes)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for path in remote_code_files():  # modeling_dume.py and its relative imports
                shutil.copyfile(path, tmp / path.name)
            copy_tokenizer(inp, tmp)
            blobs, held = _write_stats(tmp, inp)
            manifest = {
                "schema_version": MANIFEST_SCHEMA_VERSION,
                "format": "dume",
                "parent_version": None,
                "num_experts": len(inp.experts),
                "top_k": inp.top_k,
                "temperature": float(inp.temperature),
                "lam": float(inp.routing.lam),
                "feature_map": routing.get("features", kind_of_config(routing).name),
                "routing": routing,
                "backbone": inp.backbone.provenance(),
                "experts": [_expert_entry(j, inp, blobs, held) for j in range(len(inp.experts))],
                **extra,
            }
            if options.model_card:
                write_model_card(tmp, manifest, base_model=_base_model(inp))
            manifest["files"] = file_checksums(tmp)
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest


def copy_tokenizer(inp: CheckpointInput, dst: Path) -> None:
    """The experts' tokenizer, saved as ``AutoTokenizer`` resolved it for them and checked to
    load back from ``dst`` (its ``config.json`` written) to the same tokenization."""
    src = inp.tokenizer_source()
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")
    tokenizer = inp.tokenizer
    if tokenizer is None and has_tokenizer(src):
        tokenizer = load_tokenizer(src)
    if tokenizer is not None:
        write_checkpoint_tokenizer(dst, tokenizer, inp.tokenizer_sample)


def _base_model(inp: CheckpointInput) -> str | None:
    sources = inp.backbone.provenance().get("sources") or []
    if inp.backbone.provenance().get("kind") == "base" and sources:
        return sources[0].get("path")
    return None


def _write_stats(tmp: Path, inp: CheckpointInput) -> tuple[dict, dict]:
    """Statistics blobs, one at a time (written when ``stats.save``); returns their sha256s
    ``{name: sha}`` and ``{(name, feature map): sha}`` and token counts via the manifest."""
    stats = inp.stats
    if stats is None:
        return {}, {}
    blobs, held = {}, {}
    for name in inp.expert_names:
        blob = stats_to_bytes(stats.fit[name])
        blobs[name] = (hashlib.sha256(blob).hexdigest(), stats.fit[name].num_tokens)
        if stats.save:
            (tmp / "stats").mkdir(exist_ok=True)
            (tmp / "stats" / f"{name}.safetensors").write_bytes(blob)
        del blob
    for per_beta in stats.holdout.values():
        for name, st in per_beta.items():
            blob = stats_to_bytes(st)
            held[(name, st.feature_map)] = hashlib.sha256(blob).hexdigest()
            if stats.save:
                (tmp / "stats" / "holdout" / name).mkdir(parents=True, exist_ok=True)
                (tmp / "stats" / "holdout" / name / f"{st.feature_map}.safetensors").write_bytes(
                    blob
                )
    return blobs, held


def _expert_entry(j: int, inp: CheckpointInput, blobs: dict, held: dict) -> dict:
    spec = inp.experts[j]
    prov = inp.provenance
    entry = {
        "index": j,
        "name": spec.name,
        "domain": prov.domains.get(spec.name, spec.name),
        "expert_fingerprint": prov.expert_fingerprints.get(spec.name) or expert_fingerprint(spec),
    }
    if spec.name in blobs:
        entry["stats_fingerprint"], entry["num_tokens"] = blobs[spec.name]
    mine = {fm: sha for (name, fm), sha in held.items() if name == spec.name}
    if mine:
        entry["holdout_stats_fingerprints"] = dict(sorted(mine.items()))
    return entry


# -- checks -------------------------------------------------------------------------------------


def check_inputs(inp: CheckpointInput, routing: dict) -> None:
    """The routers (checked by their router kind), statistics and settings of a checkpoint."""
    if not inp.experts:
        raise ValueError("no experts to write")
    kind = kind_of_config(routing)
    kind.check_routers(inp.routing.routers, routing, len(inp.experts), inp.dense_config)
    _check_stats(inp, kind.config_identity(routing))
    if not 1 <= inp.top_k <= len(inp.experts):
        raise ValueError(f"top_k must be in [1, {len(inp.experts)}], got {inp.top_k}")
    if not inp.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {inp.temperature}")


def _check_stats(inp: CheckpointInput, expected: str) -> None:
    if inp.stats is None:
        return
    if set(inp.stats.fit) != set(inp.expert_names):
        raise ValueError("stats must have one entry per expert")
    for name in inp.expert_names:
        got = inp.stats.fit[name].feature_map
        if got != expected:
            raise ValueError(
                f"statistics of {name!r} are of feature map {got!r}, the routers use {expected!r}"
            )
