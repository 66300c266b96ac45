"""Writing model directories: a streaming sharded safetensors writer, atomic directory
publication, and the DUME checkpoint (contract in ``modeling_dume.py``) with its manifest.

Crash safety: everything is written into a temporary directory beside the output, the manifest
last, and the directory is renamed into place with ``os.replace``; on any error the temporary
directory is removed. A reader never sees a half-written model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from dume_dist.core.ngram import NgramTables, ngram_feature_map
from dume_dist.core.solve import Router
from dume_dist.core.stats import RouterStats, stats_to_bytes
from dume_dist.model.experts import (
    SAFETENSORS_DTYPES,
    TOKENIZER_FILES,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    ExpertSpec,
    expert_fingerprint,
    mlp_key_parts,
)

MANIFEST_NAME = "dume_manifest.json"
MANIFEST_SCHEMA_VERSION = 1
DEFAULT_SHARD_BYTES = 2 << 30
MODELING_FILE = Path(__file__).with_name("modeling_dume.py")
_RESERVED_MANIFEST_KEYS = {"schema_version", "files"}


class ShardedWriter:
    """Add tensors one at a time; a shard is flushed to disk once it holds ``max_shard_bytes``.

    ``close()`` names the shards ``model-0000i-of-0000n.safetensors`` and writes
    ``model.safetensors.index.json``; a single shard is written as ``model.safetensors`` with no
    index (what ``save_pretrained`` does). Peak memory: one shard's tensors.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self._names: set[str] = set()
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert not self._closed, "writer is closed"
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a view into a larger storage: safetensors needs its own
        nbytes = tensor.nbytes
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, name the shards, write the index; returns the weight files written."""
        assert not self._closed, "writer is closed"
        self._flush()
        self._closed = True
        if not self._shards:
            raise ValueError("no tensors were written")
        if len(self._shards) == 1:
            final = self.out_dir / WEIGHTS_NAME
            os.replace(self._shards[0][0], final)
            return [final]
        num = len(self._shards)
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self._shards):
            final = self.out_dir / f"model-{i + 1:05d}-of-{num:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {
            "metadata": {"total_size": self._total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return files


# -- atomic directories --------------------------------------------------------------------------


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Raise unless ``out_dir`` may be written: absent, an empty directory, or ``overwrite``."""
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ValueError(f"output directory {out} exists and is not empty (use overwrite)")
    return out


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir``
    atomically, on error it is removed and ``out_dir`` is left as it was."""
    out = check_output_dir(out_dir, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(out, overwrite)  # nobody created it meanwhile
        if out.exists() and any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # over an empty directory too (POSIX rename)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def file_checksums(root: Path, exclude: Sequence[str] = (MANIFEST_NAME,)) -> dict[str, dict]:
    """``{relative posix path: {"sha256", "size"}}`` of every file under ``root``, sorted."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in exclude:
            out[rel] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    return out


def verify_checkpoint(model_dir: str | Path) -> dict:
    """Check every file against the manifest's sha256 and size, and that no file is missing or
    unlisted. Returns the manifest; raises ValueError naming the first bad file."""
    root = Path(model_dir)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ValueError(f"no {MANIFEST_NAME} in {root}")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read {manifest_path}: {exc}") from None
    for rel, meta in listed.items():
        path = root / rel
        if not path.is_file():
            raise ValueError(f"checkpoint file {path} is missing")
        if path.stat().st_size != meta["size"] or file_sha256(path) != meta["sha256"]:
            raise ValueError(f"checkpoint file {path} is corrupt (checksum mismatch)")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    unlisted = sorted(present - set(listed) - {MANIFEST_NAME})
    if unlisted:
        raise ValueError(f"checkpoint file {root / unlisted[0]} is not in the manifest")
    return manifest


# -- the DUME checkpoint -------------------------------------------------------------------------


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def dume_config_dict(
    base_config: dict,
    expert_names: list[str],
    *,
    top_k: int,
    temperature: float,
    dtype: torch.dtype,
    routing: Mapping | None = None,
) -> dict:
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


