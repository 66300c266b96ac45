"""The safetensors header of a contributor's blob, read and checked before any tensor is.

A blob is ``8-byte little-endian header length | JSON header | tensor bytes``. `parse_header`
reads only the header (bounded in size) and checks that it describes exactly the bytes that
follow: known dtypes, non-negative integer shapes, offsets that tile the data in order with the
size each dtype and shape needs. `check_layout` then compares names, dtypes and shapes with what
the receiver expects, so a blob of the wrong shape is refused before ``safetensors`` allocates
a single tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MAX_HEADER_BYTES = 1 << 20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_header(data: bytes, what: str = "blob") -> tuple[dict[str, str], dict[str, Entry]]:
    """``(metadata, {tensor name: Entry})`` of a safetensors blob; a one-line ValueError for
    anything malformed. Reads nothing past the header."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8:
        raise ValueError(f"{what} is not safetensors (shorter than its header length)")
    size = int.from_bytes(bytes(data[:8]), "little")
    if not 2 <= size <= min(MAX_HEADER_BYTES, len(data) - 8):
        raise ValueError(f"{what} is not safetensors (header length {size} out of range)")
    try:
        header = json.loads(bytes(data[8 : 8 + size]))
    except (ValueError, RecursionError):
        raise ValueError(f"{what} is not safetensors (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{what} is not safetensors (its header is not a JSON object)")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{what} has malformed metadata (a map of strings expected)")
    entries = {name: _entry(what, name, raw) for name, raw in header.items()}
    _check_tiling(what, entries, len(data) - 8 - size)
    return meta, entries


def _entry(what: str, name: str, raw) -> Entry:
    try:
        dtype, shape, (begin, end) = raw["dtype"], raw["shape"], raw["data_offsets"]
        ok = (
            dtype in DTYPE_BYTES
            and isinstance(shape, list)
            and len(shape) <= 8
            and all(type(n) is int and 0 <= n < 2**48 for n in shape)
            and type(begin) is int
            and type(end) is int
        )
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{what}: tensor {name[:60]!r} has a malformed header entry")
    if end - begin != DTYPE_BYTES[dtype] * math.prod(shape):
        raise ValueError(f"{what}: tensor {name[:60]!r} has offsets that do not fit its shape")
    return Entry(dtype, tuple(shape), begin, end)


def _check_tiling(what: str, entries: dict[str, Entry], data_bytes: int) -> None:
    pos = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != pos:
            raise ValueError(f"{what}: tensor data overlaps or leaves gaps")
        pos = entry.end
    if pos != data_bytes:
        raise ValueError(f"{what}: header describes {pos} bytes of tensors, the blob has {data_bytes}")  # fmt: skip


def check_layout(what: str, entries: dict[str, Entry], expected: dict[str, tuple[str, tuple]],
                 optional: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Exactly the ``expected`` tensors (plus any of ``optional``), each ``(dtype, shape)``; a
    ``None`` in an expected shape matches any size (checked by the caller)."""
    unknown = sorted(set(entries) - set(expected))
    missing = sorted(set(expected) - set(entries) - set(optional))
    if unknown or missing:
        name = (unknown or missing)[0][:60]
        raise ValueError(f"{what}: tensor {name!r} is {'unexpected' if unknown else 'missing'}")
    for name, entry in entries.items():
        dtype, shape = expected[name]
        fits = len(shape) == len(entry.shape) and all(
            s is None or s == n for s, n in zip(shape, entry.shape)
        )
        if entry.dtype != dtype or not fits:
            raise ValueError(
                f"{what}: tensor {name!r} is {entry.dtype} {list(entry.shape)}, expected "
                f"{dtype} {['*' if s is None else s for s in shape]}"
            )
