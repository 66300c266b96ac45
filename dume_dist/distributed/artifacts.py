"""What travels between nodes and the coordinator, besides statistics: the backbone and an
expert's MLP weights. Thin adapters over `dume_dist.model` (no math, no Ray).

* The **backbone** is saved once at genesis (`Backbone.save` plus the tokenizer files) under
  ``backbone/<fingerprint>/`` in the store; its *record* (fingerprint, shapes, MLP layout,
  tokenizer hash) lives in the registry and is what every expert and statistics blob is checked
  against.
* An expert's **MLP weights** travel as one safetensors blob holding exactly its
  ``model.layers.{l}.mlp.*`` tensors, byte for byte, so `expert_fingerprint` of the blob equals
  the fingerprint of the expert directory it came from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save as st_save

from dume_dist.model.backbone import Backbone
from dume_dist.model.experts import (
    TOKENIZER_FILES,
    WEIGHTS_NAME,
    ExpertSpec,
    expert_fingerprint,
    load_config,
    read_safetensors_header,
    semantic_config,
)
from dume_dist.model.routing_options import routing_option_names

BACKBONE_PREFIX = "backbone"
FEATURE_MAP = "token"  # the feature map of registries founded before routing options existed

# Coordinator settings that name the routing (everything else in them: temperature and
# max_tokens_per_seq): ``routing`` (a preset name or a dict of `RoutingSpec` settings), ``kind``,
# every routing option of `dume_dist.model.routing_options` that has a flag, and the older
# names ``features``, ``solver``, ``lam``, ``smoothing``.
ROUTING_KEYS = ("routing", "kind", *routing_option_names(), "lam")
SETTINGS_KEYS = (*ROUTING_KEYS, "temperature", "max_tokens_per_seq", "feature_map")


def routing_of(settings: dict):
    """The `RoutingSpec` of a coordinator's stored settings. A registry founded before routing
    options existed has no ``routing`` entry: it is the paper's token / ridge routing with its
    own λ and k (``feature_map`` "token"); one founded before router kinds stored the older
    names, which still read."""
    from dume_dist.model.routing import resolve_routing

    stored = settings.get("routing")
    if stored is None:
        if settings.get("feature_map", FEATURE_MAP) != FEATURE_MAP:
            raise ValueError(
                f"registry settings have feature map {settings['feature_map']!r} but no routing"
            )
        return resolve_routing("paper", lam=float(settings.get("lam", 1e-2)),
                               top_k=int(settings.get("top_k", 1)))  # fmt: skip
    spec = resolve_routing(dict(stored))
    if "mu_criterion" in spec.options and "mu_criterion" not in stored and spec.mu == "auto":
        # founded when n-gram mu 'auto' meant the exact held-out bigrams: its held-out
        # statistics carry them, so it keeps that criterion
        spec = spec.replace(mu_criterion="bigrams")
    return spec


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def mlp_layout(spec: ExpertSpec) -> dict[str, list]:
    """``{MLP tensor name: [safetensors dtype, shape]}`` of an expert."""
    return {n: [spec.index[n].dtype, list(spec.index[n].shape)] for n in spec.mlp_names()}


def backbone_record(backbone: Backbone, ref: ExpertSpec, prefix: str = BACKBONE_PREFIX) -> dict:
    """Registry entry of a backbone; ``ref`` is a founding expert (or the base) whose MLP layout
    and tokenizer every later expert must share. Its files go under ``prefix``/fingerprint."""
    config = backbone.config
    return {
        "fingerprint": backbone.fingerprint,
        "kind": backbone.kind,
        "sources": backbone.sources,
        "prefix": f"{prefix}/{backbone.fingerprint}",
        "num_layers": int(config.num_hidden_layers),
        "feature_dim": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "architectures": list(config.architectures or []),
        "semantic_config": _jsonable(semantic_config(config)),
        "tokenizer_hash": ref.tokenizer_hash,
        "mlp_layout": mlp_layout(ref),
    }


def record_vocab_size(record: dict, backbone_dir: Path | None = None) -> int:
    """The backbone's vocabulary size (what n-gram statistics cover). Records written before it
    was stored carry it in their ``semantic_config``; failing that, the backbone's
    ``config.json`` in ``backbone_dir`` is read."""
    if record.get("vocab_size") is not None:
        return int(record["vocab_size"])
    if (record.get("semantic_config") or {}).get("vocab_size") is not None:
        return int(record["semantic_config"]["vocab_size"])
    if backbone_dir is None:
        raise ValueError("the backbone record has no vocabulary size")
    return int(load_config(Path(backbone_dir)).vocab_size)


def save_backbone_dir(backbone: Backbone, tokenizer_dir: Path, out_dir: Path) -> None:
    """The backbone's files plus the tokenizer (versions and node agents need it)."""
    backbone.save(out_dir)
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, Path(out_dir) / name)


def check_expert_fits(spec: ExpertSpec, record: dict) -> None:
    """ValueError naming the first way ``spec`` cannot join a model on this backbone."""
    who = f"expert {spec.name} ({spec.path})"
    if list(spec.config.architectures or []) != record["architectures"]:
        raise ValueError(
            f"{who} has architecture {spec.config.architectures}, the backbone {record['architectures']}"
        )
    ours = _jsonable(semantic_config(spec.config))
    for key, want in record["semantic_config"].items():
        if ours.get(key) != want:
            raise ValueError(
                f"{who} differs from the backbone in config {key}: {ours.get(key)!r} vs {want!r}"
            )
    layout, want = mlp_layout(spec), record["mlp_layout"]
    if layout != want:
        names = sorted(set(layout) ^ set(want)) or sorted(n for n in layout if layout[n] != want[n])
        raise ValueError(f"{who}: MLP tensor {names[0]} does not fit the backbone")
    if spec.tokenizer_hash != record["tokenizer_hash"]:
        raise ValueError(f"{who} has a different tokenizer from the backbone's")


def mlp_blob(spec: ExpertSpec) -> bytes:
    """The expert's MLP tensors as one safetensors blob (stored dtypes, raw bytes unchanged)."""
    return st_save({name: spec.tensor(name) for name in spec.mlp_names()})


def mlp_spec(name: str, expert_dir: Path, backbone_dir: Path, tokenizer_hash: str) -> ExpertSpec:
    """An `ExpertSpec` over a directory holding only ``model.safetensors`` (the MLP blob) and
    the backbone's config and tokenizer: what the checkpoint writer needs from an expert."""
    expert_dir = Path(expert_dir)
    for fname in ("config.json", *TOKENIZER_FILES, "generation_config.json"):
        src = Path(backbone_dir) / fname
        if src.is_file() and not (expert_dir / fname).is_file():
            shutil.copyfile(src, expert_dir / fname)
    file = expert_dir / WEIGHTS_NAME
    index = read_safetensors_header(file)
    return ExpertSpec(name, expert_dir, load_config(expert_dir), (file,), index, tokenizer_hash)


def check_mlp_blob(spec: ExpertSpec, record: dict, fingerprint: str) -> None:
    """The uploaded MLP blob must have the backbone's MLP layout and the claimed fingerprint."""
    layout = {n: [i.dtype, list(i.shape)] for n, i in spec.index.items()}
    if layout != record["mlp_layout"]:
        raise ValueError(
            f"expert {spec.name}: uploaded MLP tensors do not match the backbone's layout"
        )
    got = expert_fingerprint(spec)
    if got != fingerprint:
        raise ValueError(
            f"expert {spec.name}: uploaded MLP weights have fingerprint {got[:12]}, not the claimed {fingerprint[:12]}"
        )
