"""Signed requests between a node agent and the coordinator's HTTP API (no Ray, no I/O).

A node's credential is a random secret the operator issued (`genesis.issue_node_credential`).
From it the node derives an **Ed25519 key pair** bound to its name and domain
(`signing_key`); the registry stores only the public key (and the scrypt hash used by the
in-cluster path), so neither the API nor the store can sign for a node, and the secret never
crosses the network.

Every request carries, in headers, the node, its domain, a timestamp (ms since the epoch), a
nonce and an Ed25519 signature over `canonical`: scheme, method, path with query, node, domain,
the sha256 of the body, timestamp and nonce. The API computes the body's sha256 from the bytes it
received, so a modified body (or path, or method) fails the signature. `ReplayGuard` (held by the
coordinator, one per incarnation) refuses a timestamp outside ±``window_s``, a timestamp older
than the incarnation (calls Ray replays after a restart must be signed again) and any nonce seen
before. `Throttle` counts failed authentications per key (node, client address).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
import time
from collections import deque

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SCHEME = "dume-ed25519-v1"
HEADER_NODE = "x-dume-node"
HEADER_DOMAIN = "x-dume-domain"
HEADER_TIMESTAMP = "x-dume-timestamp"
HEADER_NONCE = "x-dume-nonce"
HEADER_SIGNATURE = "x-dume-signature"
SIGNED_HEADERS = (HEADER_NODE, HEADER_DOMAIN, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)
NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
WINDOW_S = 120.0
EXPIRED = "request expired: sign it again"  # the one refusal a client retries by re-signing


class AuthError(PermissionError):
    """A refused signature. ``expired`` tells the client that signing again may succeed."""

    def __init__(self, message: str, expired: bool = False):
        super().__init__(message)
        self.expired = expired

    def __reduce__(self):  # keeps ``expired`` across Ray's pickling of task errors
        return (AuthError, (str(self), self.expired))


def signing_key(name: str, domain: str, secret: str) -> Ed25519PrivateKey:
    seed = hashlib.sha256(f"{SCHEME}\n{name}\n{domain}\n{secret}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key(name: str, domain: str, secret: str) -> str:
    """The public half of a node's signing key, base64 (what the registry stores)."""
    raw = (
        signing_key(name, domain, secret).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    return base64.b64encode(raw).decode()


def canonical(method: str, path: str, name: str, domain: str, body_sha256: str, timestamp_ms: int,
              nonce: str) -> bytes:  # fmt: skip
    return "\n".join(
        [SCHEME, method.upper(), path, name, domain, body_sha256, str(timestamp_ms), nonce]
    ).encode()


def sign_request(name: str, domain: str, secret: str, method: str, path: str, body: bytes,
                 now: float | None = None) -> dict[str, str]:  # fmt: skip
    """Headers that authenticate one request (``path`` includes the query string)."""
    ts = int((time.time() if now is None else now) * 1000)
    nonce = secrets.token_hex(16)
    digest = hashlib.sha256(body).hexdigest()
    sig = signing_key(name, domain, secret).sign(
        canonical(method, path, name, domain, digest, ts, nonce)
    )
    return {
        HEADER_NODE: name,
        HEADER_DOMAIN: domain,
        HEADER_TIMESTAMP: str(ts),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: base64.b64encode(sig).decode(),
    }


def envelope(headers, method: str, path: str, body_sha256: str) -> dict:
    """The signed request as the coordinator checks it: the headers plus what the server itself
    saw (method, path, the sha256 of the body it read). Missing or malformed fields: AuthError."""
    missing = [h for h in SIGNED_HEADERS if not headers.get(h)]
    if missing:
        raise AuthError(f"unsigned request (missing {missing[0]})")
    ts = headers[HEADER_TIMESTAMP]
    if not ts.isdigit() or len(ts) > 16:
        raise AuthError("malformed timestamp")
    if not NONCE_RE.match(headers[HEADER_NONCE]):
        raise AuthError("malformed nonce")
    if len(headers[HEADER_SIGNATURE]) > 100:
        raise AuthError("malformed signature")
    return {
        "node": headers[HEADER_NODE],
        "domain": headers[HEADER_DOMAIN],
        "method": method.upper(),
        "path": path,
        "body_sha256": body_sha256,
        "timestamp_ms": int(ts),
        "nonce": headers[HEADER_NONCE],
        "signature": headers[HEADER_SIGNATURE],
    }


def is_envelope(value) -> bool:
    return isinstance(value, dict) and "signature" in value and "nonce" in value


def check_signature(env: dict, public_key_b64: str | None) -> None:
    """AuthError unless ``env`` is signed by the key ``public_key_b64``."""
    if not public_key_b64:
        raise AuthError("this node has no signing key: the operator must rotate its credential")
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
        sig = base64.b64decode(env["signature"], validate=True)
        if not SHA256_RE.match(env["body_sha256"]):
            raise ValueError("body digest")
        key.verify(sig, canonical(env["method"], env["path"], env["node"], env["domain"],
                                  env["body_sha256"], int(env["timestamp_ms"]), env["nonce"]))  # fmt: skip
    except (InvalidSignature, ValueError, TypeError, KeyError):
        raise AuthError("signature rejected") from None


class ReplayGuard:
    """Freshness of signed requests for one coordinator incarnation: ±``window_s`` around now,
    not before the incarnation started, each nonce once (remembered for the window)."""

    def __init__(self, window_s: float = WINDOW_S, max_nonces: int = 1_000_000):
        self.window_s = window_s
        self.max_nonces = max_nonces
        self.started_ms = int(time.time() * 1000)
        self._seen: dict[str, float] = {}
        self._order: deque[tuple[float, str]] = deque()
        self._lock = threading.Lock()

    def check_time(self, env: dict, now: float | None = None) -> None:
        now_ms = (time.time() if now is None else now) * 1000
        ts = int(env["timestamp_ms"])
        if abs(now_ms - ts) > self.window_s * 1000 or ts < self.started_ms:
            raise AuthError(EXPIRED, expired=True)

    def use_nonce(self, env: dict, now: float | None = None) -> None:
        """Record the nonce of a request whose signature checked out; AuthError if seen. The API
        tags each coordinator call it makes for one request (``call``); the pair is used once."""
        now = time.time() if now is None else now
        key = f"{env['node']}/{env['nonce']}/{env.get('call', '')}"
        with self._lock:
            while self._order and self._order[0][0] < now:
                self._seen.pop(self._order.popleft()[1], None)
            if key in self._seen:
                raise AuthError("replayed request (nonce already used)")
            if len(self._seen) >= self.max_nonces:
                raise AuthError("too many requests in flight: retry later", expired=True)
            expiry = now + 2 * self.window_s
            self._seen[key] = expiry
            self._order.append((expiry, key))


def verify(env: dict, public_key_b64: str | None, guard: ReplayGuard, name: str, domain: str,
           now: float | None = None) -> None:  # fmt: skip
    """The whole check, cheapest first: identity, freshness, signature, then the nonce (a nonce
    is remembered only for a request whose signature is valid)."""
    if env.get("node") != name or env.get("domain") != domain:
        raise AuthError("signed for another node")
    guard.check_time(env, now)
    check_signature(env, public_key_b64)
    guard.use_nonce(env, now)


class Throttle:
    """Failed authentications per key in a sliding window; a key with ``limit`` failures in the
    last ``window_s`` seconds is refused until the oldest of them leaves the window."""

    def __init__(self, limit: int = 10, window_s: float = 60.0, max_keys: int = 100_000):
        self.limit, self.window_s, self.max_keys = limit, window_s, max_keys
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, key: str, now: float | None = None) -> float:
        """Seconds until ``key`` may try again (0: it may now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._prune(key, now)
            if len(times) < self.limit:
                return 0.0
            return max(0.0, times[0] + self.window_s - now)

    def fail(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if key not in self._failures and len(self._failures) >= self.max_keys:
                self._failures.pop(next(iter(self._failures)))  # oldest key goes first
            self._prune(key, now).append(now)

    def _prune(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times