def _write_weights(
    tmp: Path,
    backbone,
    experts: Sequence[ExpertSpec],
    routers: Sequence[Router],
    dtype: torch.dtype | None,
    max_shard_bytes: int,
) -> list[Path]:
    """Backbone tensors, then per layer: router (fp32) and every expert's MLP tensors."""
    writer = ShardedWriter(tmp, max_shard_bytes)
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    for name in sorted(backbone.names(), key=_natural_key):
        writer.add(name, cast(backbone.tensor(name)))
    ngram = routers if isinstance(routers, NgramTables) else None
    if ngram is not None:
        writer.add("ngram_router.bigram_counts", ngram.bigram_EH.float())
        writer.add("ngram_router.context_counts", ngram.context_EV.float())
        writer.add("ngram_router.unigram_counts", ngram.unigram_EV.float())
    for layer in range(backbone.config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp"
        if ngram is None:
            writer.add(f"{prefix}.router.weight", routers[layer].weight_EF.float())
            writer.add(f"{prefix}.router.bias", routers[layer].bias_E.float())
        for j, spec in enumerate(experts):
            for name in spec.mlp_names_of_layer(layer):
                _, param = mlp_key_parts(name, spec.model_type)
                writer.add(f"{prefix}.experts.{j}.{param}", cast(spec.tensor(name)))
    return writer.close()


def _check_ngram_router(backbone, experts, tables, routing) -> None:
    if not isinstance(tables, NgramTables) or routing.get("features") != "ngram":
        raise ValueError("n-gram routing needs the n-gram router's tables, and only it uses them")
    if routing.get("ngram") != tables.config():
        raise ValueError(f"routing.ngram {routing.get('ngram')} does not match the tables")
    want = (len(experts), backbone.config.vocab_size)
    for name in ("unigram_EV", "context_EV"):
        if tuple(getattr(tables, name).shape) != want:
            raise ValueError(
                f"n-gram {name} has shape {tuple(getattr(tables, name).shape)}, expected {want}"
            )
    if tables.bigram_EH.shape[0] != len(experts):
        raise ValueError(
            f"n-gram tables have {tables.bigram_EH.shape[0]} experts, not {len(experts)}"
        )


def _check_checkpoint_inputs(backbone, experts, routers, stats, top_k, temperature, routing):
    from dume_dist.model.modeling_dume import routing_feature_dim

    if not experts:
        raise ValueError("no experts to write")
    num_layers = backbone.config.num_hidden_layers
    features = routing.get("features", "token")
    if isinstance(routers, NgramTables) or features == "ngram":
        _check_ngram_router(backbone, experts, routers, routing)
        routers = []
    elif len(routers) != num_layers:
        raise ValueError(f"got {len(routers)} routers for {num_layers} layers")
    dim = routing_feature_dim(features, backbone.config.hidden_size)
    for router in routers:
        if router.bias_E is None:
            raise ValueError("DUME checkpoints need routers with a bias (solve with bias=True)")
        if tuple(router.weight_EF.shape) != (len(experts), dim):
            raise ValueError(
                f"router weight has shape {tuple(router.weight_EF.shape)}, expected "
                f"({len(experts)}, {dim}) for {features!r} features"
            )
    if stats is not None:
        expected = (
            ngram_feature_map(routing["ngram"]["buckets"]) if features == "ngram" else features
        )
        for name, st in stats.items():
            if st.feature_map != expected:
                raise ValueError(
                    f"statistics of {name!r} are of feature map {st.feature_map!r}, the routers "
                    f"use {expected!r}"
                )
    if not 1 <= top_k <= len(experts):
        raise ValueError(f"top_k must be in [1, {len(experts)}], got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if stats is not None and set(stats) != {s.name for s in experts}:
        raise ValueError("stats must have one entry per expert")


def write_dume_checkpoint(
    out_dir: str | Path,
    backbone,
    experts: Sequence[ExpertSpec],
    routers: Sequence[Router],
    *,
    top_k: int = 1,
    temperature: float = 1.0,
    lam: float = 1e-2,
    dtype: torch.dtype | None = None,
    stats: Mapping[str, RouterStats] | None = None,
    holdout_stats: Mapping[float, Mapping[str, RouterStats]] | None = None,
    routing: Mapping | None = None,
    domains: Mapping[str, str] | None = None,
    expert_fingerprints: Mapping[str, str] | None = None,
    extra_manifest: Mapping | None = None,
    save_stats: bool = True,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Write a DUME model directory atomically; returns its manifest.

    ``backbone`` is a ``dume_dist.model.backbone.Backbone``. ``dtype`` casts backbone and expert
    tensors (None keeps the stored dtype); routers are always fp32. With ``stats`` and
    ``save_stats`` the per-expert statistics blobs go to ``stats/<name>.safetensors`` (they are
    Gram matrices of the experts' data: leave them out of models published to untrusted readers);
    ``holdout_stats`` (``{β: {name: stats}}``) go to ``stats/holdout/<name>/<feature map>``.
    ``routing`` is the config's ``routing`` dict (default ``{"features": "token"}``, the paper).
    """
    routing = dict(routing or {"features": "token"})
    _check_checkpoint_inputs(backbone, experts, routers, stats, top_k, temperature, routing)
    extra = dict(extra_manifest or {})
    if _RESERVED_MANIFEST_KEYS & set(extra):
        raise ValueError(
            f"extra_manifest may not set {sorted(_RESERVED_MANIFEST_KEYS & set(extra))}"
        )
    if not MODELING_FILE.is_file():
        raise ValueError(f"{MODELING_FILE} is missing: cannot write a loadable DUME model")
    names = [s.name for s in experts]
    out_dtype = dtype or SAFETENSORS_DTYPES[experts[0].index[experts[0].mlp_names()[0]].dtype]
    config = dume_config_dict(
        backbone.config.to_dict(), names, top_k=top_k, temperature=temperature, dtype=out_dtype,
        routing=routing,
    )  # fmt: skip
    with atomic_directory(out_dir, overwrite) as tmp:
        _write_weights(tmp, backbone, experts, routers, dtype, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(MODELING_FILE, tmp / MODELING_FILE.name)
        for fname in TOKENIZER_FILES + ("generation_config.json",):
            if (experts[0].path / fname).is_file():
                shutil.copyfile(experts[0].path / fname, tmp / fname)
        stats_blobs = {n: stats_to_bytes(s) for n, s in (stats or {}).items()}
        held_blobs = {
            (name, st.feature_map): stats_to_bytes(st)
            for per_beta in (holdout_stats or {}).values()
            for name, st in per_beta.items()
        }
        if save_stats and stats_blobs:
            (tmp / "stats").mkdir()
            for name, blob in stats_blobs.items():
                (tmp / "stats" / f"{name}.safetensors").write_bytes(blob)
            for (name, feature_map), blob in held_blobs.items():
                (tmp / "stats" / "holdout" / name).mkdir(parents=True, exist_ok=True)
                (tmp / "stats" / "holdout" / name / f"{feature_map}.safetensors").write_bytes(blob)
        manifest = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "format": "dume",
            "parent_version": None,
            "num_experts": len(experts),
            "top_k": top_k,
            "temperature": float(temperature),
            "lam": float(lam),
            "feature_map": routing.get("features", "token"),
            "routing": routing,
            "backbone": backbone.provenance(),
            "experts": [
                _expert_entry(j, spec, stats, stats_blobs, domains, expert_fingerprints, held_blobs)
                for j, spec in enumerate(experts)
            ],
            **extra,
        }
        manifest["files"] = file_checksums(tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _expert_entry(j, spec, stats, blobs, domains, fingerprints, held_blobs=None) -> dict:
    entry = {
        "index": j,
        "name": spec.name,
        "domain": (domains or {}).get(spec.name, spec.name),
        "expert_fingerprint": (fingerprints or {}).get(spec.name) or expert_fingerprint(spec),
    }
    if stats is not None:
        entry["stats_fingerprint"] = hashlib.sha256(blobs[spec.name]).hexdigest()
        entry["num_tokens"] = stats[spec.name].num_tokens
    held = {fm: blob for (name, fm), blob in (held_blobs or {}).items() if name == spec.name}
    if held:
        entry["holdout_stats_fingerprints"] = {
            fm: hashlib.sha256(blob).hexdigest() for fm, blob in sorted(held.items())
        }
    return entry
