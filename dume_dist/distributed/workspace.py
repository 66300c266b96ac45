"""The coordinator's local cache (``work_dir``): the backbone's files and the nodes' expert MLP
blobs as directories the checkpoint writer reads. Everything here can be rebuilt from the store."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from dume_dist.distributed.artifacts import check_mlp_blob, mlp_spec
from dume_dist.distributed.state import Registry
from dume_dist.store import BlobStore, ObjectStore


class Workspace:
    def __init__(self, work_dir: Path, store: ObjectStore, blobs: BlobStore):
        self.work_dir, self.store, self.blobs = Path(work_dir), store, blobs

    def backbone_dir(self, reg: Registry) -> Path:
        record = reg.backbone
        local = self.work_dir / "backbone" / record["fingerprint"]
        if not local.is_dir():
            self.store.get_dir(record["prefix"], str(local), record["files"])
        return local

    def stats_file(self, blob_id: str) -> Path:
        """A statistics blob as a local file (verified on download, kept by content hash)."""
        path = self.work_dir / "stats-cache" / f"{blob_id.rsplit('/', 1)[-1]}.safetensors"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(self.blobs.get_blob(blob_id))
            tmp.rename(path)
        return path

    def prune_stats(self, keep: set[str]) -> None:
        """Delete cached statistics files whose blob sha256 is not in ``keep`` (a node unlearned
        or replaced: its statistics leave this disk as they left the store)."""
        cache = self.work_dir / "stats-cache"
        for path in cache.glob("*.safetensors") if cache.is_dir() else []:
            if path.stem not in keep:
                path.unlink(missing_ok=True)

    def expert_spec(self, reg: Registry, name: str, fingerprint: str, mlp: bytes | None = None):
        """An ExpertSpec over the node's MLP blob, cached under work_dir; validated on creation
        (layout of the backbone's MLPs, the claimed fingerprint)."""
        local = self.work_dir / "experts" / name / fingerprint
        backbone_dir = self.backbone_dir(reg)
        tokenizer_hash = reg.backbone["tokenizer_hash"]
        if not local.is_dir():
            if mlp is None:
                mlp = self.blobs.get_blob(reg.nodes[name].expert.blob)
            tmp = local.with_name(f".tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            try:
                (tmp / "model.safetensors").write_bytes(mlp)
                spec = mlp_spec(name, tmp, backbone_dir, tokenizer_hash)
                check_mlp_blob(spec, reg.backbone, fingerprint)
            except Exception:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            tmp.rename(local)
        return mlp_spec(name, local, backbone_dir, tokenizer_hash)
