"""The coordinator's registry as typed records, and the pure rules that read it.

`RegistryStore` persists the registry's JSON (`Registry.to_json`) after every change, one
revision per change. Schema (``dume-registry/1``)::

    settings   {lam, temperature, top_k, max_tokens_per_seq, feature_map, routing}
               routing: the `RoutingSpec` JSON; a registry without ``routing`` (founded before
               routing options) is the paper's token / ridge routing (`artifacts.routing_of`).
    backbone   {fingerprint, kind, prefix, files {rel: {sha256, size}}, num_layers, feature_dim,
                vocab_size, architectures, semantic_config, tokenizer_hash, mlp_layout}
    operator   {credential_hash}
    hold       bool: publication held until `publish`
    nodes      {name: NodeRecord}
    versions   [VersionEntry]

Settings and the backbone record stay plain JSON (the routing and `artifacts` own them); nodes
and versions are the dataclasses below. Node states and their transitions are in
`dume_dist.distributed.transitions`.

**Canonical order** (what makes builds bit-reproducible and unlearning exact): the model's
experts are the ``active`` nodes sorted by name, and expert index *j* is the position of the node
in that sorted list. Statistics are summed in sorted ``"<node>/<blob sha256>"`` order.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from dume_dist.store.names import check_name  # noqa: F401  (re-exported)

REGISTRY_SCHEMA = "dume-registry/1"


class NodeState(str, enum.Enum):
    """``registered`` (an operator added it) → ``active`` (its expert and at least one statistics
    blob are accepted) → ``left`` (withdrew itself) or ``unlearned`` (an operator removed it)."""

    REGISTERED = "registered"
    ACTIVE = "active"
    LEFT = "left"
    UNLEARNED = "unlearned"


NODE_STATES = tuple(s.value for s in NodeState)
RETIRED = (NodeState.LEFT, NodeState.UNLEARNED)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _optional(d: dict, key: str, default=None):
    return d[key] if key in d else default


@dataclass
class ExpertRecord:
    fingerprint: str
    blob: str
    size: int

    @classmethod
    def from_json(cls, d: dict | None) -> ExpertRecord | None:
        return None if d is None else cls(d["fingerprint"], d["blob"], int(d["size"]))

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "blob": self.blob, "size": self.size}


@dataclass
class HoldoutEntry:
    """Held-out statistics of one smoothing decay, submitted with a fit entry."""

    smoothing: float
    feature_map: str
    blob: str
    sha256: str
    num_tokens: int
    size: int

    @classmethod
    def from_json(cls, d: dict) -> HoldoutEntry:
        return cls(float(d["smoothing"]), d.get("feature_map", ""), d["blob"], d["sha256"],
                   int(d.get("num_tokens", 0)), int(d.get("size", 0)))  # fmt: skip

    def to_json(self) -> dict:
        return {"smoothing": self.smoothing, "feature_map": self.feature_map, "blob": self.blob,
                "sha256": self.sha256, "num_tokens": self.num_tokens, "size": self.size}  # fmt: skip


@dataclass
class StatsEntry:
    """One accepted statistics submission (arrival order within a node)."""

    blob: str
    sha256: str
    submission_id: str
    num_tokens: int
    size: int
    submitted_at: str | None = None
    holdout: list[HoldoutEntry] = field(default_factory=list)
    dp: dict | None = None  # the differential-privacy guarantee the node's statistics carry

    @classmethod
    def from_json(cls, d: dict) -> StatsEntry:
        return cls(
            blob=d["blob"],
            sha256=d["sha256"],
            submission_id=d.get("submission_id", ""),
            num_tokens=int(d.get("num_tokens", 0)),
            size=int(d.get("size", 0)),
            submitted_at=d.get("submitted_at"),
            holdout=[HoldoutEntry.from_json(h) for h in d.get("holdout", [])],
            dp=d.get("dp"),
        )

    def to_json(self) -> dict:
        out = {"blob": self.blob, "sha256": self.sha256, "submission_id": self.submission_id,
               "num_tokens": self.num_tokens, "size": self.size}  # fmt: skip
        if self.submitted_at is not None:
            out["submitted_at"] = self.submitted_at
        if self.holdout:  # absent without held-out statistics (as older registries have it)
            out["holdout"] = [h.to_json() for h in self.holdout]
        if self.dp is not None:
            out["dp"] = self.dp
        return out

    def blobs(self) -> list[str]:
        """Blob ids of this entry: the fit blob and its held-out blobs."""
        return [self.blob, *(h.blob for h in self.holdout)]

    def manifest(self) -> dict:
        """What a published manifest says of this entry (no blob ids, no submission id)."""
        out = {"sha256": self.sha256, "num_tokens": self.num_tokens}
        if self.holdout:
            out["holdout"] = [{"smoothing": h.smoothing, "sha256": h.sha256,
                               "num_tokens": h.num_tokens} for h in self.holdout]  # fmt: skip
        if self.dp is not None:
            out["dp"] = self.dp
        return out


@dataclass
class NodeRecord:
    domain: str
    credential_hash: str | None  # None once the node left or was unlearned
    state: NodeState = NodeState.REGISTERED
    expert: ExpertRecord | None = None
    stats: list[StatsEntry] = field(default_factory=list)
    reason: str | None = None
    registered_at: str | None = None
    retired_at: str | None = None
    public_key: str | None = None  # Ed25519, base64: verifies its signed HTTP API requests
    purge: bool = False  # unlearned with purge: every version that contained it is deleted

    @classmethod
    def from_json(cls, d: dict) -> NodeRecord:
        return cls(
            domain=d["domain"],
            credential_hash=d.get("credential_hash"),
            state=NodeState(d["state"]),
            expert=ExpertRecord.from_json(d.get("expert")),
            stats=[StatsEntry.from_json(s) for s in d.get("stats", [])],
            reason=d.get("reason"),
            registered_at=d.get("registered_at"),
            retired_at=d.get("retired_at"),
            public_key=d.get("public_key"),
            purge=bool(d.get("purge", False)),
        )

    def to_json(self) -> dict:
        out = {
            "domain": self.domain,
            "credential_hash": self.credential_hash,
            "state": self.state.value,
            "expert": self.expert.to_json() if self.expert else None,
            "stats": [s.to_json() for s in self.stats],
            "reason": self.reason,
            "registered_at": self.registered_at,
        }
        if self.retired_at is not None:
            out["retired_at"] = self.retired_at
        if self.public_key is not None:
            out["public_key"] = self.public_key
        if self.purge:
            out["purge"] = True
        return out

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.stats)

    def blobs(self) -> list[str]:
        """Every blob the record references (statistics, held-out statistics, expert)."""
        out = [b for s in self.stats for b in s.blobs()]
        return out + ([self.expert.blob] if self.expert else [])


@dataclass
class VersionEntry:
    version: str
    digest: str
    contributors: list[str]
    parent: str | None
    trigger: str
    created_at: str
    marked: list[str] = field(default_factory=list)  # nodes unlearned since it was published
    purged: bool = False
    adopted: bool = False  # found in the store, not recorded by its publisher (a crash)

    @classmethod
    def from_json(cls, d: dict) -> VersionEntry:
        return cls(d["version"], d["digest"], list(d["contributors"]), d.get("parent"),
                   d.get("trigger", ""), d.get("created_at", ""), list(d.get("marked", [])),
                   bool(d.get("purged", False)), bool(d.get("adopted", False)))  # fmt: skip

    def to_json(self) -> dict:
        out = {"version": self.version, "digest": self.digest,
               "contributors": list(self.contributors), "parent": self.parent,
               "trigger": self.trigger, "created_at": self.created_at,
               "marked": list(self.marked), "purged": self.purged}  # fmt: skip
        if self.adopted:
            out["adopted"] = True
        return out


@dataclass
class Registry:
    settings: dict
    backbone: dict
    operator_hash: str
    hold: bool = False
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    versions: list[VersionEntry] = field(default_factory=list)
    created_at: str = field(default_factory=now)
    schema: str = REGISTRY_SCHEMA

    @classmethod
    def from_json(cls, d: dict) -> Registry:
        if d.get("schema", REGISTRY_SCHEMA) != REGISTRY_SCHEMA:
            raise ValueError(f"registry schema {d.get('schema')!r} is not {REGISTRY_SCHEMA}")
        return cls(
            settings=dict(d["settings"]),
            backbone=dict(d["backbone"]),
            operator_hash=d["operator"]["credential_hash"],
            hold=bool(d.get("hold", False)),
            nodes={n: NodeRecord.from_json(r) for n, r in d.get("nodes", {}).items()},
            versions=[VersionEntry.from_json(v) for v in d.get("versions", [])],
            created_at=d.get("created_at", ""),
            schema=d.get("schema", REGISTRY_SCHEMA),
        )

    def to_json(self) -> dict:
        return {
            "schema": self.schema,
            "created_at": self.created_at,
            "settings": dict(self.settings),
            "backbone": dict(self.backbone),
            "operator": {"credential_hash": self.operator_hash},
            "hold": self.hold,
            "nodes": {n: r.to_json() for n, r in self.nodes.items()},
            "versions": [v.to_json() for v in self.versions],
        }

    # -- queries ---------------------------------------------------------------------------

    def active_nodes(self) -> list[str]:
        """Names of the nodes in the model, sorted: the index in this list is the expert index."""
        return sorted(n for n, r in self.nodes.items() if r.state is NodeState.ACTIVE)

    def last_version(self) -> VersionEntry | None:
        return self.versions[-1] if self.versions else None

    def latest(self) -> str | None:
        last = self.last_version()
        return last.version if last else None

    def version(self, vid: str) -> VersionEntry | None:
        return next((v for v in self.versions if v.version == vid), None)

    def content_digest(self) -> str:
        return content_digest(self.to_json())

    def needs_publish(self) -> bool:
        """True when the active set differs from what the newest version was built from."""
        if not self.active_nodes():
            return False
        last = self.last_version()
        return last is None or last.digest != self.content_digest()

    def versions_containing(self, name: str) -> list[VersionEntry]:
        return [v for v in self.versions if name in v.contributors]

    def unlearned(self) -> list[str]:
        return sorted(n for n, r in self.nodes.items() if r.state is NodeState.UNLEARNED)

    def referenced_blobs(self) -> set[str]:
        return {b for r in self.nodes.values() for b in r.blobs()}


# -- pure rules over the JSON form -----------------------------------------------------------------


def content(state: dict) -> dict:
    """Everything a published version's bits depend on (and nothing else), from registry JSON."""
    experts = []
    active = sorted(n for n, r in state["nodes"].items() if r["state"] == NodeState.ACTIVE.value)
    for name in active:
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


def entry_blobs(entry: StatsEntry | dict) -> list[str]:
    """Blob ids of one statistics entry: the fit blob and its held-out blobs."""
    return (entry if isinstance(entry, StatsEntry) else StatsEntry.from_json(entry)).blobs()


def public_view(state: Registry | dict) -> dict:
    """The registry without credential hashes (what `status` shows); {} before genesis."""
    if not state:
        return {}
    view = (state if isinstance(state, Registry) else Registry.from_json(state)).to_json()
    view.pop("operator", None)
    for rec in view["nodes"].values():
        rec.pop("credential_hash", None)
        rec.pop("public_key", None)
    return view
