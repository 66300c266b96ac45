"""``DumeConfig`` (``model_type="dume"``): the config of a DUME MoE built from dense experts.

Part of the remote-code model (see ``modeling_dume.py`` for the checkpoint contract); imports only
the standard library, torch, transformers and its siblings. ``routing`` is checked by the
router kind's own code (``routing_dume.validate_routing``).
"""

from __future__ import annotations

import dataclasses
import json

import torch
from transformers import AutoConfig, PretrainedConfig

from .routing_dume import validate_routing

# base_config keys that are not copied onto DumeConfig: identity/bookkeeping of the dense
# checkpoint, and the generic PretrainedConfig fields that DumeConfig owns itself.
_NOT_COPIED = {
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "output_attentions",
    "num_labels",
} | {f.name for f in dataclasses.fields(PretrainedConfig)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _canonical_base_config(base_config: dict) -> dict:
    """base_config exactly as config.json stores it (string keys, lists, dtype names), minus the
    dense checkpoint's private bookkeeping (e.g. its local `_name_or_path`), so a fresh config and
    a loaded one compare and hash equal."""

    def dtype_name(value):
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        raise TypeError(f"base_config value {value!r} is not JSON-serialisable")

    plain = json.loads(json.dumps(base_config, default=dtype_name))
    return {k: v for k, v in plain.items() if not k.startswith("_")}


class DumeConfig(PretrainedConfig):
    """Config of a DUME MoE built from dense experts of one family (see the module docstring)."""

    model_type = "dume"

    base_config: dict | None = None
    num_experts: int = 1
    num_experts_per_tok: int = 1
    router_temperature: float = 1.0
    router_bias: bool = True
    expert_names: list[str] | None = None
    routing: dict | None = None

    def __post_init__(self, **kwargs):
        if self.architectures is None:
            self.architectures = ["DumeForCausalLM"]
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "modeling_dume.DumeConfig",
                "AutoModelForCausalLM": "modeling_dume.DumeForCausalLM",
            },
        )
        if self.routing is None:
            self.routing = {"features": "token"}
        super().__post_init__(**kwargs)
        self._validate()
        if self.base_config is not None:
            self.base_config = _canonical_base_config(self.base_config)
            self._copy_base_attributes()

    def _validate(self) -> None:
        if not _is_int(self.num_experts) or self.num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        k = self.num_experts_per_tok
        if not _is_int(k) or not 1 <= k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be an integer in [1, num_experts={self.num_experts}], "
                f"got {k!r}"
            )
        temperature = self.router_temperature
        if not (_is_int(temperature) or isinstance(temperature, float)) or not temperature > 0:
            raise ValueError(f"router_temperature must be a number > 0, got {temperature!r}")
        if not isinstance(self.router_bias, bool):
            raise ValueError(f"router_bias must be a bool, got {self.router_bias!r}")
        if self.expert_names is None:
            self.expert_names = [f"expert_{j}" for j in range(self.num_experts)]
        if not isinstance(self.expert_names, list) or len(self.expert_names) != self.num_experts:
            raise ValueError(
                f"expert_names must have num_experts={self.num_experts} entries, "
                f"got {self.expert_names!r}"
            )
        self._validate_routing()
        if isinstance(self.base_config, PretrainedConfig):
            self.base_config = self.base_config.to_dict()
        if self.base_config is not None:
            if not isinstance(self.base_config, dict) or "model_type" not in self.base_config:
                raise ValueError("base_config must be a dense config's to_dict() with a model_type")
            if self.base_config["model_type"] == self.model_type:
                raise ValueError("base_config.model_type must be a dense family, not 'dume'")

    def _validate_routing(self) -> None:
        validate_routing(self.routing)

    def _copy_base_attributes(self) -> None:
        own_fields = {f.name for f in dataclasses.fields(self)}
        for key, value in self.base_config.items():
            if key in _NOT_COPIED or key in own_fields:
                continue
            setattr(self, key, value)
        if self.dtype is None and self.base_config.get("dtype") is not None:
            self.dtype = getattr(torch, str(self.base_config["dtype"]).removeprefix("torch."))

    def build_base_config(self) -> PretrainedConfig:
        """The dense family's own config object (e.g. ``LlamaConfig``) built from ``base_config``."""
        if self.base_config is None:
            raise ValueError("base_config is required to build a model")
        return AutoConfig.for_model(**self.base_config)
