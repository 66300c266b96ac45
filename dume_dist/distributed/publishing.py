"""Publishing: from the registry's active contributions to an immutable version, and the marks
of versions that contained a node later unlearned.

A version's bits depend only on `state.content` (the backbone, settings, and per active node its
expert and statistics hashes); its manifest carries that ``content_digest``. Statistics are read
back from the store and summed in canonical order (`dume_dist.distributed.state`), so a
re-publish of the same content is bit-identical, whichever coordinator runs it.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import torch

from dume_dist.core.private import privacy_record
from dume_dist.distributed.artifacts import routing_of
from dume_dist.distributed.state import Registry, VersionEntry, now
from dume_dist.distributed.transitions import mark_unlearned
from dume_dist.distributed.workspace import Workspace
from dume_dist.store import BlobStore, StoreError, StoreNotFound, VersionStore, parse_version

UNLEARNED_MARK = "contains_unlearned"


class Publisher:
    def __init__(self, versions: VersionStore, blobs: BlobStore, workspace: Workspace):
        self.versions, self.blobs, self.workspace = versions, blobs, workspace

    def reconcile(self, reg: Registry) -> bool:
        """Hold the invariants between the registry and the listed versions, whatever crashed
        or raced before: every listed version is in the registry (a version whose publisher
        died before recording it is adopted from its manifest; one whose manifest cannot be
        read is hidden), and every version that contains an unlearned node is marked, or
        purged when its unlearning asked for that. Returns whether ``reg`` changed."""
        changed = False
        known = {v.version for v in reg.versions}
        for vid in self.versions.list_versions():
            if vid not in known:
                reg.versions.append(self._adopt(vid))
                changed = True
        reg.versions.sort(key=lambda v: parse_version(v.version))
        for name in reg.unlearned():
            node = reg.nodes[name]
            for entry in reg.versions_containing(name):
                if name not in entry.marked or (node.purge and not entry.purged):
                    self.mark(entry, name, node.purge, node.reason or "unlearned")
                    changed = True
        return changed

    def _adopt(self, vid: str) -> VersionEntry:
        try:
            manifest = self.versions.get_manifest(vid)
            names = [c["name"] for c in manifest["contributors"]]
            if not all(isinstance(n, str) for n in names):
                raise TypeError("contributor names")
        except (StoreError, KeyError, TypeError) as exc:
            if isinstance(exc, StoreNotFound):  # purged meanwhile
                return VersionEntry(vid, "", [], None, "adopted", now(), purged=True, adopted=True)
            self.versions.purge(vid, reason="its manifest is unreadable and the registry does not know it")  # fmt: skip
            return VersionEntry(vid, "", [], None, "hidden", now(), purged=True, adopted=True)
        return VersionEntry(vid, str(manifest.get("content_digest", "")), names,
                            manifest.get("parent"), f"adopted ({manifest.get('trigger', '')})",
                            str(manifest.get("created_at", now())), adopted=True)  # fmt: skip

    def contributions(self, reg: Registry, names: list[str]):
        """Fit contributions ``{"<node>/<sha256>": (expert index, stats)}`` and held-out ones
        ``{β: {"<node>/<fit sha256>": (expert index, stats)}}`` (sorted keys: canonical order).

        Streaming: the blobs are cached as files in the workspace and decoded one at a time when
        the solve reads them, so the solve holds one contribution and the running sums."""
        from dume_dist.model.stats_files import StatsFiles, contributions

        keep = {
            blob.rsplit("/", 1)[-1]
            for node in reg.nodes.values()
            for entry in node.stats
            for blob in (entry.blob, *(h.blob for h in entry.holdout))
        }
        self.workspace.prune_stats(keep)
        fit, holdout, index = StatsFiles(), {}, {}
        for j, name in enumerate(names):
            for entry in reg.nodes[name].stats:
                key = f"{name}/{entry.sha256}"
                index[key] = j
                fit.add_file(key, self.workspace.stats_file(entry.blob))
                for held in entry.holdout:
                    beta = float(held.smoothing)
                    holdout.setdefault(beta, StatsFiles(fit.root / f"holdout-{len(holdout)}"))
                    holdout[beta].add_file(key, self.workspace.stats_file(held.blob))
        return (
            contributions(fit, index),
            {beta: contributions(files, index) for beta, files in holdout.items()},
        )

    def manifest(self, reg: Registry, names: list[str], digest: str, trigger: str, solved) -> dict:
        nodes, last = reg.nodes, reg.last_version()
        return {
            "content_digest": digest,
            "trigger": trigger,
            "parent": last.version if last else None,
            "contributors": [
                {
                    "name": n,
                    "domain": nodes[n].domain,
                    "expert_index": j,
                    "expert_fingerprint": nodes[n].expert.fingerprint,
                    "stats": [s.manifest() for s in nodes[n].stats],
                    "num_tokens": nodes[n].num_tokens,
                    "privacy": privacy_record([s.dp for s in nodes[n].stats]),
                }
                for j, n in enumerate(names)
            ],
            "expert_order": "active node names sorted; expert index = position",
            "max_tokens_per_seq": reg.settings["max_tokens_per_seq"],
            "routing": solved.manifest_routing(),
        }

    def publish(self, reg: Registry, digest: str, trigger: str) -> str:
        """Solve the routers of the active nodes, write the checkpoint, upload it as a version."""
        from dume_dist.model.backbone import Backbone
        from dume_dist.model.formats import CheckpointInput, Provenance
        from dume_dist.model.routing import solve_routing
        from dume_dist.model.writer import write_dume_checkpoint

        names, settings, nodes = reg.active_nodes(), reg.settings, reg.nodes
        spec = routing_of(settings)
        fit, holdout = self.contributions(reg, names)
        solved = solve_routing(spec, fit, len(names), holdout)
        backbone = Backbone.load(self.workspace.backbone_dir(reg))
        specs = [self.workspace.expert_spec(reg, n, nodes[n].expert.fingerprint) for n in names]
        inp = CheckpointInput(
            backbone=backbone, experts=specs, routing=solved, top_k=min(spec.top_k, len(names)),
            temperature=settings["temperature"],
            provenance=Provenance(
                domains={n: nodes[n].domain for n in names},
                expert_fingerprints={n: nodes[n].expert.fingerprint for n in names},
                extra_manifest=self.manifest(reg, names, digest, trigger, solved),
            ),
        )  # fmt: skip
        build = self.workspace.work_dir / "build" / uuid.uuid4().hex[:12]
        try:
            written = write_dume_checkpoint(build / "model", inp)
            for key in ("files", "schema_version", "parent_version"):
                written.pop(key, None)
            return self.versions.publish(str(build / "model"), written)
        finally:
            shutil.rmtree(build, ignore_errors=True)

    def mark(self, entry: VersionEntry, name: str, purge: bool, reason: str) -> None:
        """Mark one version that contained ``name`` (and purge it if asked). Idempotent. A
        version whose manifest cannot be read is purged: it must not stay listed unmarked."""
        vid, current = entry.version, None
        if not entry.purged:
            try:
                current = self.versions.get_manifest(vid)["marks"].get(UNLEARNED_MARK, [])
            except StoreNotFound:
                entry.purged = True  # purged out of band
            except StoreError:  # unreadable: hidden instead
                purge = True
        if current is not None and name not in current and not purge:
            self.versions.mark(vid, UNLEARNED_MARK, sorted({*current, name}))
        mark_unlearned(entry, name)
        if purge and not entry.purged:
            self.versions.purge(vid, reason=f"contains unlearned node {name}: {reason}")
            entry.purged = True


def routers_of(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The router tensors of a published DUME model directory (for comparisons): the per-layer
    routers and sequence-level routers: everything but the backbone and the experts."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(
            {
                k: v
                for k, v in load_file(str(file)).items()
                if ".mlp.router." in k or not k.startswith(("model.", "lm_head."))
            }
        )
    return out
