"""Founding a store (client side, run by the operator): build the backbone, upload it, create
the registry with the operator's credential.

The backbone is built where the founding experts are (the machine running
``dume coordinator start``), saved with its tokenizer, and uploaded to ``backbone/<fingerprint>/``
in the store. The coordinator then only records it; node agents get it from the coordinator.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from dume_dist.distributed.artifacts import backbone_record, save_backbone_dir
from dume_dist.distributed.calls import call
from dume_dist.distributed.identity import node_material, operator_material
from dume_dist.distributed.validation import check_settings
from dume_dist.store import ObjectStore, hash_secret, new_secret


def build_backbone(spec: str, founding: dict[str, str]):
    """(Backbone, reference ExpertSpec) for ``"average"`` of ``founding`` experts or ``"base:DIR"``.
    The backbone's sources name the experts (or ``base``) without their directories: those are
    the operator's, and what is built here is read from the store by everyone."""
    backbone, ref = _build_backbone(spec, founding)
    backbone.sources = [{"name": source["name"]} for source in backbone.sources]
    return backbone, ref


def _build_backbone(spec: str, founding: dict[str, str]):
    from dume_dist.model.backbone import Backbone
    from dume_dist.model.experts import load_expert_spec, load_expert_specs

    if spec == "average":
        if not founding:
            raise ValueError(
                "backbone 'average' needs the founding experts (--founding-expert NAME=DIR)"
            )
        specs = load_expert_specs(founding)
        return Backbone.average(specs), specs[0]
    if spec.startswith("base:") and len(spec) > len("base:"):
        base_dir = spec[len("base:") :]
        specs = (
            load_expert_specs(founding)
            if founding
            else [load_expert_spec("base", base_dir, what="base model")]
        )
        return Backbone.from_base(base_dir, specs), specs[0]
    raise ValueError(f"backbone must be 'average' or 'base:DIR', got {spec!r}")


def upload_backbone(store: ObjectStore, backbone, ref) -> dict:
    """Save the backbone (and the tokenizer) and upload it; returns its registry record."""
    from dume_dist.store import coordinator_layout

    record = backbone_record(backbone, ref, coordinator_layout(store).backbone)
    with tempfile.TemporaryDirectory(prefix="dume-backbone-") as tmp:
        local = Path(tmp) / "backbone"
        save_backbone_dir(backbone, ref.path, local)
        record["files"] = store.put_dir(str(local), record["prefix"])
    return record


def is_founded(store: ObjectStore) -> bool:
    from dume_dist.store import RegistryStore, coordinator_layout

    return bool(RegistryStore(store, coordinator_layout(store).registry).load()[0])


def prepare(
    store: ObjectStore, backbone: str, founding: dict[str, str], settings: dict
) -> tuple[dict, dict]:
    """Build and upload the backbone; returns its record and ``settings`` fitted to it
    (``fit_settings``). Runs before any actor exists, so bad founding experts or settings the
    backbone cannot take fail without leaving anything behind on the cluster."""
    bb, ref = build_backbone(backbone, founding)
    settings = fit_settings(settings, getattr(ref.config, "max_position_embeddings", None))
    return upload_backbone(store, bb, ref), settings


def fit_settings(settings: dict, max_positions: int | None) -> dict:
    """``settings`` with ``max_tokens_per_seq`` defaulted to the experts' position limit (at most
    the paper's 1024, as ``dume build`` does); one given above that limit is refused."""
    from dume_dist.model.build import DEFAULT_MAX_TOKENS_PER_SEQ

    given = settings.get("max_tokens_per_seq")
    if given is None:
        limit = min(DEFAULT_MAX_TOKENS_PER_SEQ, max_positions or DEFAULT_MAX_TOKENS_PER_SEQ)
        return {**settings, "max_tokens_per_seq": limit}
    if max_positions and isinstance(given, int) and given > max_positions:
        raise ValueError(
            f"max_tokens_per_seq={given} exceeds the experts' max_position_embeddings={max_positions}"
        )
    return settings


def found_with(coordinator, record: dict, settings: dict, operator_secret: str | None = None,
               hold: bool = False) -> tuple[dict, str]:  # fmt: skip
    """Record the uploaded backbone and the operator credential; returns (result, secret)."""
    secret = operator_secret or new_secret()
    result = call(
        coordinator, "found", hash_secret(operator_material(secret)), record, settings, hold
    )
    return result, secret


def found(
    coordinator,
    store: ObjectStore,
    *,
    backbone: str,
    founding: dict[str, str],
    settings: dict,
    operator_secret: str | None = None,
    hold: bool = False,
) -> tuple[dict, str | None]:
    """Found the store unless it already is; returns (result, operator secret if new)."""
    status = call(coordinator, "status")
    if status["registry"]:
        return {"founded": False, "revision": status["revision"]}, None
    check_settings(settings)  # bad settings fail before the backbone is uploaded
    record, settings = prepare(store, backbone, founding, settings)
    return found_with(coordinator, record, settings, operator_secret, hold)


def rebase_record(store: ObjectStore, backbone: str, founding: dict[str, str]) -> dict:
    bb, ref = build_backbone(backbone, founding)
    return upload_backbone(store, bb, ref)


def issue_node_credential(name: str, domain: str) -> tuple[str, str]:
    """(secret for the node, the hash the coordinator stores)."""
    secret = new_secret()
    return secret, hash_secret(node_material(name, domain, secret))


def node_credential_record(name: str, domain: str, secret: str) -> tuple[str, str]:
    """What the coordinator stores for ``secret``: (scrypt hash, Ed25519 public key)."""
    from dume_dist.distributed.signing import public_key

    return hash_secret(node_material(name, domain, secret)), public_key(name, domain, secret)
