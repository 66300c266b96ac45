"""The shared backbone: every non-MLP tensor of the MoErged model (DESIGN §3).

``average`` is the element-wise mean of the experts' non-MLP tensors (fp32 arithmetic, stored in
the experts' dtype); with a single expert it *is* that expert's tensors, read from its files.
``base:DIR`` takes the base model's non-MLP tensors (cast to the experts' dtype).

Memory: an averaged backbone is held once in memory; every other kind is read from its files one
tensor at a time. The fingerprint hashes sorted names, dtypes, shapes, raw bytes and the config's
shape/semantics keys, so a backbone saved with ``save`` and reloaded keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import PretrainedConfig

from dume_dist.model.experts import (
    SAFETENSORS_DTYPES,
    TORCH_TO_SAFETENSORS,
    ExpertSpec,
    TensorInfo,
    check_same_model,
    hash_tensor_header,
    iter_tensor_bytes,
    load_config,
    load_expert_spec,
    load_tensor,
    read_weight_index,
    semantic_config,
)
from dume_dist.model.writer import ShardedWriter, atomic_directory

BACKBONE_FILE = "backbone.json"
BACKBONE_SCHEMA = "dume-backbone/1"


class Backbone:
    """Non-MLP tensors plus the dense config. Build with ``average``, ``from_base``,
    ``from_spec`` or ``load``; never construct directly."""

    def __init__(
        self,
        config: PretrainedConfig,
        kind: str,
        sources: list[dict],
        *,
        tensors: Mapping[str, torch.Tensor] | None = None,
        index: Mapping[str, TensorInfo] | None = None,
        cast_to: Mapping[str, torch.dtype] | None = None,
    ):
        assert (tensors is None) != (index is None)
        self.config = config
        self.kind = kind
        self.sources = sources
        self._tensors = dict(tensors) if tensors is not None else None
        self._index = dict(index) if index is not None else None
        # Per-name target dtype of file-backed tensors whose stored dtype differs (a base model).
        self._cast_to = {
            n: d
            for n, d in (cast_to or {}).items()
            if SAFETENSORS_DTYPES[self._index[n].dtype] != d
        }
        self._fingerprint: str | None = None

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def average(cls, experts: Sequence[ExpertSpec]) -> Backbone:
        if not experts:
            raise ValueError("cannot average a backbone from zero experts")
        ref = experts[0]
        sources = [{"name": s.name, "path": str(s.path)} for s in experts]
        names = ref.non_mlp_names()
        if len(experts) == 1:  # exactly the expert's tensors, no arithmetic
            return cls(ref.config, "average", sources, index={n: ref.index[n] for n in names})
        return cls(ref.config, "average", sources, tensors={n: _mean(experts, n) for n in names})

    @classmethod
    def from_base(cls, base_dir: str | Path, experts: Sequence[ExpertSpec]) -> Backbone:
        base = load_expert_spec("base", base_dir, what="base model", require_tokenizer=False)
        ref = experts[0]
        check_same_model(ref, base, same_dtypes=False)
        names = ref.non_mlp_names()
        dtypes = {n: SAFETENSORS_DTYPES[ref.index[n].dtype] for n in names}
        sources = [{"name": "base", "path": str(base.path)}]
        index = {n: base.index[n] for n in names}
        return cls(ref.config, "base", sources, index=index, cast_to=dtypes)

    @classmethod
    def from_spec(cls, spec: str, experts: Sequence[ExpertSpec]) -> Backbone:
        """``"average"`` or ``"base:DIR"``."""
        if spec == "average":
            return cls.average(experts)
        if spec.startswith("base:") and len(spec) > len("base:"):
            return cls.from_base(spec[len("base:") :], experts)
        raise ValueError(f"backbone must be 'average' or 'base:DIR', got {spec!r}")

    @classmethod
    def load(cls, model_dir: str | Path, verify: bool = True) -> Backbone:
        root = Path(model_dir)
        meta_path = root / BACKBONE_FILE
        if not meta_path.is_file():
            raise ValueError(f"no {BACKBONE_FILE} in {root}")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("schema") != BACKBONE_SCHEMA:
                raise ValueError(f"unknown schema {meta.get('schema')!r}")
        except ValueError as exc:
            raise ValueError(f"cannot read {meta_path}: {exc}") from None
        backbone = cls(
            load_config(root), meta["kind"], meta["sources"], index=read_weight_index(root)
        )
        if verify and backbone.fingerprint != meta["fingerprint"]:
            raise ValueError(
                f"backbone in {root} does not match the fingerprint in {BACKBONE_FILE}"
            )
        backbone._fingerprint = meta["fingerprint"]
        return backbone

    # -- access ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._tensors if self._tensors is not None else self._index)

    def tensor(self, name: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[name]
        t = load_tensor(self._index[name], name)
        return t.to(self._cast_to[name]) if name in self._cast_to else t

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in self.names():
            if (
                self._index is not None and name not in self._cast_to
            ):  # stream the bytes from the file
                info = self._index[name]
                hash_tensor_header(h, name, info.dtype, info.shape, info.end - info.start)
                for chunk in iter_tensor_bytes(info):
                    h.update(chunk)
            else:
                t = self.tensor(name).contiguous()
                hash_tensor_header(h, name, TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape), t.nbytes)
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(json.dumps(semantic_config(self.config), sort_keys=True).encode())
        return h.hexdigest()

    def provenance(self) -> dict:
        return {"fingerprint": self.fingerprint, "kind": self.kind, "sources": self.sources}

    def save(
        self, out_dir: str | Path, *, overwrite: bool = False, max_shard_bytes: int = 2 << 30
    ) -> None:
        """Safetensors + config.json + backbone.json (fingerprint and provenance), atomically."""
        with atomic_directory(out_dir, overwrite) as tmp:
            writer = ShardedWriter(tmp, max_shard_bytes)
            for name in self.names():
                writer.add(name, self.tensor(name))
            writer.close()
            self.config.save_pretrained(tmp)
            meta = {"schema": BACKBONE_SCHEMA, **self.provenance()}
            (tmp / BACKBONE_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _mean(experts: Sequence[ExpertSpec], name: str) -> torch.Tensor:
    """Element-wise mean of one tensor over the experts (fp32 or wider), in their dtype."""
    first = experts[0].tensor(name)
    if not first.is_floating_point():
        for spec in experts[1:]:
            if not torch.equal(first, spec.tensor(name)):
                raise ValueError(f"non-float tensor {name} differs between experts: cannot average")
        return first
    acc_dtype = torch.promote_types(first.dtype, torch.float32)
    acc = first.to(acc_dtype)
    for spec in experts[1:]:
        acc += spec.tensor(name).to(acc_dtype)
    return (acc / len(experts)).to(first.dtype)
