"""Every change of the registry, one function per transition (no I/O, no authentication).

A node moves only along `ALLOWED`; any other move is a bug or a replayed call the coordinator
should have recognised, and raises `TransitionError` before anything changes::

    registered ──stats──▶ active ──new expert / rebase──▶ registered
         │                  │ (improve: active ▶ active)
         └───────┬──────────┘
                 ▼
        left ──▶ unlearned      (an operator may still unlearn a node that left)

Each function mutates the `Registry` it is given and returns what the coordinator must clean
up afterwards (blob ids no longer referenced); the coordinator saves first, deletes second.
"""

from __future__ import annotations

from dume_dist.distributed.state import (
    RETIRED,
    ExpertRecord,
    NodeRecord,
    NodeState,
    Registry,
    StatsEntry,
    VersionEntry,
    now,
)

R, A, L, U = NodeState.REGISTERED, NodeState.ACTIVE, NodeState.LEFT, NodeState.UNLEARNED
ALLOWED: dict[NodeState, frozenset[NodeState]] = {
    R: frozenset({R, A, L, U}),
    A: frozenset({R, A, L, U}),
    L: frozenset({U}),
    U: frozenset(),
}


class TransitionError(ValueError):
    """A node cannot move from its state to the one asked for."""


def move(name: str, node: NodeRecord, to: NodeState) -> None:
    if to not in ALLOWED[node.state]:
        raise TransitionError(f"node {name!r} is {node.state.value}: it cannot become {to.value}")
    node.state = to


def add_node(reg: Registry, name: str, domain: str, credential_hash: str,
             public_key: str | None = None) -> NodeRecord:  # fmt: skip
    if name in reg.nodes:
        raise TransitionError(f"node {name!r} already exists")
    node = NodeRecord(domain, credential_hash, registered_at=now(), public_key=public_key)
    reg.nodes[name] = node
    return node


def rotate(reg: Registry, name: str, credential_hash: str, public_key: str) -> bool:
    """A new credential for a node that has neither left nor been unlearned; its expert,
    statistics and state are kept. Returns whether anything changed."""
    node = reg.nodes.get(name)
    if node is None or node.state in RETIRED:
        raise TransitionError(f"node {name!r} is not registered (or has left): nothing to rotate")
    if node.credential_hash == credential_hash and node.public_key == public_key:
        return False
    node.credential_hash, node.public_key = credential_hash, public_key
    return True


def set_expert(reg: Registry, name: str, expert: ExpertRecord) -> list[str]:
    """A new expert: the node's statistics are stale (fingerprints never mix); it is
    ``registered`` until it submits statistics computed with this expert."""
    node = reg.nodes[name]
    stale = node.blobs()
    move(name, node, R)
    node.expert, node.stats = expert, []
    return stale


def add_stats(reg: Registry, name: str, entry: StatsEntry) -> str:
    """Count one statistics submission; returns the publish trigger (join or improve)."""
    node = reg.nodes[name]
    if node.expert is None:
        raise TransitionError(f"node {name!r} has no expert registered: upload its MLP weights first")  # fmt: skip
    trigger = f"improve {name}" if node.state is A else f"join {name}"
    move(name, node, A)
    node.stats.append(entry)
    return trigger


def retire(reg: Registry, name: str, to: NodeState, reason: str) -> list[str]:
    """``left`` or ``unlearned``: credential revoked, statistics and expert dropped. A node that
    left keeps its credential's hash (never accepted again) so that a replayed ``leave`` can be
    authenticated; unlearning forgets it."""
    assert to in RETIRED
    node = reg.nodes[name]
    blobs = node.blobs()
    move(name, node, to)
    node.reason, node.public_key = reason, None
    if to is U:
        node.credential_hash = None
    node.stats, node.expert, node.retired_at = [], None, now()
    return blobs


def rebase(reg: Registry, backbone: dict) -> list[str]:
    """A new backbone: every statistics blob is stale; active nodes go back to registered."""
    stale = [b for node in reg.nodes.values() for s in node.stats for b in s.blobs()]
    reg.backbone = dict(backbone)
    for name, node in reg.nodes.items():
        node.stats = []
        if node.state is A:
            move(name, node, R)
    return stale


def record_version(reg: Registry, vid: str, digest: str, trigger: str, contributors: list[str],
                   adopted: bool = False) -> VersionEntry:  # fmt: skip
    last = reg.last_version()
    entry = VersionEntry(vid, digest, list(contributors), last.version if last else None,
                         trigger, now(), adopted=adopted)  # fmt: skip
    reg.versions.append(entry)
    return entry


def mark_unlearned(entry: VersionEntry, name: str) -> None:
    if name not in entry.marked:
        entry.marked.append(name)
