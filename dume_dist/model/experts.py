"""Dense expert checkpoints on disk: discovery, validation, lazy tensor access, fingerprints.

An expert is a Hugging Face model directory (``config.json``, safetensors weights — one file or
shards with ``model.safetensors.index.json`` — and tokenizer files). This file owns:

* reading safetensors headers without loading tensors (``TensorInfo``: file, dtype, shape, byte
  range) and reading one tensor at a time;
* the table of which keys are MLP tensors (``model.layers.{l}.mlp.*``) per dense family;
* checking that a set of experts can be MoErged: same family and architecture, same
  shape/semantics config keys, same tensor names, shapes and dtypes, same tokenizer;
* ``expert_fingerprint``: sha256 of an expert's MLP tensors, streamed from the files.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Decoder layer types whose cache is the KV cache the routing state rides on.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# MLP tensor keys per dense family (HF names). A key that matches is routed into the MoE block as
# ``model.layers.{l}.mlp.experts.{j}.<param>``; every other key belongs to the backbone.
_STANDARD_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.+)$")
MLP_KEY_PATTERNS: dict[str, re.Pattern] = {
    "llama": _STANDARD_MLP,
    "mistral": _STANDARD_MLP,
    "qwen2": _STANDARD_MLP,
    "qwen3": _STANDARD_MLP,
}

# Config keys that decide tensor shapes or the forward's semantics: experts must agree on all of
# them (a key absent from a config reads as None).
SEMANTIC_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "partial_rotary_factor",
    "tie_word_embeddings",
    "mlp_bias",
    "attention_bias",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
)

# Files whose content decides tokenization, in order of preference.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token")

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype name, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def mlp_key_parts(name: str, model_type: str | None = None) -> tuple[int, str] | None:
    """``(layer, param)`` for an MLP key (``model.layers.3.mlp.up_proj.weight`` → ``(3,
    "up_proj.weight")``), else None."""
    match = MLP_KEY_PATTERNS.get(model_type or "", _STANDARD_MLP).match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def is_mlp_key(name: str, model_type: str | None = None) -> bool:
    return mlp_key_parts(name, model_type) is not None


# -- safetensors files ---------------------------------------------------------------------------


_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own bound on a header


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors file, the header checked against the file's size before it
    is read (a contributor's file: a truncated or forged one is a ValueError, one line)."""
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"header of {header_len} bytes in a file of {size} bytes")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        base = 8 + header_len
        out = {
            name: _tensor_info(path, name, meta, base, size)
            for name, meta in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, RecursionError, struct.error) as exc:
        raise ValueError(f"cannot read safetensors file {path}: {exc}") from None
    return out


