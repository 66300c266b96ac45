"""The coordinator: registry of contributors, statistics and experts, versions (DESIGN §4).

A plain class. `dume_dist.distributed.cluster` wraps it with ``ray.remote`` as a named, detached actor
(``max_restarts=-1``, ``max_task_retries=-1``); unit tests drive it directly. Its whole state
lives in the store — the registry (`RegistryStore`, one revision per change), statistics and
expert MLP blobs (`BlobStore`), versions (`VersionStore`) — so a restarted actor, or a new
cluster pointed at the same store, carries on where the old one stopped.

Every mutating method is **idempotent**: Ray replays an in-flight call after a restart, so a
second identical call must change nothing and return the same kind of answer. Each method
authenticates first, validates everything before writing anything (bad input changes
nothing), saves the registry, and then publishes a new version when the set of contributions
changed and publication is not held (`_maybe_publish`, itself idempotent by content digest).

Canonical order: see `dume_dist.distributed.state` (expert index = position in the sorted active
node names; statistics summed in sorted ``node/sha256`` order).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from dume_dist.core.ngram import NgramStats
from dume_dist.core.stats import RouterStats, stats_from_bytes, stats_to_bytes
from dume_dist.distributed import signing
from dume_dist.distributed import state as st
from dume_dist.distributed.artifacts import (
    SETTINGS_KEYS,
    check_mlp_blob,
    mlp_spec,
    record_vocab_size,
    routing_of,
)
from dume_dist.store import (
    BlobStore,
    ObjectStore,
    RegistryStore,
    StoreNotFound,
    VersionStore,
    verify_secret,
)

UNLEARNED_MARK = "contains_unlearned"
DIST_FEATURES = ("token", "prefix_mean", "ngram")  # the features node workers compute

Stats = RouterStats | NgramStats


def _parse_stats(stats) -> Stats:
    try:
        parsed = stats_from_bytes(bytes(stats)) if isinstance(stats, (bytes, bytearray)) else stats
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"statistics blob is malformed: {exc!r}") from None
    if not isinstance(parsed, (RouterStats, NgramStats)):
        raise ValueError(
            f"statistics must be bytes, RouterStats or NgramStats, got {type(stats).__name__}"
        )
    return parsed


def operator_material(secret: str) -> str:
    """What the operator credential hash is computed over."""
    return f"dume-operator\n{secret}"


def node_material(name: str, domain: str, secret: str) -> str:
    """A node credential is bound to its name and domain: the hash covers all three."""
    return f"dume-node\n{name}\n{domain}\n{secret}"


def _number_or_auto(key: str, value):
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key} must be a number or 'auto', got {value!r}") from None
    return value


def check_settings(settings: dict) -> dict:
    """The registry's settings from what genesis was given: the routing (a ``routing`` preset
    name or dict of `RoutingSpec` fields, default ``paper``, with ``features``, ``solver``,
    ``lam``, ``smoothing``, ``top_k``, ``holdout_fraction``, ``ngram_buckets``, ``min_weight`` on
    top),
    ``temperature`` and ``max_tokens_per_seq``. Stored: the resolved spec (``routing``, its JSON), its ``feature_map``,
    and ``lam`` / ``top_k`` (as the spec has them) for readers of older registries."""
    from dume_dist.model.routing import resolve_routing

    if not isinstance(settings, dict):
        raise ValueError(f"settings must be a dict, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        raise ValueError(f"unknown coordinator setting {unknown[0]!r}")
    try:
        temperature = float(settings.get("temperature", 1.0))
        max_tps = settings.get("max_tokens_per_seq", 1024)
        holdout_fraction = settings.get("holdout_fraction")
        spec = resolve_routing(
            settings.get("routing") or "paper",
            features=settings.get("features"),
            solver=settings.get("solver"),
            lam=_number_or_auto("lam", settings.get("lam")),
            smoothing=_number_or_auto("smoothing", settings.get("smoothing")),
            top_k=settings.get("top_k"),
            holdout_fraction=None if holdout_fraction is None else float(holdout_fraction),
            ngram_buckets=settings.get("ngram_buckets"),
            min_weight=settings.get("min_weight"),
        )
    except TypeError as exc:
        raise ValueError(f"bad coordinator settings: {exc}") from None
    if spec.features not in DIST_FEATURES:
        raise ValueError(
            f"features {spec.features!r} are not supported by the distributed pipeline "
            f"(it computes {', '.join(DIST_FEATURES)})"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(max_tps, bool) or not isinstance(max_tps, int) or max_tps < 1:
        raise ValueError(f"max_tokens_per_seq must be a positive integer, got {max_tps!r}")
    given_map = settings.get("feature_map")
    if given_map is not None and given_map != spec.feature_map:
        raise ValueError(
            f"feature_map {given_map!r} does not match the routing's {spec.feature_map!r}"
        )
    return {
        "lam": spec.lam,
        "temperature": temperature,
        "top_k": spec.top_k,
        "max_tokens_per_seq": max_tps,
        "feature_map": spec.feature_map,
        "routing": spec.to_json(),
    }


class Coordinator:
    """One coordinator per store. ``work_dir`` caches the backbone and expert MLPs locally."""

    def __init__(
        self, store_url: str, storage_options: dict | None = None, work_dir: str | None = None
    ):
        self.store_url = store_url
        self.storage_options = dict(storage_options or {})
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="dume-coord-"))
        self._store: ObjectStore | None = None  # opened on first use: __init__ never fails
        self._replay = signing.ReplayGuard()  # signed (HTTP API) requests of this incarnation

    # -- store --------------------------------------------------------------------------------

    def _open(self) -> tuple[ObjectStore, RegistryStore, BlobStore, VersionStore]:
        if self._store is None:
            store = ObjectStore(self.store_url, self.storage_options)
            self._stores = (store, RegistryStore(store), BlobStore(store), VersionStore(store))
            self._store = store
        return self._stores

    @property
    def store(self) -> ObjectStore:
        return self._open()[0]

    @property
    def registry(self) -> RegistryStore:
        return self._open()[1]

    @property
    def blobs(self) -> BlobStore:
        return self._open()[2]

    @property
    def versions(self) -> VersionStore:
        return self._open()[3]

    def _load(self) -> tuple[dict, int]:
        return self.registry.load()

    def _load_founded(self) -> tuple[dict, int]:
        state, rev = self._load()
        if not state:
            raise ValueError(
                f"store {self.store_url} has no coordinator registry: run `dume coordinator start` first"
            )
        return state, rev

    def _save(self, state: dict, rev: int) -> int:
        return self.registry.save(state, rev)

    # -- authentication ---------------------------------------------------------------------

    @staticmethod
    def _check_operator(state: dict, secret: str) -> None:
        if not isinstance(secret, str) or not verify_secret(
            operator_material(secret), state["operator"]["credential_hash"]
        ):
            raise PermissionError("operator credential rejected")

    def _check_node(self, state: dict, name: str, domain: str, secret) -> dict:
        """The node's record if ``secret`` authenticates it: the secret itself (in-cluster
        callers) or a signed request from the HTTP API (`signing.envelope`)."""
        rec = state["nodes"].get(name)
        if rec is None:
            raise PermissionError(
                f"node {name!r} is not registered (an operator runs `dume admin add-node`)"
            )
        if rec["state"] in ("left", "unlearned"):
            what = "has left" if rec["state"] == "left" else "was unlearned"
            raise PermissionError(f"node {name!r} {what}: its credential is revoked")
        if rec["domain"] != domain:
            raise PermissionError(
                f"node {name!r} is registered for domain {rec['domain']!r}, not {domain!r}"
            )
        if signing.is_envelope(secret):
            signing.verify(secret, rec.get("public_key"), self._replay, name, domain)
        elif not isinstance(secret, str) or not verify_secret(
            node_material(name, domain, secret), rec["credential_hash"]
        ):
            raise PermissionError(f"credential rejected for node {name!r}")
        return rec

    # -- genesis ----------------------------------------------------------------------------

    def found(self, operator_hash: str, backbone: dict, settings: dict, hold: bool = False) -> dict:
        """Create the registry (the backbone's files are already in the store). Idempotent: a
        store founded on the same backbone is left as it is."""
        state, rev = self._load()
        if state:
            if state["backbone"]["fingerprint"] != backbone["fingerprint"]:
                raise ValueError(
                    f"store {self.store_url} was founded on backbone {state['backbone']['fingerprint'][:12]}, "
                    f"not {backbone['fingerprint'][:12]} (use `dume coordinator rebase` to change it)"
                )
            return {"founded": False, "revision": rev}
        missing = [
            f for f in backbone["files"] if not self.store.exists(f"{backbone['prefix']}/{f}")
        ]
        if missing:
            raise ValueError(f"backbone file {missing[0]} is not in the store")
        state = st.new_registry(check_settings(settings), backbone, operator_hash)
        state["hold"] = bool(hold)
        return {"founded": True, "revision": self._save(state, rev)}

    # -- operator ---------------------------------------------------------------------------

    def add_node(self, operator_secret: str, name: str, domain: str, credential_hash: str,
                 public_key: str | None = None) -> dict:  # fmt: skip
        """Register a node; it will present the secret whose bound hash is ``credential_hash``
        (in the cluster) or sign with the key whose public half is ``public_key`` (HTTP API)."""
        state, rev = self._load_founded()
        self._check_operator(state, operator_secret)
        st.check_name("node name", name)
        st.check_name("domain", domain)
        rec = state["nodes"].get(name)
        if rec is not None:
            if rec["credential_hash"] == credential_hash and rec["domain"] == domain:
                return {"node": name, "created": False, "revision": rev}  # a replayed call
            raise ValueError(
                f"node {name!r} already exists (state {rec['state']}, domain {rec['domain']!r})"
            )
        state["nodes"][name] = st.new_node(domain, credential_hash)
        if public_key is not None:
            state["nodes"][name]["public_key"] = _check_public_key(public_key)
        return {"node": name, "created": True, "revision": self._save(state, rev)}

    def rotate_credential(self, operator_secret: str, name: str, credential_hash: str,
                          public_key: str) -> dict:  # fmt: skip
        """Replace a node's credential (a leaked one, a routine change): the old secret and key
        stop working at once; its expert, statistics and state are kept. Idempotent."""
        state, rev = self._load_founded()
        self._check_operator(state, operator_secret)
        return self._rotate(state, rev, name, credential_hash, public_key)

    def rotate_own_credential(self, secret, name: str, domain: str, credential_hash: str,
                              public_key: str) -> dict:  # fmt: skip
        """A node replaces its own credential (authenticated with the current one)."""
        state, rev = self._load_founded()
        self._check_node(state, name, domain, secret)
        return self._rotate(state, rev, name, credential_hash, public_key)

    def _rotate(self, state: dict, rev: int, name: str, credential_hash: str, public_key: str):
        rec = state["nodes"].get(name)
        if rec is None or rec["state"] in ("left", "unlearned"):
            raise ValueError(f"node {name!r} is not registered (or has left): nothing to rotate")
        if not isinstance(credential_hash, str) or not credential_hash.startswith("scrypt$"):
            raise ValueError("credential_hash must be a hash made by hash_secret")
        key = _check_public_key(public_key)
        if rec["credential_hash"] == credential_hash and rec.get("public_key") == key:
            return {"node": name, "rotated": False, "revision": rev}
        rec["credential_hash"], rec["public_key"] = credential_hash, key
        return {"node": name, "rotated": True, "revision": self._save(state, rev)}

    def set_hold(self, operator_secret: str, hold: bool) -> dict:
        state, rev = self._load_founded()
        self._check_operator(state, operator_secret)
        if state["hold"] != bool(hold):
            state["hold"] = bool(hold)
            rev = self._save(state, rev)
        return {"hold": state["hold"], "revision": rev}

    def publish(self, operator_secret: str) -> dict:
        """Publish now (even while held) if the contributions changed since the newest version."""
        state, _ = self._load_founded()
        self._check_operator(state, operator_secret)
        return {"version": self._maybe_publish("publish", force=True), **self._summary()}

    def unlearn(self, operator_secret: str, name: str, reason: str, purge: bool = False) -> dict:
        """Remove ``name``'s statistics and expert, delete its blobs, re-solve and publish; mark
        (or with ``purge`` delete) every earlier version that contained it."""
        state, rev = self._load_founded()
        self._check_operator(state, operator_secret)
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("unlearning needs a reason")
        rec = state["nodes"].get(name)
        if rec is None:
            raise ValueError(f"unknown node {name!r}: nothing to unlearn")
        if rec["state"] != "unlearned":
            self._retire(rec, "unlearned", reason.strip())
            rev = self._save(state, rev)
        self.blobs.delete_owner(name)
        version = self._maybe_publish(f"unlearn {name}")
        affected = self._mark_versions(name, purge, reason.strip())
        return {"node": name, "version": version, "affected_versions": affected, **self._summary()}

    def rebase(self, operator_secret: str, backbone: dict) -> dict:
        """Change the backbone (its files are already in the store). Every statistics blob is
        then stale: it is deleted and its node goes back to ``registered`` until it recomputes."""
        state, rev = self._load_founded()
        self._check_operator(state, operator_secret)
        if state["backbone"]["fingerprint"] == backbone["fingerprint"]:
            return {"rebased": False, "revision": rev}
        for key in ("num_layers", "feature_dim", "mlp_layout", "tokenizer_hash"):
            if backbone[key] != state["backbone"][key]:
                raise ValueError(f"the new backbone differs in {key}: experts would not fit it")
        stale = [
            b for rec in state["nodes"].values() for s in rec["stats"] for b in st.entry_blobs(s)
        ]
        state["backbone"] = backbone
        for rec in state["nodes"].values():
            rec["stats"] = []
            if rec["state"] == "active":
                rec["state"] = "registered"
        rev = self._save(state, rev)
        for blob in stale:
            self.blobs.delete_blob(blob)
        return {"rebased": True, "revision": rev, "stale_blobs": len(stale)}

    # -- node agent -------------------------------------------------------------------------

    def node_info(self, secret: str, name: str, domain: str) -> dict:
        """What a node agent needs before it computes: the backbone record, the settings, its
        registered expert and the submission ids already counted."""
        state, rev = self._load_founded()
        rec = self._check_node(state, name, domain, secret)
        return {
            "backbone": state["backbone"],
            "settings": state["settings"],
            "expert": rec["expert"],
            "submissions": [s["submission_id"] for s in rec["stats"]],
            "state": rec["state"],
            "revision": rev,
            "latest": st.last_version(state)["version"] if state["versions"] else None,
        }

    def backbone_files(self, secret: str, name: str, domain: str) -> dict[str, bytes]:
        """The backbone's files (read from the store, checksums verified), for a node agent."""
        state, _ = self._load_founded()
        self._check_node(state, name, domain, secret)
        local = self._backbone_dir(state)
        return {rel: (local / rel).read_bytes() for rel in state["backbone"]["files"]}

    def backbone_chunk(self, rel: str, offset: int, length: int) -> bytes:
        """``length`` bytes of one backbone file from ``offset`` (the HTTP API streams the
        backbone with it after authenticating the node; the backbone is in every version)."""
        state, _ = self._load_founded()
        if rel not in state["backbone"]["files"]:
            raise ValueError(f"{rel!r} is not a backbone file")
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length > 0):
            raise ValueError("offset and length must be non-negative integers")
        with open(self._backbone_dir(state) / rel, "rb") as f:
            f.seek(offset)
            return f.read(min(length, 1 << 26))

    def register_expert(
        self, secret: str, name: str, domain: str, mlp: bytes, fingerprint: str
    ) -> dict:
        """Store a node's expert MLP weights. A different expert than before makes the node's
        statistics stale: they are dropped and it must resubmit (fingerprints never mix)."""
        state, rev = self._load_founded()
        rec = self._check_node(state, name, domain, secret)
        if rec["expert"] is not None and rec["expert"]["fingerprint"] == fingerprint:
            return {"expert": rec["expert"], "changed": False, "revision": rev}
        sha = hashlib.sha256(mlp).hexdigest()
        self._expert_spec(state, name, fingerprint, mlp, sha)  # validates layout and fingerprint
        blob = self.blobs.put_blob("expert", name, mlp, {"fingerprint": fingerprint})
        stale = [b for s in rec["stats"] for b in st.entry_blobs(s)] + (
            [rec["expert"]["blob"]] if rec["expert"] else []
        )
        rec["expert"] = {"fingerprint": fingerprint, "blob": blob, "size": len(mlp)}
        rec["stats"] = []
        rec["state"] = "registered"
        rev = self._save(state, rev)
        for old in stale:
            self.blobs.delete_blob(old)
        return {"expert": rec["expert"], "changed": True, "revision": rev}

    def submit_stats(
        self,
        secret: str,
        name: str,
        domain: str,
        stats: bytes | RouterStats | NgramStats,
        submission_id: str,
        num_tokens: int,
        holdout: dict | None = None,
    ) -> dict:
        """Add one statistics contribution of ``name``; counted once per submission id and per
        content (a retry or a rerun is a no-op). ``holdout`` is ``{β: statistics}`` of the
        node's held-out documents, one per ``RoutingSpec.holdout_smoothings()`` of the
        coordinator's routing (none when nothing is ``"auto"``). Everything is validated before
        anything is written. Publishes unless held."""
        state, rev = self._load_founded()
        rec = self._check_node(state, name, domain, secret)
        data = stats if isinstance(stats, (bytes, bytearray)) else None
        sha = hashlib.sha256(data).hexdigest() if data is not None else None
        for old in rec["stats"]:
            if old["submission_id"] == submission_id or old["sha256"] == sha:
                version = self._maybe_publish(f"join {name}")
                return {
                    "status": "duplicate",
                    "blob": old["blob"],
                    "version": version,
                    **self._summary(),
                }
        spec = routing_of(state["settings"])
        parsed = self._validate_stats(state, rec, name, stats, num_tokens, spec.feature_map)
        held = self._validate_holdout(state, rec, name, spec, parsed, holdout)
        if data is None:
            data = stats_to_bytes(parsed)
            sha = hashlib.sha256(data).hexdigest()
        for old in rec["stats"]:  # the same content, given as a tensor
            if old["sha256"] == sha:
                return {"status": "duplicate", "blob": old["blob"],
                        "version": self._maybe_publish(f"join {name}"), **self._summary()}  # fmt: skip
        meta = {"submission_id": submission_id, "num_tokens": parsed.num_tokens}
        blob = self.blobs.put_blob("stats", name, data, meta)
        held_entries = []
        for beta, (held_stats, held_data) in held.items():
            held_meta = {**meta, "num_tokens": held_stats.num_tokens, "split": "holdout",
                         "smoothing": beta, "feature_map": held_stats.feature_map}  # fmt: skip
            held_entries.append(
                {
                    "smoothing": beta,
                    "feature_map": held_stats.feature_map,
                    "blob": self.blobs.put_blob("stats", name, held_data, held_meta),
                    "sha256": hashlib.sha256(held_data).hexdigest(),
                    "num_tokens": held_stats.num_tokens,
                    "size": len(held_data),
                }
            )
        entry = {
            "blob": blob,
            "sha256": sha,
            "submission_id": submission_id,
            "num_tokens": parsed.num_tokens,
            "size": len(data),
            "submitted_at": st.now(),
        }
        if held_entries:
            entry["holdout"] = held_entries
        rec["stats"].append(entry)
        trigger = f"improve {name}" if rec["state"] == "active" else f"join {name}"
        rec["state"] = "active"
        self._save(state, rev)
        version = self._maybe_publish(trigger)
        return {"status": "accepted", "blob": blob, "version": version, **self._summary()}

    def leave(self, secret: str, name: str, domain: str) -> dict:
        """The node withdraws itself: its contribution is removed and its blobs deleted."""
        state, rev = self._load_founded()
        rec = state["nodes"].get(name)
        if rec is not None and rec["state"] == "left":  # a replayed call
            return {
                "node": name,
                "version": self._maybe_publish(f"leave {name}"),
                **self._summary(),
            }
        rec = self._check_node(state, name, domain, secret)
        self._retire(rec, "left", "left")
        self._save(state, rev)
        self.blobs.delete_owner(name)
        return {"node": name, "version": self._maybe_publish(f"leave {name}"), **self._summary()}

    # -- reading ----------------------------------------------------------------------------

    def status(self) -> dict:
        """The registry without secrets, plus its revision and the store URL."""
        state, rev = self._load()
        return {"store": self.store_url, "revision": rev, "registry": st.public_view(state)}

    def ping(self) -> str:
        return "ok"

    def _summary(self) -> dict:
        state, rev = self._load()
        last = st.last_version(state)
        return {"revision": rev, "latest": last["version"] if last else None, "hold": state["hold"]}

    # -- validation -------------------------------------------------------------------------

    def _vocab_size(self, state: dict) -> int:
        """The backbone's vocabulary size (from the backbone's config for an old record)."""
        try:
            return record_vocab_size(state["backbone"])
        except ValueError:
            return record_vocab_size(state["backbone"], self._backbone_dir(state))

    def _validate_stats(
        self, state: dict, rec: dict, name: str, stats, num_tokens, feature_map: str
    ) -> Stats:
        from dume_dist.model.modeling_dume import routing_feature_dim

        backbone = state["backbone"]
        parsed = _parse_stats(stats)
        spec = routing_of(state["settings"])
        if spec.features == "ngram":
            if not isinstance(parsed, NgramStats):
                raise ValueError(
                    f"statistics are Gram matrices of feature map {parsed.feature_map!r}; the "
                    "coordinator's ngram routing needs n-gram counts (NgramStats)"
                )
            parsed.validate(vocab_size=self._vocab_size(state), buckets=spec.ngram_buckets)
        else:
            if not isinstance(parsed, RouterStats):
                raise ValueError(
                    f"statistics are n-gram counts ({parsed.feature_map!r}); the coordinator's "
                    f"{spec.features} routing needs Gram statistics (RouterStats)"
                )
            parsed.validate(
                num_layers=backbone["num_layers"],
                feature_dim=routing_feature_dim(spec.features, backbone["feature_dim"]),
            )
        if parsed.feature_map != feature_map:
            raise ValueError(
                f"statistics use feature map {parsed.feature_map!r}, the model {feature_map!r}"
            )
        if parsed.backbone_fingerprint != backbone["fingerprint"]:
            raise ValueError(
                f"statistics were computed on backbone {parsed.backbone_fingerprint[:12] or '(none)'}, "
                f"the model's is {backbone['fingerprint'][:12]}: recompute them"
            )
        if rec["expert"] is None:
            raise ValueError(
                f"node {name!r} has no expert registered: upload its MLP weights first"
            )
        if parsed.expert_fingerprint != rec["expert"]["fingerprint"]:
            raise ValueError(
                f"statistics were computed with expert {parsed.expert_fingerprint[:12] or '(none)'}, "
                f"node {name!r} registered {rec['expert']['fingerprint'][:12]}: recompute them"
            )
        if not isinstance(num_tokens, int) or num_tokens != parsed.num_tokens:
            raise ValueError(
                f"submission claims {num_tokens} tokens, its statistics count {parsed.num_tokens}"
            )
        return parsed

    def _validate_holdout(
        self, state: dict, rec: dict, name: str, spec, fit: Stats, holdout
    ) -> dict[float, tuple[Stats, bytes]]:
        """``{β: (statistics, bytes)}`` of a submission's held-out statistics, each checked like
        fit statistics (identity ``spec.holdout_feature_map(β)``; for ngram the counts with the
        exact held-out bigrams); exactly the decays the routing needs."""
        needed = spec.holdout_smoothings()
        if holdout is not None and not isinstance(holdout, dict):
            raise ValueError(f"holdout must be a dict {{smoothing: statistics}}, got {type(holdout).__name__}")  # fmt: skip
        given = {}
        for key, value in (holdout or {}).items():
            try:
                beta = float(key)
            except (TypeError, ValueError):
                raise ValueError(
                    f"held-out statistics key {key!r} is not a smoothing decay"
                ) from None
            given[beta] = value
        missing = [b for b in needed if b not in given]
        if missing:
            raise ValueError(
                f"the coordinator's routing ({spec.features}, {spec.solver}, lam={spec.lam}, "
                f"smoothing={spec.smoothing}) needs held-out statistics for smoothing "
                f"{', '.join(map(str, needed))}; the submission lacks {missing[0]} "
                "(a node agent of this version computes them)"
            )
        extra = sorted(set(given) - set(needed))
        if extra:
            raise ValueError(
                f"held-out statistics for smoothing {extra[0]} are not used by the coordinator's "
                f"routing (it needs {list(needed) or 'none'})"
            )
        out = {}
        for beta in needed:
            value = given[beta]
            parsed = self._validate_stats(
                state, rec, name, value, _parse_stats(value).num_tokens,
                spec.holdout_feature_map(beta),
            )  # fmt: skip
            if parsed.expert_fingerprint != fit.expert_fingerprint:
                raise ValueError("held-out and fit statistics were computed with different experts")
            data = bytes(value) if isinstance(value, (bytes, bytearray)) else stats_to_bytes(parsed)
            out[beta] = (parsed, data)
        return out

    # -- local caches -----------------------------------------------------------------------

    def _backbone_dir(self, state: dict) -> Path:
        record = state["backbone"]
        local = self.work_dir / "backbone" / record["fingerprint"]
        if not local.is_dir():
            self.store.get_dir(record["prefix"], str(local), record["files"])
        return local

    def _expert_spec(
        self,
        state: dict,
        name: str,
        fingerprint: str,
        mlp: bytes | None = None,
        sha: str | None = None,
    ):
        """An ExpertSpec over the node's MLP blob, cached under work_dir; validated on creation."""
        local = self.work_dir / "experts" / name / fingerprint
        backbone_dir = self._backbone_dir(state)
        if not local.is_dir():
            if mlp is None:
                blob = state["nodes"][name]["expert"]["blob"]
                mlp = self.blobs.get_blob(blob)
            tmp = local.with_name(f".tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            try:
                (tmp / "model.safetensors").write_bytes(mlp)
                spec = mlp_spec(name, tmp, backbone_dir, state["backbone"]["tokenizer_hash"])
                check_mlp_blob(spec, state["backbone"], fingerprint)
            except Exception:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            tmp.rename(local)
        return mlp_spec(name, local, backbone_dir, state["backbone"]["tokenizer_hash"])

    # -- publishing -------------------------------------------------------------------------

    def _maybe_publish(self, trigger: str, force: bool = False) -> str | None:
        """Publish a version if the contributions changed and publication is not held; returns
        the newest version id. Idempotent: a crash after the upload but before the registry
        recorded it is healed by adopting the version whose manifest has the same digest."""
        state, rev = self._load_founded()
        last = st.last_version(state)
        if (state["hold"] and not force) or not st.needs_publish(state):
            return last["version"] if last else None
        digest = st.content_digest(state)
        vid = self._adoptable(state, digest) or self._publish_version(state, digest, trigger)
        state["versions"].append(
            {
                "version": vid,
                "digest": digest,
                "contributors": st.active_nodes(state),
                "parent": last["version"] if last else None,
                "trigger": trigger,
                "created_at": st.now(),
                "marked": [],
                "purged": False,
            }
        )
        self._save(state, rev)
        return vid

    def _adoptable(self, state: dict, digest: str) -> str | None:
        latest = self.versions.latest()
        recorded = {v["version"] for v in state["versions"]}
        if latest is None or latest in recorded:
            return None
        manifest = self.versions.get_manifest(latest)
        return latest if manifest.get("content_digest") == digest else None

    def _contributions(self, state: dict, names: list[str]):
        """Fit contributions ``{"<node>/<sha256>": (expert index, stats)}`` and held-out ones
        ``{β: {"<node>/<fit sha256>": (expert index, stats)}}`` (sorted keys: canonical order)."""
        fit, holdout = {}, {}
        for index, name in enumerate(names):
            for entry in state["nodes"][name]["stats"]:
                key = f"{name}/{entry['sha256']}"
                fit[key] = (index, stats_from_bytes(self.blobs.get_blob(entry["blob"])))
                for held in entry.get("holdout", []):
                    stats = stats_from_bytes(self.blobs.get_blob(held["blob"]))
                    holdout.setdefault(float(held["smoothing"]), {})[key] = (index, stats)
        return fit, holdout

    def _publish_version(self, state: dict, digest: str, trigger: str) -> str:
        from dume_dist.model.backbone import Backbone
        from dume_dist.model.formats import CheckpointInput, Provenance
        from dume_dist.model.routing import solve_routing
        from dume_dist.model.writer import write_dume_checkpoint

        names = st.active_nodes(state)
        settings = state["settings"]
        nodes = state["nodes"]
        spec = routing_of(settings)
        fit, holdout = self._contributions(state, names)
        solved = solve_routing(spec, fit, len(names), holdout)
        backbone = Backbone.load(self._backbone_dir(state))
        specs = [self._expert_spec(state, n, nodes[n]["expert"]["fingerprint"]) for n in names]
        last = st.last_version(state)
        manifest = {
            "content_digest": digest,
            "trigger": trigger,
            "parent": last["version"] if last else None,
            "contributors": [
                {
                    "name": n,
                    "domain": nodes[n]["domain"],
                    "expert_index": j,
                    "expert_fingerprint": nodes[n]["expert"]["fingerprint"],
                    "stats": [_manifest_stats(s) for s in nodes[n]["stats"]],
                    "num_tokens": st.node_tokens(nodes[n]),
                }
                for j, n in enumerate(names)
            ],
            "expert_order": "active node names sorted; expert index = position",
            "max_tokens_per_seq": settings["max_tokens_per_seq"],
            "routing": solved.manifest_routing(),
        }
        build = self.work_dir / "build" / uuid.uuid4().hex[:12]
        inp = CheckpointInput(
            backbone=backbone, experts=specs, routing=solved, top_k=min(spec.top_k, len(names)),
            temperature=settings["temperature"],
            provenance=Provenance(
                domains={n: nodes[n]["domain"] for n in names},
                expert_fingerprints={n: nodes[n]["expert"]["fingerprint"] for n in names},
                extra_manifest=manifest,
            ),
        )  # fmt: skip
        try:
            written = write_dume_checkpoint(build / "model", inp)
            for key in ("files", "schema_version", "parent_version"):
                written.pop(key, None)
            return self.versions.publish(str(build / "model"), written)
        finally:
            shutil.rmtree(build, ignore_errors=True)

    # -- retiring nodes ---------------------------------------------------------------------

    @staticmethod
    def _retire(rec: dict, new_state: str, reason: str) -> None:
        rec["state"] = new_state
        rec["reason"] = reason
        rec["credential_hash"] = None
        rec.pop("public_key", None)
        rec["stats"] = []
        rec["expert"] = None
        rec["retired_at"] = st.now()

    def _mark_versions(self, name: str, purge: bool, reason: str) -> list[str]:
        """Mark each earlier version that contained ``name`` (and purge it if asked); records
        the marks in the registry. Idempotent."""
        state, rev = self._load_founded()
        before = st.copy_state(state)
        affected = []
        for entry in st.versions_containing(state, name):
            vid = entry["version"]
            affected.append(vid)
            if name not in entry["marked"]:
                entry["marked"].append(name)
            if not entry["purged"]:
                try:
                    current = self.versions.get_manifest(vid)["marks"].get(UNLEARNED_MARK, [])
                    if name not in current:
                        self.versions.mark(vid, UNLEARNED_MARK, sorted({*current, name}))
                except StoreNotFound:
                    entry["purged"] = True  # purged out of band
            if purge and not entry["purged"]:
                self.versions.purge(vid, reason=f"contains unlearned node {name}: {reason}")
                entry["purged"] = True
        if state != before:
            self._save(state, rev)
        return affected


def _check_public_key(key) -> str:
    import base64

    try:
        if isinstance(key, str) and len(base64.b64decode(key, validate=True)) == 32:
            return key
    except ValueError:
        pass
    raise ValueError("public_key must be a base64 Ed25519 public key (32 bytes)")


def _manifest_stats(entry: dict) -> dict:
    out = {"sha256": entry["sha256"], "num_tokens": entry["num_tokens"]}
    if entry.get("holdout"):
        out["holdout"] = [
            {"smoothing": h["smoothing"], "sha256": h["sha256"], "num_tokens": h["num_tokens"]}
            for h in entry["holdout"]
        ]
    return out


def routers_of(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The router tensors of a published DUME model directory (for comparisons): the per-layer
    linear routers, or the n-gram router's count tables."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(
            {
                k: v
                for k, v in load_file(str(file)).items()
                if ".mlp.router." in k or k.startswith("ngram_router.")
            }
        )
    return out
