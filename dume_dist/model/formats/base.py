"""What every output format reads, and the interface a format implements.

``CheckpointInput`` is a build's outcome before it is written: the backbone, the experts in
expert-index order, the solved routing (router tensors and the ``routing`` config dict come from
that one object, whatever the router kind), the inference settings, the statistics and the
provenance. A format (``OutputFormat``) says whether it can hold a given input — with the reason
when it cannot — and writes it directly, streaming tensors from the experts' files one at a
time into a sharded writer.

Sources are duck-typed: the backbone has ``config``, ``names()``, ``tensor(name)`` and
``provenance()`` (``model.backbone.Backbone``); an expert has ``name``, ``path``,
``model_type``, ``mlp_names_of_layer(layer)`` and ``tensor(name)`` with the dense model's MLP
names (``model.experts.ExpertSpec``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_SHARD_BYTES = 2 << 30


@dataclass(frozen=True)
class BuildStats:
    """The experts' statistics: fit ``{name: stats}`` (a mapping that may load lazily) and
    held-out ``{β: {name: stats}}``; ``save`` puts them into the output directory."""

    fit: Mapping[str, Any]
    holdout: Mapping[float, Mapping[str, Any]] = field(default_factory=dict)
    save: bool = True


@dataclass(frozen=True)
class Provenance:
    """Who is in the model: domains and expert fingerprints by expert name, and further manifest
    fields (the build's settings, the coordinator's contributors and version lineage)."""

    domains: Mapping[str, str] = field(default_factory=dict)
    expert_fingerprints: Mapping[str, str] = field(default_factory=dict)
    extra_manifest: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInput:
    backbone: Any
    experts: Sequence[Any]
    routing: Any  # SolvedRouting: checkpoint_tensors(), config_routing(), lam
    top_k: int = 1
    temperature: float = 1.0
    dtype: torch.dtype | None = None  # cast of backbone and expert tensors; None keeps theirs
    stats: BuildStats | None = None
    provenance: Provenance = field(default_factory=Provenance)
    tokenizer_dir: Path | None = None  # default: the first expert's directory
    # The experts' tokenizer as AutoTokenizer resolved it (default: loaded from tokenizer_dir),
    # and text on which the written checkpoint's tokenizer is checked to agree with it.
    tokenizer: Any = None
    tokenizer_sample: Sequence[str] = ()

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def dense_config(self):
        return self.backbone.config

    @property
    def num_layers(self) -> int:
        return self.backbone.config.num_hidden_layers

    def tokenizer_source(self) -> Path:
        return Path(self.tokenizer_dir or self.experts[0].path)


@dataclass(frozen=True)
class WriteOptions:
    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    model_card: bool = True


class OutputFormat:
    """A checkpoint format. ``unsupported(inp)`` is None when ``write`` can hold ``inp``, else a
    one-line reason; ``write`` checks it first, so nothing is written for an input it refuses."""

    name: str = ""
    description: str = ""

    def unsupported(self, inp: CheckpointInput) -> str | None:
        raise NotImplementedError

    def check(self, inp: CheckpointInput) -> None:
        reason = self.unsupported(inp)
        if reason:
            raise ValueError(f"cannot write format {self.name!r}: {reason}")

    def write(self, inp: CheckpointInput, out_dir: str | Path, options: WriteOptions) -> dict:
        raise NotImplementedError
