"""The coordinator: registry of contributors, statistics and experts, versions (DESIGN §4).

A plain class. `dume_dist.distributed.cluster` wraps it with ``ray.remote`` as a named, detached
actor (``max_restarts=-1``, ``max_task_retries=-1``); unit tests drive it directly. Its whole
state lives in the store — the registry (`RegistryStore`, one revision per change), statistics
and expert MLP blobs (`BlobStore`), versions (`VersionStore`) — so a restarted actor, or a new
cluster pointed at the same store, carries on where the old one stopped.

Each method does one thing, in this order: authenticate (`identity`; outside the registry lock,
so slow credential checks do not hold up other calls), validate everything the caller sent
(`validation`: bad input changes nothing), apply one transition to the typed registry
(`transitions`), save it, clean up blobs no longer referenced, and publish when the set of
contributions changed and publication is not held (`publishing`).

Every mutating method is **idempotent**: Ray replays an in-flight call after a restart, so a
second identical call must change nothing and return the same kind of answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import threading
from pathlib import Path

from dume_dist.core.private import guarantee_of
from dume_dist.distributed import signing
from dume_dist.distributed import transitions as tr
from dume_dist.distributed.artifacts import record_vocab_size
from dume_dist.distributed.identity import Verifier, node_material, operator_material
from dume_dist.distributed.publishing import UNLEARNED_MARK, Publisher, routers_of
from dume_dist.distributed.state import (
    ExpertRecord,
    HoldoutEntry,
    NodeState,
    Registry,
    StatsEntry,
    check_name,
    now,
    public_view,
)
from dume_dist.distributed.validation import (
    StatsValidator,
    check_credential_hash,
    check_mlp_header,
    check_public_key,
    check_settings,
    check_text,
    stats_bytes,
)
from dume_dist.distributed.workspace import Workspace
from dume_dist.store import (
    BlobStore,
    ObjectStore,
    RegistryStore,
    VersionStore,
    coordinator_layout,
)

__all__ = [
    "UNLEARNED_MARK",
    "Coordinator",
    "check_settings",
    "node_material",
    "operator_material",
    "routers_of",
]


class Coordinator:
    """One coordinator per store. ``work_dir`` caches the backbone and expert MLPs locally."""

    def __init__(
        self, store_url: str, storage_options: dict | None = None, work_dir: str | None = None
    ):
        self.store_url = store_url
        self.storage_options = dict(storage_options or {})
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="dume-coord-"))
        self._store: ObjectStore | None = None  # opened on first use: __init__ never fails
        self._lock = threading.RLock()  # one registry change at a time (a threaded actor)
        self._open_lock = threading.Lock()
        self._verifier = Verifier()
        self._bounds: dict = {}  # backbone fingerprint -> feature norm bound per layer
        self._replay = signing.ReplayGuard()  # signed (HTTP API) requests of this incarnation

    # -- store --------------------------------------------------------------------------------

    def _open(self):
        with self._open_lock:  # not the registry lock: reads and credential checks never wait
            return self._open_locked()

    def _open_locked(self):
        if self._store is None:
            store = ObjectStore(self.store_url, self.storage_options)
            layout = coordinator_layout(store)
            blobs = BlobStore(store, layout.blobs)
            versions = VersionStore(store, layout.versions)
            workspace = Workspace(self.work_dir, store, blobs)
            self._stores = (store, RegistryStore(store, layout.registry), blobs, versions,
                            Publisher(versions, blobs, workspace), workspace)  # fmt: skip
            self._store = store
        return self._stores

    store = property(lambda self: self._open()[0])
    registry = property(lambda self: self._open()[1])
    blobs = property(lambda self: self._open()[2])
    versions = property(lambda self: self._open()[3])
    publisher = property(lambda self: self._open()[4])
    workspace = property(lambda self: self._open()[5])

    def _load(self) -> tuple[Registry | None, int]:
        state, rev = self.registry.load(check=Registry.from_json)
        return (Registry.from_json(state) if state else None), rev

    def _load_founded(self) -> tuple[Registry, int]:
        reg, rev = self._load()
        if reg is None:
            raise ValueError(
                f"store {self.store_url} has no coordinator registry: run `dume coordinator start` first"
            )
        return reg, rev

    def _save(self, reg: Registry, rev: int) -> int:
        return self.registry.save(reg.to_json(), rev)

    def _delete_blobs(self, blobs: list[str]) -> None:
        for blob in blobs:
            self.blobs.delete_blob(blob)

    @contextlib.contextmanager
    def _as_operator(self, secret):
        """The registry (loaded under the lock) once ``secret`` is the operator's."""
        self._verifier.check_operator(self._load_founded()[0], secret)  # outside the lock
        with self._lock:
            reg, rev = self._load_founded()
            self._verifier.check_operator(reg, secret)  # cached: the hash may have changed
            yield reg, rev

    @contextlib.contextmanager
    def _as_node(self, secret, name, domain):
        """``secret``: the node's secret (in-cluster callers) or a signed request (HTTP API),
        whose nonce is used up by the first check only."""
        self._verifier.check_node(self._load_founded()[0], name, domain, secret, self._replay)
        with self._lock:
            reg, rev = self._load_founded()
            self._verifier.check_node(reg, name, domain, secret)
            yield reg, rev

    # -- genesis ----------------------------------------------------------------------------

    def found(self, operator_hash: str, backbone: dict, settings: dict, hold: bool = False) -> dict:
        """Create the registry (the backbone's files are already in the store). Idempotent: a
        store founded on the same backbone is left as it is."""
        with self._lock:
            reg, rev = self._load()
            if reg is not None:
                if reg.backbone["fingerprint"] != backbone["fingerprint"]:
                    raise ValueError(
                        f"store {self.store_url} was founded on backbone {reg.backbone['fingerprint'][:12]}, "
                        f"not {backbone['fingerprint'][:12]} (use `dume coordinator rebase` to change it)"
                    )
                return {"founded": False, "revision": rev}
            missing = [
                f for f in backbone["files"] if not self.store.exists(f"{backbone['prefix']}/{f}")
            ]
            if missing:
                raise ValueError(f"backbone file {missing[0]} is not in the store")
            reg = Registry(check_settings(settings), dict(backbone), operator_hash, bool(hold))
            return {"founded": True, "revision": self._save(reg, rev)}

    # -- operator ---------------------------------------------------------------------------

    def add_node(self, operator_secret: str, name: str, domain: str, credential_hash: str,
                 public_key: str | None = None) -> dict:  # fmt: skip
        """Register a node; it will present the secret whose bound hash is ``credential_hash``
        (in the cluster) or sign with the key whose public half is ``public_key`` (HTTP API)."""
        with self._as_operator(operator_secret) as (reg, rev):
            check_name("node name", name)
            check_name("domain", domain)
            check_credential_hash(credential_hash)
            if public_key is not None:
                check_public_key(public_key)
            rec = reg.nodes.get(name)
            if rec is not None:
                if rec.credential_hash == credential_hash and rec.domain == domain:
                    return {"node": name, "created": False, "revision": rev}  # a replayed call
                retired = rec.state in (NodeState.LEFT, NodeState.UNLEARNED)
                again = (
                    "; a node name is never reused: register it under another" if retired
                    else f"; `dume admin rotate-credential --name {name}` issues it a new credential"
                )  # fmt: skip
                raise ValueError(
                    f"node {name!r} already exists (state {rec.state.value}, domain "
                    f"{rec.domain!r}){again}"
                )
            # Blobs live under the node's name: two names that one case-insensitive file
            # system (or object store prefix) would take for one would share, and delete, them.
            twin = next((n for n in reg.nodes if n.casefold() == name.casefold()), None)
            if twin is not None:
                raise ValueError(f"node {name!r} differs from node {twin!r} only in case")
            tr.add_node(reg, name, domain, credential_hash, public_key)
            return {"node": name, "created": True, "revision": self._save(reg, rev)}

    def rotate_credential(self, operator_secret: str, name: str, credential_hash: str,
                          public_key: str) -> dict:  # fmt: skip
        """Replace a node's credential (a leaked one, a routine change): the old secret and key
        stop working at once; its expert, statistics and state are kept. Idempotent."""
        with self._as_operator(operator_secret) as (reg, rev):
            return self._rotate(reg, rev, name, credential_hash, public_key)

    def rotate_own_credential(self, secret, name: str, domain: str, credential_hash: str,
                              public_key: str) -> dict:  # fmt: skip
        """A node replaces its own credential (authenticated with the current one)."""
        with self._as_node(secret, name, domain) as (reg, rev):
            return self._rotate(reg, rev, name, credential_hash, public_key)

    def _rotate(self, reg: Registry, rev: int, name, credential_hash, public_key) -> dict:
        check_credential_hash(credential_hash)
        check_public_key(public_key)
        if not tr.rotate(reg, name, credential_hash, public_key):
            return {"node": name, "rotated": False, "revision": rev}
        return {"node": name, "rotated": True, "revision": self._save(reg, rev)}

    def set_hold(self, operator_secret: str, hold: bool) -> dict:
        with self._as_operator(operator_secret) as (reg, rev):
            if reg.hold != bool(hold):
                reg.hold = bool(hold)
                rev = self._save(reg, rev)
            return {"hold": reg.hold, "revision": rev}

    def publish(self, operator_secret: str) -> dict:
        """Publish now (even while held) if the contributions changed since the newest version."""
        with self._as_operator(operator_secret):
            return {"version": self._maybe_publish("publish", force=True), **self._summary()}

    def unlearn(self, operator_secret: str, name: str, reason: str, purge: bool = False) -> dict:
        """Remove ``name``'s statistics and expert, delete its blobs, re-solve and publish; mark
        (or with ``purge`` delete) every earlier version that contained it."""
        with self._as_operator(operator_secret) as (reg, rev):
            reason = check_text("unlearning reason", reason.strip() if isinstance(reason, str) else reason)  # fmt: skip
            if name not in reg.nodes:
                raise ValueError(f"unknown node {str(name)[:80]!r}: nothing to unlearn")
            node = reg.nodes[name]
            if node.state is not NodeState.UNLEARNED or (purge and not node.purge):
                if node.state is not NodeState.UNLEARNED:
                    tr.retire(reg, name, NodeState.UNLEARNED, reason)
                node.purge = node.purge or bool(purge)
                rev = self._save(reg, rev)
            reg, rev = self._reconcile(reg, rev)  # marks (or purges) what contained it
            self.blobs.delete_owner(name)
            affected = [v.version for v in reg.versions_containing(name)]
            version = self._maybe_publish(f"unlearn {name}")
            return {"node": name, "version": version, "affected_versions": affected,
                    "purge": node.purge, **self._summary()}  # fmt: skip

    def rebase(self, operator_secret: str, backbone: dict) -> dict:
        """Change the backbone (its files are already in the store). Every statistics blob is
        then stale: it is deleted and its node goes back to ``registered`` until it recomputes."""
        with self._as_operator(operator_secret) as (reg, rev):
            if reg.backbone["fingerprint"] == backbone["fingerprint"]:
                return {"rebased": False, "revision": rev}
            for key in ("num_layers", "feature_dim", "mlp_layout", "tokenizer_hash"):
                if backbone[key] != reg.backbone[key]:
                    raise ValueError(f"the new backbone differs in {key}: experts would not fit it")
            stale = tr.rebase(reg, backbone)
            rev = self._save(reg, rev)
            self._delete_blobs(stale)
            return {"rebased": True, "revision": rev, "stale_blobs": len(stale)}

    # -- node agent -------------------------------------------------------------------------

    def node_info(self, secret: str, name: str, domain: str) -> dict:
        """What a node agent needs before it computes: the backbone record, the settings, its
        registered expert and the submission ids already counted."""
        with self._as_node(secret, name, domain) as (reg, rev):
            rec = reg.nodes[name]
            return {
                "backbone": reg.backbone,
                "settings": reg.settings,
                "expert": rec.expert.to_json() if rec.expert else None,
                "submissions": [s.submission_id for s in rec.stats],
                "state": rec.state.value,
                "revision": rev,
                "latest": reg.latest(),
            }

    def backbone_files(self, secret: str, name: str, domain: str) -> dict[str, bytes]:
        """The backbone's files (read from the store, checksums verified), for a node agent."""
        with self._as_node(secret, name, domain) as (reg, _):
            local = self.workspace.backbone_dir(reg)
            return {rel: (local / rel).read_bytes() for rel in reg.backbone["files"]}

    def backbone_chunk(self, rel: str, offset: int, length: int) -> bytes:
        """``length`` bytes of one backbone file from ``offset`` (the HTTP API streams the
        backbone with it after authenticating the node; the backbone is in every version)."""
        reg, _ = self._load_founded()
        if not isinstance(rel, str) or rel not in reg.backbone["files"]:
            raise ValueError(f"{str(rel)[:80]!r} is not a backbone file")
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length > 0):
            raise ValueError("offset and length must be non-negative integers")
        with open(self.workspace.backbone_dir(reg) / rel, "rb") as f:
            f.seek(offset)
            return f.read(min(length, 1 << 26))

    def register_expert(
        self, secret: str, name: str, domain: str, mlp: bytes, fingerprint: str
    ) -> dict:
        """Store a node's expert MLP weights. A different expert than before makes the node's
        statistics stale: they are dropped and it must resubmit (fingerprints never mix)."""
        with self._as_node(secret, name, domain) as (reg, rev):
            rec = reg.nodes[name]
            check_text("expert fingerprint", fingerprint, 64)
            if rec.expert is not None and rec.expert.fingerprint == fingerprint:
                return {"expert": rec.expert.to_json(), "changed": False, "revision": rev}
            check_mlp_header(mlp, reg.backbone["mlp_layout"])
            self.workspace.expert_spec(reg, name, fingerprint, bytes(mlp))  # validates it
            blob = self.blobs.put_blob("expert", name, bytes(mlp), {"fingerprint": fingerprint})
            stale = tr.set_expert(reg, name, ExpertRecord(fingerprint, blob, len(mlp)))
            rev = self._save(reg, rev)
            self._delete_blobs([b for b in stale if b != blob])
            return {"expert": reg.nodes[name].expert.to_json(), "changed": True, "revision": rev}

    def submit_stats(
        self,
        secret: str,
        name: str,
        domain: str,
        stats,
        submission_id: str,
        num_tokens: int,
        holdout: dict | None = None,
    ) -> dict:
        """Add one statistics contribution of ``name``; counted once per submission id and per
        content (a retry or a rerun is a no-op). ``holdout`` is ``{β: statistics}`` of the
        node's held-out documents, one per ``RoutingSpec.holdout_smoothings()`` of the
        coordinator's routing (none when nothing is ``"auto"``). Everything is validated before
        anything is written. Publishes unless held."""
        with self._as_node(secret, name, domain) as (reg, rev):
            check_text("submission id", submission_id)
            rec = reg.nodes[name]
            data = bytes(stats) if isinstance(stats, (bytes, bytearray)) else None
            sha = hashlib.sha256(data).hexdigest() if data is not None else None
            duplicate = self._duplicate(rec, submission_id, sha)
            if duplicate is not None:
                return self._duplicate_answer(name, duplicate)
            validator = StatsValidator(reg, lambda: self._vocab_size(reg), lambda: self._feature_bound(reg))  # fmt: skip
            feature_map = validator.spec.feature_map
            parsed = validator.stats(rec, name, stats, num_tokens, feature_map)
            held = validator.holdout(rec, name, parsed, holdout)
            data = data if data is not None else stats_bytes(stats, parsed)
            sha = hashlib.sha256(data).hexdigest()
            duplicate = self._duplicate(rec, None, sha)  # the same content, given as a tensor
            if duplicate is not None:
                return self._duplicate_answer(name, duplicate)
            entry = self._store_stats(name, submission_id, parsed, data, held)
            trigger = tr.add_stats(reg, name, entry)
            self._save(reg, rev)
        version = self._maybe_publish(trigger)
        return {"status": "accepted", "blob": entry.blob, "version": version, **self._summary()}

    def settle(self, secret, name: str, domain: str) -> dict:
        """Publish what is pending, for a node whose statistics are already counted (a rerun of
        a join whose publish failed: the rerun skips its compute, and without this call the
        counted change would wait for someone else's). A no-op when held or nothing changed;
        returns the newest version."""
        with self._as_node(secret, name, domain):
            version = self._maybe_publish(f"join {name}")
        return {"node": name, "version": version, **self._summary()}

    @staticmethod
    def _duplicate(rec, submission_id, sha) -> StatsEntry | None:
        return next((s for s in rec.stats if s.submission_id == submission_id or s.sha256 == sha), None)  # fmt: skip

    def _duplicate_answer(self, name: str, entry: StatsEntry) -> dict:
        version = self._maybe_publish(f"join {name}")
        return {"status": "duplicate", "blob": entry.blob, "version": version, **self._summary()}

    def _store_stats(self, name, submission_id, parsed, data, held) -> StatsEntry:
        """Write the blobs of a validated submission (content-addressed: a retry rewrites nothing)
        and return its registry entry."""
        meta = {"submission_id": submission_id, "num_tokens": parsed.num_tokens}
        blob = self.blobs.put_blob("stats", name, data, meta)
        entries = []
        for beta, (held_stats, held_data) in held.items():
            held_meta = {**meta, "num_tokens": held_stats.num_tokens, "split": "holdout",
                         "smoothing": beta, "feature_map": held_stats.feature_map}  # fmt: skip
            entries.append(HoldoutEntry(
                beta, held_stats.feature_map, self.blobs.put_blob("stats", name, held_data, held_meta),
                hashlib.sha256(held_data).hexdigest(), held_stats.num_tokens, len(held_data),
            ))  # fmt: skip
        sha = hashlib.sha256(data).hexdigest()
        guarantee = guarantee_of(parsed)  # differential privacy the node says it applied
        dp = None if guarantee is None else guarantee.to_json()
        return StatsEntry(
            blob, sha, submission_id, parsed.num_tokens, len(data), now(), entries, dp
        )

    def leave(self, secret: str, name: str, domain: str) -> dict:
        """The node withdraws itself: its contribution is removed and its blobs deleted. A
        replayed call (the node already left) is authenticated like the first one."""
        if self._verifier.left_before(self._load_founded()[0], name, domain, secret):
            self.blobs.delete_owner(name)  # what a crash may have left of its blobs
            return {"node": name, "version": self._maybe_publish(f"leave {name}"), **self._summary()}  # fmt: skip
        with self._as_node(secret, name, domain) as (reg, rev):
            blobs = tr.retire(reg, name, NodeState.LEFT, "left")
            self._save(reg, rev)
            self._delete_blobs(blobs)
            self.blobs.delete_owner(name)
        return {"node": name, "version": self._maybe_publish(f"leave {name}"), **self._summary()}

    # -- reading ----------------------------------------------------------------------------

    def status(self) -> dict:
        """The registry without secrets, plus its revision and the store URL."""
        state, rev = self.registry.load(check=Registry.from_json)
        out = {"store": self.store_url, "revision": rev, "registry": public_view(state)}
        versions = (state or {}).get("versions") or []
        latest = versions[-1].get("version") if versions else None
        if latest:  # routing shares the latest version's solve estimated (docs/privacy.md)
            from dume_dist.model.routing import routing_warnings

            try:
                manifest = self.versions.get_manifest(latest)
                out["shares"] = manifest["routing"].get("shares")
                out["warnings"] = routing_warnings(manifest)
            except (KeyError, ValueError, OSError, TypeError, AttributeError):
                out["shares"], out["warnings"] = None, []
        return out

    def ping(self) -> str:
        return "ok"

    def _summary(self) -> dict:
        reg, rev = self._load_founded()
        return {"revision": rev, "latest": reg.latest(), "hold": reg.hold}

    def _vocab_size(self, reg: Registry | dict) -> int:
        """The backbone's vocabulary size (from the backbone's config for an old record)."""
        reg = Registry.from_json(reg) if isinstance(reg, dict) else reg
        try:
            return record_vocab_size(reg.backbone)
        except ValueError:
            return record_vocab_size(reg.backbone, self.workspace.backbone_dir(reg))

    def _feature_bound(self, reg: Registry):
        """Per layer, the largest ``|x|²`` of a token's MLP input on this backbone (cached)."""
        from dume_dist.model.backbone import Backbone
        from dume_dist.model.feature_bounds import mlp_input_norm_sq_bound

        fingerprint = reg.backbone["fingerprint"]
        if fingerprint not in self._bounds:
            backbone = Backbone.load(self.workspace.backbone_dir(reg), verify=False)
            self._bounds[fingerprint] = mlp_input_norm_sq_bound(backbone)
        return self._bounds[fingerprint]

    # -- publishing -------------------------------------------------------------------------

    def _maybe_publish(self, trigger: str, force: bool = False) -> str | None:
        """Publish a version if the contributions changed and publication is not held; returns
        the newest version id. Idempotent: the store's versions are reconciled with the
        registry first, so a version uploaded by a publisher that crashed before recording it
        is adopted (and is the new version's parent), never published twice."""
        with self._lock:
            reg, rev = self._reconcile(*self._load_founded())
            if (reg.hold and not force) or not reg.needs_publish():
                return reg.latest()
            digest = reg.content_digest()
            vid = self.publisher.publish(reg, digest, trigger)
            tr.record_version(reg, vid, digest, trigger, reg.active_nodes())
            self._save(reg, rev)
            return vid

    def _reconcile(self, reg: Registry, rev: int) -> tuple[Registry, int]:
        """Make the registry explain every listed version (`Publisher.reconcile`): adopt
        versions it does not know, mark (or purge) those that contain an unlearned node.
        Saves when anything changed; returns the registry and its revision."""
        with self._lock:
            if self.publisher.reconcile(reg):
                rev = self._save(reg, rev)
            return reg, rev

    def recover(self) -> dict:
        """What a restarted coordinator runs first (`cluster.start_coordinator`): a garbage
        collection that died holding its lock finished, the registry reconciled with the
        store's versions, and blobs no registry entry references (a call that died between
        writing them and saving the registry) deleted."""
        with self._lock:
            self.publisher.versions.resume_collection()
            reg, rev = self._load()
            swept: list[str] = []
            if reg is not None:
                reg, rev = self._reconcile(reg, rev)
                swept = self.blobs.sweep(reg.referenced_blobs())
            latest = reg.latest() if reg else None
            return {"revision": rev, "latest": latest, "blobs_removed": len(swept)}
