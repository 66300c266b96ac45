"""Contributor and operator credentials (DESIGN §6): new secrets, salted hashes, checks.

The coordinator stores only `hash_secret(secret)` (salted scrypt from `hashlib`);
`verify_secret` recomputes it and compares in constant time. The hash string is
self-describing, so the cost parameters can be raised later without breaking old hashes:

  scrypt$<n>$<r>$<p>$<salt, urlsafe base64>$<hash, urlsafe base64>
"""

import base64
import hashlib
import hmac
import secrets

_N, _R, _P = 2**14, 8, 1  # ~16 MiB and a few tens of ms per hash
_SALT_BYTES = 16
_HASH_BYTES = 32


def new_secret(num_bytes: int = 32) -> str:
    """A fresh random secret, URL-safe text."""
    return secrets.token_urlsafe(num_bytes)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * n * r + 2**20, dklen=_HASH_BYTES
    )


def hash_secret(secret: str) -> str:
    if not isinstance(secret, str) or not secret:
        raise ValueError("secret must be a non-empty str")
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(secret, salt, _N, _R, _P)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, hashed: str) -> bool:
    """True iff `secret` hashes to `hashed`. ValueError if `hashed` is not one of ours."""
    parts = hashed.split("$") if isinstance(hashed, str) else []
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not a hash made by hash_secret")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, expected = _unb64(parts[4]), _unb64(parts[5])
    except ValueError as e:
        raise ValueError(f"malformed secret hash: {e}") from e
    if not (1 < n <= 2**20 and n & (n - 1) == 0 and 0 < r <= 64 and 0 < p <= 16):
        raise ValueError(f"secret hash has out-of-range scrypt parameters n={n} r={r} p={p}")
    if not isinstance(secret, str):
        return False
    return hmac.compare_digest(_scrypt(secret, salt, n, r, p), expected)