def _tensor_info(path: Path, name: str, meta, base: int, size: int) -> TensorInfo:
    """One header entry, validated: known fields, offsets inside the file, bytes = shape x dtype."""
    name = name[:60]  # for the messages: the name is the file's, of any length
    try:
        dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"tensor {name!r} has no dtype, shape and data_offsets") from None
    ints = (begin, end, *shape)
    if not isinstance(dtype, str) or any(type(v) is not int or v < 0 for v in ints):
        raise ValueError(f"tensor {name!r} has a bad dtype, shape or data_offsets")
    if not begin <= end <= size - base:
        raise ValueError(f"tensor {name!r} lies outside the file (truncated?)")
    if dtype in SAFETENSORS_DTYPES:
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * SAFETENSORS_DTYPES[dtype].itemsize:
            raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
    return TensorInfo(path, dtype, shape, base + begin, base + end)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (single file or sharded with an index)."""
    single = model_dir / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = model_dir / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"bad safetensors index {index}: {exc}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"bad safetensors index {index}: weight_map is not a mapping of names")
        for shard in weight_map.values():  # never read a file outside the model directory
            rel = Path(shard) if isinstance(shard, str) and shard else None
            if rel is None or rel.is_absolute() or ".." in rel.parts or "\\" in shard:
                raise ValueError(
                    f"bad safetensors index {index}: shard {shard!r} is not a file of {model_dir}"
                )
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"safetensors shard listed in {index} is missing: {missing[0]}")
        return files
    raise ValueError(
        f"no safetensors weights in {model_dir} (expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})"
    )


def read_weight_index(model_dir: Path) -> dict[str, TensorInfo]:
    index: dict[str, TensorInfo] = {}
    for file in weight_files(model_dir):
        for name, info in read_safetensors_header(file).items():
            if name in index:
                raise ValueError(f"tensor {name} appears twice in {model_dir}")
            index[name] = info
    return index


def load_tensor(info: TensorInfo, name: str) -> torch.Tensor:
    with safe_open(str(info.file), framework="pt") as f:
        return f.get_tensor(name)


def iter_tensor_bytes(info: TensorInfo, chunk: int = 1 << 24) -> Iterator[bytes]:
    """The raw (little-endian) bytes of a tensor, read from its file in chunks."""
    with open(info.file, "rb") as f:
        f.seek(info.start)
        left = info.end - info.start
        while left > 0:
            data = f.read(min(chunk, left))
            if not data:
                raise ValueError(f"{info.file} is truncated")
            left -= len(data)
            yield data


def hash_tensor_header(h, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
    h.update(json.dumps([name, dtype, list(shape), nbytes]).encode() + b"\n")


# -- experts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertSpec:
    """A validated dense expert on disk; tensors are read on demand."""

    name: str
    path: Path
    config: PretrainedConfig
    files: tuple[Path, ...]
    index: Mapping[str, TensorInfo]
    tokenizer_hash: str

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def mlp_names(self) -> list[str]:
        return sorted(n for n in self.index if is_mlp_key(n, self.model_type))

    def non_mlp_names(self) -> list[str]:
        return sorted(n for n in self.index if not is_mlp_key(n, self.model_type))

    def mlp_names_of_layer(self, layer: int) -> list[str]:
        return [n for n in self.mlp_names() if mlp_key_parts(n, self.model_type)[0] == layer]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.index:
            raise KeyError(f"expert {self.name} has no tensor {name}")
        return load_tensor(self.index[name], name)


def load_config(model_dir: Path) -> PretrainedConfig:
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"no config.json in {model_dir}")
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises several types for bad configs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read {model_dir / 'config.json'}: {first}") from None


def tokenizer_fingerprint(model_dir: Path, required: bool = True) -> str:
    """sha256 of what decides tokenization: tokenizer.json's model section and added tokens and the
    bos/eos/unk tokens, or the raw vocabulary files of a tokenizer without tokenizer.json.
    ``""`` for a directory without a tokenizer when not ``required``."""
    h = hashlib.sha256()
    tok_json = model_dir / "tokenizer.json"
    if tok_json.is_file():
        try:
            tok = json.loads(tok_json.read_text())
        except ValueError as exc:
            raise ValueError(f"cannot read {tok_json}: {exc}") from None
        added = sorted(
            (t.get("id"), t.get("content"), bool(t.get("special")))
            for t in tok.get("added_tokens") or []
        )
        h.update(json.dumps([tok.get("model"), added], sort_keys=True).encode())
    else:
        vocab = [
            f for f in ("tokenizer.model", "vocab.json", "merges.txt") if (model_dir / f).is_file()
        ]
        if not vocab and not required:
            return ""
        if not vocab:
            raise ValueError(
                f"no tokenizer in {model_dir} (expected tokenizer.json or tokenizer.model)"
            )
        for f in vocab:
            h.update(f.encode() + b"\0" + (model_dir / f).read_bytes())
    tok_config = model_dir / "tokenizer_config.json"
    special = {}
    if tok_config.is_file():
        try:
            conf = json.loads(tok_config.read_text())
        except ValueError as exc:
            raise ValueError(f"cannot read {tok_config}: {exc}") from None
        special = {k: _token_text(conf.get(k)) for k in _SPECIAL_TOKEN_KEYS}
    h.update(json.dumps(special, sort_keys=True).encode())
    return h.hexdigest()


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def load_expert_spec(
    name: str, model_dir: str | Path, *, what: str = "expert", require_tokenizer: bool = True
) -> ExpertSpec:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(
            f"expert name {name!r} is invalid: use letters, digits, '.', '_' or '-' (max 64)"
        )
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"{what} {name}: directory {path} does not exist")
    config = load_config(path)
    files = weight_files(path)
    index = read_weight_index(path)
    tok_hash = tokenizer_fingerprint(path, required=require_tokenizer)
    spec = ExpertSpec(name, path, config, tuple(files), index, tok_hash)
    _check_layers_have_mlps(spec)
    _check_family_head(spec)
    return spec


def _check_family_head(spec: ExpertSpec) -> None:
    """Refuse a family whose causal LM holds weights beyond the stack and a linear LM head (the
    DUME model could not carry them): checked on the meta device, nothing allocated."""
    from dume_dist.model.modeling_dume import family_causal_lm

    kinds = set(getattr(spec.config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES
    if kinds:
        raise ValueError(
            f"expert {spec.name}: layers of type {sorted(kinds)} (model_type "
            f"{spec.model_type!r}): DUME carries decoder stacks of attention layers only"
        )
    try:
        dense = family_causal_lm(spec.config)
    except (KeyError, ValueError) as exc:
        reason = exc.args[0] if isinstance(exc, ValueError) else f"no causal LM class for {exc}"
        raise ValueError(f"expert {spec.name}: {reason}") from None
    _check_dense_mlps(spec, dense)


def _check_dense_mlps(spec: ExpertSpec, dense) -> None:
    """Refuse an expert whose layers' MLPs are not dense (a mixture of experts of its own: a
    router and per-expert or fused 3-D weights), which DUME could not carry as one expert.
    Dense: every weight a matrix or vector of a direct child (``gate_proj.weight``)."""
    for index, layer in enumerate(getattr(dense.model, "layers", ())):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        odd = [n for n, p in mlp.named_parameters() if n.count(".") != 1 or p.dim() > 2]
        if odd:
            raise ValueError(
                f"expert {spec.name}: layer {index}'s MLP is {type(mlp).__name__} (weights "
                f"{odd[0]} ...; model_type {spec.model_type!r}), not a dense MLP: DUME takes "
                "dense experts, one MLP per layer"
            )


def _check_layers_have_mlps(spec: ExpertSpec) -> None:
    layers = {mlp_key_parts(n, spec.model_type)[0] for n in spec.mlp_names()}
    missing = sorted(set(range(spec.num_layers)) - layers)
    if missing:
        raise ValueError(
            f"expert {spec.name}: no MLP tensors model.layers.{missing[0]}.mlp.* in {spec.path} "
            f"(model_type {spec.model_type!r})"
        )


def semantic_config(config: PretrainedConfig) -> dict:
    d = config.to_dict()
    return {k: d.get(k) for k in SEMANTIC_CONFIG_KEYS}


def check_same_model(ref: ExpertSpec, other: ExpertSpec, *, same_dtypes: bool = True) -> None:
    """Raise ValueError naming the first difference that stops ``other`` being MoErged with ``ref``."""
    who = f"{other.name} ({other.path}) and {ref.name} ({ref.path})"
    if (ref.config.architectures or []) != (other.config.architectures or []):
        raise ValueError(
            f"experts {who} have different architectures: "
            f"{other.config.architectures} vs {ref.config.architectures}"
        )
    a, b = semantic_config(ref.config), semantic_config(other.config)
    for key in SEMANTIC_CONFIG_KEYS:
        if a[key] != b[key]:
            raise ValueError(f"experts {who} differ in config {key}: {b[key]!r} vs {a[key]!r}")
    if set(ref.index) != set(other.index):
        extra = sorted(set(other.index) ^ set(ref.index))[0]
        raise ValueError(f"experts {who} have different tensors: {extra} is in only one")
    for name in sorted(ref.index):
        x, y = ref.index[name], other.index[name]
        if x.shape != y.shape:
            raise ValueError(f"experts {who} differ in the shape of {name}: {y.shape} vs {x.shape}")
        if same_dtypes and x.dtype != y.dtype:
            raise ValueError(
                f"experts {who} store {name} as {y.dtype} vs {x.dtype}: save them in one dtype"
            )
    if other.tokenizer_hash and ref.tokenizer_hash != other.tokenizer_hash:
        raise ValueError(f"experts {who} have different tokenizers")


def load_expert_specs(named_dirs: Mapping[str, str | Path]) -> list[ExpertSpec]:
    """Load and cross-validate experts, in the mapping's order (that order is the expert index)."""
    if not named_dirs:
        raise ValueError("no experts given")
    specs = [load_expert_spec(name, path) for name, path in named_dirs.items()]
    for spec in specs[1:]:
        check_same_model(specs[0], spec)
    return specs


def expert_fingerprint(spec: ExpertSpec) -> str:
    """sha256 over the expert's MLP tensors (sorted names, dtype, shape, raw bytes), streamed."""
    h = hashlib.sha256()
    for name in spec.mlp_names():
        info = spec.index[name]
        hash_tensor_header(h, name, info.dtype, info.shape, info.end - info.start)
        for chunk in iter_tensor_bytes(info):
            h.update(chunk)
    return h.hexdigest()
