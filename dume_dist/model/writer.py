"""Writing model directories: a streaming sharded safetensors writer, atomic directory
publication, and the DUME checkpoint (contract in ``modeling_dume.py``) with its manifest.

Crash safety: everything is written into a temporary directory beside the output, the manifest
last, and the directory is renamed into place with ``os.replace``; on any error the temporary
directory is removed. A reader never sees a half-written model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from dume_dist.core.digest import file_sha256
from dume_dist.model.experts import (
    TORCH_TO_SAFETENSORS,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

MANIFEST_NAME = "dume_manifest.json"
MANIFEST_SCHEMA_VERSION = 1
DEFAULT_SHARD_BYTES = 2 << 30
MODELING_FILE = Path(__file__).with_name("modeling_dume.py")


def remote_code_files() -> list[Path]:
    """The remote-code model: ``modeling_dume.py`` and the files it imports relatively."""
    from transformers.dynamic_module_utils import get_relative_import_files

    return [MODELING_FILE] + sorted(Path(f) for f in get_relative_import_files(str(MODELING_FILE)))


_RESERVED_MANIFEST_KEYS = {"schema_version", "files"}


class ShardedWriter:
    """Add tensors one at a time; each is written to disk as it arrives (peak memory: one tensor).

    ``new_part()`` starts a new shard (unless ``split_parts`` is off: a model small enough for
    one file): a model's parts (the backbone, the routers, each expert) then live in shards of
    their own. A shard is also closed once it holds ``max_shard_bytes``. ``close()`` names the shards
    ``model-0000i-of-0000n.safetensors`` and writes ``model.safetensors.index.json``; a single
    shard is written as ``model.safetensors`` with no index (what ``save_pretrained`` does).

    A shard's tensor bytes go to a data file as they arrive; when the shard closes its
    safetensors header (names, dtypes, shapes, offsets in arrival order) is written and the data
    appended after it, so the header needs no tensor in memory.
    """

    def __init__(
        self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, split_parts=True
    ):
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.split_parts = split_parts
        self._data = None  # open data file of the current shard
        self._entries: dict[str, dict] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self._names: set[str] = set()
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert not self._closed, "writer is closed"
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.nbytes
        if self._entries and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        if self._data is None:
            self._data = open(self.out_dir / f".shard-{len(self._shards):05d}.data", "wb")
        self._data.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self._entries[name] = {
            "dtype": TORCH_TO_SAFETENSORS[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._pending_bytes, self._pending_bytes + nbytes],
        }
        self._names.add(name)
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def new_part(self) -> None:
        """Close the current shard (with ``split_parts``): what is added next starts a shard of
        its own."""
        if self.split_parts:
            self._flush()

    def _flush(self) -> None:
        if self._data is None:
            return
        data_path = Path(self._data.name)
        self._data.close()
        self._data = None
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        header = json.dumps(
            {"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")
        ).encode()
        header += b" " * (-len(header) % 8)  # data aligned to 8 bytes, as safetensors writes
        with open(path, "wb") as out, open(data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little") + header)
            shutil.copyfileobj(data, out, 1 << 24)
        data_path.unlink()
        self._shards.append((path, list(self._entries)))
        self._entries, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, name the shards, write the index; returns the weight files written."""
        assert not self._closed, "writer is closed"
        self._flush()
        self._closed = True
        if not self._shards:
            raise ValueError("no tensors were written")
        if len(self._shards) == 1:
            final = self.out_dir / WEIGHTS_NAME
            os.replace(self._shards[0][0], final)
            return [final]
        num = len(self._shards)
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self._shards):
            final = self.out_dir / f"model-{i + 1:05d}-of-{num:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {
            "metadata": {"total_size": self._total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return files

    def abort(self) -> None:
        """Close the open data file (the directory is removed by its owner)."""
        if self._data is not None:
            self._data.close()
            self._data = None


# -- atomic directories --------------------------------------------------------------------------


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Raise unless ``out_dir`` may be written: absent, an empty directory, or ``overwrite``."""
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ValueError(f"output directory {out} exists and is not empty (use overwrite)")
    return out


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir``
    atomically, on error it is removed and ``out_dir`` is left as it was."""
    out = check_output_dir(out_dir, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(out, overwrite)  # nobody created it meanwhile
        if out.exists() and any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # over an empty directory too (POSIX rename)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_checksums(root: Path, exclude: Sequence[str] = (MANIFEST_NAME,)) -> dict[str, dict]:
    """``{relative posix path: {"sha256", "size"}}`` of every file under ``root``, sorted."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in exclude:
            out[rel] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    return out


def verify_checkpoint(model_dir: str | Path) -> dict:
    """Check every file against the manifest's sha256 and size, and that no file is missing or
    unlisted. Returns the manifest; raises ValueError naming the first bad file."""
    root = Path(model_dir)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ValueError(f"no {MANIFEST_NAME} in {root}")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read {manifest_path}: {exc}") from None
    for rel, meta in listed.items():
        path = root / rel
        if not path.is_file():
            raise ValueError(f"checkpoint file {path} is missing")
        if path.stat().st_size != meta["size"] or file_sha256(path) != meta["sha256"]:
            raise ValueError(f"checkpoint file {path} is corrupt (checksum mismatch)")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    unlisted = sorted(present - set(listed) - {MANIFEST_NAME})
    if unlisted:
        raise ValueError(f"checkpoint file {root / unlisted[0]} is not in the manifest")
    return manifest


# -- the DUME checkpoint -------------------------------------------------------------------------


def write_dume_checkpoint(out_dir: str | Path, inp, options=None) -> dict:
    """Write ``inp`` (``model.formats.CheckpointInput``) as a DUME model directory, atomically;
    returns its manifest. See ``model/formats/dume.py``."""
    from dume_dist.model.formats import write_checkpoint

    return write_checkpoint("dume", inp, out_dir, options)
