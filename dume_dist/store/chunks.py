"""Files as lists of content-addressed chunks: what lets model versions share tensors.

A file is cut into chunks and each chunk is stored once under its sha256; a version lists, per
file, the chunks that make it up. Cuts of a safetensors file: its header, then one chunk per
run of consecutive tensors of the same *part* — the routers, each expert
(``*.experts.<j>.*``), the rest (the backbone) — so two versions with the same expert share its
chunk even where the expert's index, and so its tensor names (which live in the header), differ.
Router tables with large per-expert rows (the n-gram router's counts) are cut row by row.
Any other file (or one whose header does not parse) is one chunk.

Every cut is computed by reading the file in bounded pieces; nothing is held whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass

PIECE = 8 << 20
MAX_HEADER_BYTES = 100 << 20
ROW_CHUNK_MIN = 64 << 10
SHA256 = re.compile(r"^[0-9a-f]{64}$")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
# per-layer routers / gates, and sequence-level routers (top-level modules beside model., lm_head.)
_ROUTER = re.compile(r"(^|\.)(router|gate)\.|^(?!model\.|lm_head\.)[^.]+\.")


@dataclass(frozen=True)
class Chunk:
    offset: int
    size: int
    sha256: str

    def entry(self) -> dict:
        return {"sha256": self.sha256, "size": self.size}


def part_of(name: str) -> str:
    m = _EXPERT.search(name)
    if m:
        return f"expert:{m.group(1)}"
    return "router" if _ROUTER.search(name) else "backbone"


def _router_rows(name: str, begin: int, end: int, rows: int) -> list | None:
    """A router table with large per-expert rows (the n-gram router's counts: row j is expert
    j's alone) is cut row by row, so versions sharing an expert share its rows too."""
    if part_of(name) != "router" or rows < 1 or (end - begin) % rows:
        return None
    step = (end - begin) // rows
    if step < ROW_CHUNK_MIN:
        return None
    return [(b, b + step, f"router-row:{name}:{b}") for b in range(begin, end, step)]


def _safetensors_cuts(path: str, size: int) -> list[tuple[int, int]] | None:
    """``[(offset, size)]`` of the header and of each run of one part, or None if ``path`` is
    not a well-formed safetensors file."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                return None
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return None
    base = 8 + header_len
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            rows = int(meta["shape"][0]) if len(meta["shape"]) == 2 else 0
        except (KeyError, TypeError, ValueError, IndexError):
            return None
        spans += _router_rows(name, begin, end, rows) or [(begin, end, part_of(name))]
    spans.sort()
    cuts, pos, current = [(0, base)], 0, None
    for begin, end, part in spans:
        if begin != pos or end < begin:
            return None  # not contiguous: not a file we can cut safely
        if part == current and cuts[-1][0] + cuts[-1][1] == base + begin:
            cuts[-1] = (cuts[-1][0], cuts[-1][1] + end - begin)
        else:
            cuts.append((base + begin, end - begin))
        pos, current = end, part
    if base + pos != size:
        return None
    return [c for c in cuts if c[1] > 0]


def _hash_range(f, offset: int, size: int) -> str:
    f.seek(offset)
    h, left = hashlib.sha256(), size
    while left > 0:
        data = f.read(min(PIECE, left))
        if not data:
            raise ValueError(f"{f.name} changed while it was read")
        h.update(data)
        left -= len(data)
    return h.hexdigest()


def plan_file(path: str) -> tuple[list[Chunk], str, int]:
    """The chunks of ``path``, its sha256 and size (streamed)."""
    size = os.path.getsize(path)
    cuts = None
    if path.endswith(".safetensors") and size > 8:
        cuts = _safetensors_cuts(path, size)
    cuts = cuts or [(0, size)]
    with open(path, "rb") as f:
        chunks = [Chunk(off, n, _hash_range(f, off, n)) for off, n in cuts]
        whole = chunks[0].sha256 if len(chunks) == 1 else _hash_range(f, 0, size)
    return chunks, whole, size


def check_chunk_list(rel: str, chunks) -> list[dict]:
    """Validate a manifest's chunk list (it names store keys): ValueError on anything odd."""
    if not isinstance(chunks, list) or not chunks:
        raise ValueError(f"manifest lists no chunks for {rel}")
    for c in chunks:
        if (
            not isinstance(c, dict)
            or not isinstance(c.get("sha256"), str)
            or not SHA256.fullmatch(c["sha256"])
            or not isinstance(c.get("size"), int)
            or isinstance(c.get("size"), bool)
            or c["size"] < 0
        ):
            raise ValueError(f"manifest has a malformed chunk for {rel}: {c!r}")
    return chunks
