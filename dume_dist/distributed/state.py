"""The coordinator's registry: a JSON document, and the pure rules that read it.

The registry is what `RegistryStore` persists after every change (one revision per
change). Schema (``dume-registry/1``)::

    settings   {lam, temperature, top_k, max_tokens_per_seq, feature_map, routing}
               routing: the `RoutingSpec` JSON (features, solver, lam, smoothing, top_k,
               holdout_fraction, grids, preset); lam / top_k / feature_map repeat the spec's.
               A registry without ``routing`` (founded before routing options) is the
               paper's token / ridge routing with its lam and top_k (`artifacts.routing_of`).
    backbone   {fingerprint, kind, prefix (store key of its files), files {rel: {sha256, size}},
                num_layers, feature_dim, architectures, semantic_config, tokenizer_hash,
                mlp_layout {tensor name: [dtype, shape]}}
    operator   {credential_hash}
    hold       bool: publication held until `publish`
    nodes      {name: NodeRecord}
    versions   [{version, digest, contributors [names], parent, trigger, created_at,
                 marked [names unlearned since], purged bool}]

A node record::

    domain, credential_hash (None once it left or was unlearned),
    public_key (Ed25519, base64: verifies the node's signed HTTP requests; absent once retired),
    state      registered | active | left | unlearned
    expert     {fingerprint, blob, size} | None
    stats      [{blob, sha256, submission_id, num_tokens, size,
                 holdout [{smoothing, feature_map, blob, sha256, num_tokens, size}]}]
               (arrival order; ``holdout`` only when the routing chooses a setting on
               held-out statistics: one blob per decay of ``holdout_smoothings()``)
    reason     why it was unlearned (or "left")

Node life cycle: ``registered`` (operator added it) → ``active`` (its expert and at least one
statistics blob are accepted) → ``left`` (withdrew itself) or ``unlearned`` (an operator removed
it). A new expert sends an ``active`` node back to ``registered``: its old statistics are stale.

**Canonical order** (what makes builds bit-reproducible and unlearning exact): the model's
experts are the ``active`` nodes sorted by name, and expert index *j* is the position of the node
in that sorted list. Statistics are summed in sorted ``"<node>/<blob sha256>"`` order.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from datetime import datetime, timezone

REGISTRY_SCHEMA = "dume-registry/1"
NODE_STATES = ("registered", "active", "left", "unlearned")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} is invalid: use letters, digits, '.', '_' or '-' (max 64)"
        )
    return value


def new_registry(settings: dict, backbone: dict, operator_hash: str) -> dict:
    return {
        "schema": REGISTRY_SCHEMA,
        "created_at": now(),
        "settings": dict(settings),
        "backbone": dict(backbone),
        "operator": {"credential_hash": operator_hash},
        "hold": False,
        "nodes": {},
        "versions": [],
    }


def new_node(domain: str, credential_hash: str) -> dict:
    return {
        "domain": domain,
        "credential_hash": credential_hash,
        "state": "registered",
        "expert": None,
        "stats": [],
        "reason": None,
        "registered_at": now(),
    }


def copy_state(state: dict) -> dict:
    return copy.deepcopy(state)


def active_nodes(state: dict) -> list[str]:
    """Names of the nodes in the model, sorted: the index in this list is the expert index."""
    return sorted(n for n, rec in state["nodes"].items() if rec["state"] == "active")


def node_tokens(record: dict) -> int:
    return sum(s["num_tokens"] for s in record["stats"])


def entry_blobs(entry: dict) -> list[str]:
    """Blob ids of one statistics entry: the fit blob and its held-out blobs."""
    return [entry["blob"], *(h["blob"] for h in entry.get("holdout", []))]


def content(state: dict) -> dict:
    """Everything a published version's bits depend on (and nothing else)."""
    experts = []
    for name in active_nodes(state):
        rec = state["nodes"][name]
        expert = {
            "name": name,
            "domain": rec["domain"],
            "expert_fingerprint": rec["expert"]["fingerprint"],
            "stats": sorted(s["sha256"] for s in rec["stats"]),
        }
        held = sorted(h["sha256"] for s in rec["stats"] for h in s.get("holdout", []))
        if held:  # absent without held-out statistics: digests of older registries unchanged
            expert["holdout"] = held
        experts.append(expert)
    return {
        "backbone": state["backbone"]["fingerprint"],
        "settings": state["settings"],
        "experts": experts,
    }


def content_digest(state: dict) -> str:
    data = json.dumps(content(state), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


def last_version(state: dict) -> dict | None:
    return state["versions"][-1] if state["versions"] else None


def needs_publish(state: dict) -> bool:
    """True when the active set differs from what the newest version was built from."""
    if not active_nodes(state):
        return False
    last = last_version(state)
    return last is None or last["digest"] != content_digest(state)


def versions_containing(state: dict, name: str) -> list[dict]:
    return [v for v in state["versions"] if name in v["contributors"]]


def public_view(state: dict) -> dict:
    """The registry without credential hashes (what `status` shows)."""
    view = copy_state(state)
    view.pop("operator", None)
    for rec in view.get("nodes", {}).values():
        rec.pop("credential_hash", None)
        rec.pop("public_key", None)
    return view
