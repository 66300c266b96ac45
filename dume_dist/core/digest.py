"""sha256 of local files, read in chunks (every checksum of a file in the project is this one)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 24


def file_sha256_size(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a local file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            digest.update(data)
            size += len(data)
    return digest.hexdigest(), size


def file_sha256(path: str | Path) -> str:
    return file_sha256_size(path)[0]
