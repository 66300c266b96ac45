"""Who is who (DESIGN §6): the operator's and the nodes' credentials, checked against the registry.

A node credential is bound to its name and domain (the hash covers all three), so a secret
works only for the node it was issued to. A refusal never says which part was wrong: an unknown
node, a wrong domain, a wrong secret and a revoked credential all get the same one line (the
message does not tell a caller which names and domains exist), and a refusal takes as long:
a secret offered for a node that is not active is checked against a decoy hash, so timing does
not tell an unknown node from a wrong secret either.

Checking a secret costs one scrypt (tens of ms). The coordinator runs checks outside its
registry lock, on the caller's thread, so wrong secrets queued at the actor do not delay other
calls; a secret that was accepted once is remembered (by a keyed digest, never in clear), so
an honest node pays scrypt once per coordinator process.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading

from dume_dist.distributed import signing
from dume_dist.distributed.state import NodeState, Registry
from dume_dist.store import hash_secret, verify_secret

MAX_SECRET_CHARS = 1024


def operator_material(secret: str) -> str:
    """What the operator credential hash is computed over."""
    return f"dume-operator\n{secret}"


def node_material(name: str, domain: str, secret: str) -> str:
    """A node credential is bound to its name and domain: the hash covers all three."""
    return f"dume-node\n{name}\n{domain}\n{secret}"


def node_refusal(name, domain) -> PermissionError:
    shown = [repr(v)[:80] if isinstance(v, str) else type(v).__name__ for v in (name, domain)]
    return PermissionError(
        f"credential rejected for node {shown[0]}: no active node registered for domain "
        f"{shown[1]} holds this credential"
    )


class Verifier:
    """Credential checks with a cache of accepted (material, hash) pairs. Thread-safe."""

    def __init__(self, cache_size: int = 1024):
        self._key = secrets.token_bytes(32)
        self._accepted: set[bytes] = set()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # what a secret offered for an inactive node is checked against (one scrypt, as a real check)
        self._decoy = hash_secret(secrets.token_urlsafe(32))

    def _tag(self, material: str, hashed: str) -> bytes:
        return hmac.new(self._key, f"{hashed}\0{material}".encode(), hashlib.sha256).digest()

    def verify(self, material: str, hashed: str | None) -> bool:
        if not isinstance(hashed, str):
            return False
        tag = self._tag(material, hashed)
        with self._lock:
            if tag in self._accepted:
                return True
        if not verify_secret(material, hashed):
            return False
        with self._lock:
            if len(self._accepted) >= self._cache_size:
                self._accepted.clear()
            self._accepted.add(tag)
        return True

    def check_operator(self, reg: Registry, secret) -> None:
        if not _plausible(secret) or not self.verify(operator_material(secret), reg.operator_hash):
            raise PermissionError("operator credential rejected")

    def check_node(self, reg: Registry, name, domain, secret, replay=None) -> None:
        """PermissionError (one message for every reason) unless ``secret`` is the credential
        of a node ``name`` registered for ``domain`` that has neither left nor been unlearned.
        ``secret`` may instead be a signed HTTP API request (`signing.envelope`): with
        ``replay`` (a `signing.ReplayGuard`) its freshness is checked and its nonce used up;
        without, only its signature (a second check of a request already admitted)."""
        rec = reg.nodes.get(name) if isinstance(name, str) else None
        if (
            rec is None
            or rec.state in (NodeState.LEFT, NodeState.UNLEARNED)
            or rec.domain != domain
        ):
            if _plausible(secret):  # the scrypt a real check costs: no timing tells the cases apart
                verify_secret(node_material(str(name), str(domain), secret), self._decoy)
            raise node_refusal(name, domain)
        if signing.is_envelope(secret):
            if replay is not None:
                signing.verify(secret, rec.public_key, replay, name, domain)
            else:
                signing.check_signature(secret, rec.public_key)
            return
        if not _plausible(secret) or not self.verify(node_material(name, domain, secret), rec.credential_hash):  # fmt: skip
            raise node_refusal(name, domain)

    def left_before(self, reg: Registry, name, domain, secret) -> bool:
        """True when ``secret`` was the credential of node ``name`` of ``domain`` that has left
        (a replayed ``leave``); False for anything else."""
        rec = reg.nodes.get(name) if isinstance(name, str) else None
        return (
            rec is not None
            and rec.state is NodeState.LEFT
            and rec.domain == domain
            and _plausible(secret)
            and self.verify(node_material(name, domain, secret), rec.credential_hash)
        )


def _plausible(secret) -> bool:
    return isinstance(secret, str) and 0 < len(secret) <= MAX_SECRET_CHARS
