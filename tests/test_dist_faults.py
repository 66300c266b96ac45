"""Fault injection: the store fails, or the coordinator dies, at the k-th write of found, join,
improve, leave, unlearn and purge — for every k — and a restarted coordinator satisfies the
invariants (DESIGN §5, issue "unlearning and publishing that hold under crashes"):

* the registry explains every listed version, and lists every version it records as unpurged;
* no listed version that contains an unlearned node is unmarked;
* after the in-flight call is replayed (as Ray does after a restart): no lost and no double
  counted contribution, no blob left of a node that left or was unlearned, and the newest
  version bit-identical to the one a run without faults published.

Writes are counted at the store backend (every create, write, upload and delete). "kill" raises
a BaseException before write k (the process dies between writes k-1 and k); the store is then
opened by a new coordinator. "fail" makes write k raise a StoreError; the same coordinator sees
the error and the caller retries.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from dist_helpers import SETTINGS, make_experts

from dume_dist.distributed import genesis
from dume_dist.distributed.agent import NodeAgent
from dume_dist.distributed.coordinator import Coordinator, routers_of
from dume_dist.distributed.state import Registry
from dume_dist.model.kinds import stats_from_bytes
from dume_dist.store import (
    CURRENT,
    BlobStore,
    ObjectStore,
    RegistryStore,
    StoreError,
    VersionStore,
    new_secret,
)

OPS = ("found", "join", "improve", "leave", "unlearn", "purge")
WRITES = ("write", "create", "upload", "delete", "delete_tree")


class Killed(BaseException):
    """The coordinator's process died (nothing in memory survives)."""


class Faults:
    """Counts the store's writes; makes the k-th one kill or fail (k=None: never)."""

    def __init__(self, k: int | None, mode: str):
        self.k, self.mode, self.count = k, mode, 0

    def before_write(self, what: str, key: str) -> None:
        self.count += 1
        if self.count == self.k:
            if self.mode == "kill":
                raise Killed(f"killed before write {self.count} ({what} {key})")
            raise StoreError(f"injected failure of write {self.count} ({what} {key})")


class FaultyBackend:
    def __init__(self, backend, faults: Faults):
        self._backend, self._faults = backend, faults

    def __getattr__(self, name):
        attr = getattr(self._backend, name)
        if name not in WRITES:
            return attr

        def write(*args):
            self._faults.before_write(name, args[-1] if name == "upload" else args[0])
            return attr(*args)

        return write


def faulty_store(url: str, faults: Faults) -> ObjectStore:
    store = ObjectStore(url)
    store.backend = FaultyBackend(store.backend, faults)
    return store


class FaultyCoordinator(Coordinator):
    def __init__(self, url: str, work_dir: str, faults: Faults):
        super().__init__(url, work_dir=work_dir)
        self.faults = faults

    def _open_locked(self):
        if self._store is None:
            super()._open_locked()
            self._store.backend = FaultyBackend(self._store.backend, self.faults)
        return self._stores


# -- the world: template stores before each operation, and what each operation submits ---------


JOIN = {"max_tokens": 240, "seq_len": 16, "batch_size": 4, "threads": 1}


def template(url, w: dict, joined: tuple[str, ...]) -> None:
    """A store founded on the base backbone with alpha and beta registered, ``joined`` joined."""
    coord = Coordinator(url, work_dir=str(w["tmp"] / "work"))
    genesis.found(coord, ObjectStore(url), backbone=f"base:{w['experts']['base']}", founding={},
                  settings=SETTINGS, operator_secret=w["op"])  # fmt: skip
    for name in ("alpha", "beta"):
        coord.add_node(w["op"], name, name, w["hashes"][name])
    for name in joined:
        agent = NodeAgent(coord, name, name, w["creds"][name], str(w["tmp"] / "cache"))
        agent.join(str(w["experts"][name]["expert"]), [str(w["experts"][name]["data"])], **JOIN)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("faults")
    creds = {n: new_secret() for n in ("alpha", "beta")}
    w = {"tmp": tmp, "experts": make_experts(tmp / "experts", domains=("alpha", "beta")),
         "op": new_secret(), "creds": creds,
         "hashes": {n: genesis.node_credential_record(n, n, creds[n])[0] for n in creds}}  # fmt: skip
    template(str(tmp / "one"), w, ("alpha",))  # before join and improve
    template(str(tmp / "two"), w, ("alpha", "beta"))  # before leave, unlearn and purge
    w["templates"] = {"join": tmp / "one", "improve": tmp / "one", "leave": tmp / "two",
                      "unlearn": tmp / "two", "purge": tmp / "two"}  # fmt: skip
    # What beta's join submits (its blobs in the two-node store) and alpha's improvement (its
    # held-out text, computed on the same backbone with the same expert).
    state, _ = RegistryStore(ObjectStore(str(tmp / "two")), CURRENT.registry).load()
    blobs = BlobStore(ObjectStore(str(tmp / "two")), CURRENT.blobs)
    beta = state["nodes"]["beta"]
    w["sub"] = {"beta": {"stats": blobs.get_blob(beta["stats"][0]["blob"]),
                         "id": beta["stats"][0]["submission_id"],
                         "mlp": blobs.get_blob(beta["expert"]["blob"]),
                         "fingerprint": beta["expert"]["fingerprint"]}}  # fmt: skip
    coord = Coordinator(str(tmp / "one"), work_dir=str(tmp / "work"))
    agent = NodeAgent(coord, "alpha", "alpha", creds["alpha"], str(tmp / "cache"))
    agent.authenticate()
    expert = str(w["experts"]["alpha"]["expert"])
    _, fingerprint = agent.check_expert(expert)
    job = agent.job(agent.fetch_backbone(), expert, fingerprint,
                    [str(w["experts"]["alpha"]["valid"])],
                    {k: JOIN[k] for k in ("max_tokens", "seq_len", "batch_size")})  # fmt: skip
    w["sub"]["improve"] = {"stats": agent.compute(job, threads=1)["stats"], "id": job.submission_id}
    return w


def run_op(op: str, coord: Coordinator, store: ObjectStore, w: dict) -> None:
    creds, sub = w["creds"], w["sub"]
    beta = (creds["beta"], "beta", "beta")
    if op == "found":
        base = f"base:{w['experts']['base']}"
        genesis.found(coord, store, backbone=base, founding={}, settings=SETTINGS,
                      operator_secret=w["op"])  # fmt: skip
        for name in ("alpha", "beta"):
            coord.add_node(w["op"], name, name, w["hashes"][name])
    elif op == "join":
        coord.register_expert(*beta, sub["beta"]["mlp"], sub["beta"]["fingerprint"])
        tokens = stats_from_bytes(sub["beta"]["stats"]).num_tokens
        coord.submit_stats(*beta, sub["beta"]["stats"], sub["beta"]["id"], tokens)
    elif op == "improve":
        stats = sub["improve"]["stats"]
        coord.submit_stats(creds["alpha"], "alpha", "alpha", stats, sub["improve"]["id"],
                           stats_from_bytes(stats).num_tokens)  # fmt: skip
    elif op == "leave":
        coord.leave(*beta)
    else:
        coord.unlearn(w["op"], "beta", "asked to be forgotten", op == "purge")


def fresh_copy(op: str, w: dict, name: str) -> str:
    url = w["tmp"] / "runs" / name
    shutil.rmtree(url, ignore_errors=True)
    if op == "found":
        url.mkdir(parents=True)
    else:
        shutil.copytree(w["templates"][op], url)
    return str(url)


# -- invariants ----------------------------------------------------------------------------------


def check_store_invariants(url: str) -> Registry:
    """What must hold whenever a (restarted) coordinator has recovered, whatever crashed."""
    store = ObjectStore(url)
    state, _ = RegistryStore(store, CURRENT.registry).load()
    versions = VersionStore(store, CURRENT.versions)
    listed = set(versions.list_versions())
    if not state:  # not founded yet (genesis died before the registry's first revision)
        assert not listed
        return Registry({}, {}, "")
    reg = Registry.from_json(state)
    recorded = {v.version: v for v in reg.versions}
    assert listed <= set(recorded), f"listed versions the registry does not know: {listed - set(recorded)}"  # fmt: skip
    assert {v for v, e in recorded.items() if not e.purged} <= listed
    unlearned = set(reg.unlearned())
    for vid in listed:
        manifest = versions.get_manifest(vid)
        inside = {c["name"] for c in manifest["contributors"]} & unlearned
        marked = set(manifest["marks"].get("contains_unlearned", []))
        assert inside <= marked, f"{vid} contains unlearned {inside - marked} unmarked"
        if any(reg.nodes[n].purge for n in inside):
            raise AssertionError(f"{vid} contains a node unlearned with purge")
    return reg


def outcome(url: str) -> dict:
    """What the replayed call must have produced: contributions, no retired node's blobs, the
    newest version's routers."""
    reg = check_store_invariants(url)
    store = ObjectStore(url)
    blobs = BlobStore(store, CURRENT.blobs)
    retired = [n for n, r in reg.nodes.items() if r.state.value in ("left", "unlearned")]
    for name in retired:
        assert not store.list(f"{CURRENT.blobs}/stats/{name}") and not store.list(
            f"{CURRENT.blobs}/expert/{name}"
        ), f"blobs of {name} survived its retirement"
    for node in reg.nodes.values():
        for blob in node.blobs():
            blobs.get_blob(blob)  # present and intact
    latest = VersionStore(store, CURRENT.versions).latest()
    routers = {}
    if latest is not None:
        dest = f"{url}-pull-{latest}"
        shutil.rmtree(dest, ignore_errors=True)
        VersionStore(store, CURRENT.versions).pull(latest, dest)
        routers = routers_of(dest)
    return {
        "contributions": {n: sorted(s.sha256 for s in r.stats) for n, r in reg.nodes.items()},
        "states": {n: r.state.value for n, r in reg.nodes.items()},
        "routers": routers,
        "contributors": reg.last_version().contributors if reg.versions else None,
    }


def same_outcome(got: dict, want: dict) -> None:
    assert got["contributions"] == want["contributions"]
    assert got["states"] == want["states"]
    assert got["contributors"] == want["contributors"]
    assert got["routers"].keys() == want["routers"].keys()
    for key in want["routers"]:
        assert torch.equal(got["routers"][key], want["routers"][key]), key


# -- the sweep -----------------------------------------------------------------------------------


def clean_run(op: str, w: dict) -> tuple[int, dict]:
    """(number of store writes of ``op``, its outcome) without faults."""
    url = fresh_copy(op, w, f"{op}-clean")
    faults = Faults(None, "kill")
    coord = FaultyCoordinator(url, str(w["tmp"] / "work"), faults)
    run_op(op, coord, faulty_store(url, faults), w)
    return faults.count, outcome(url)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill", "fail"])
@pytest.mark.parametrize("op", OPS)
def test_crash_at_every_write_then_restart_holds_the_invariants(world, op, mode):
    num_writes, want = clean_run(op, world)
    assert num_writes > 3  # the operation does write (else the sweep tests nothing)
    for k in range(1, num_writes + 1):
        url = fresh_copy(op, world, f"{op}-{mode}-{k}")
        faults = Faults(k, mode)
        coord = FaultyCoordinator(url, str(world["tmp"] / "work"), faults)
        with pytest.raises((Killed, StoreError)):
            run_op(op, coord, faulty_store(url, faults), world)
        if mode == "kill":  # a new process on the same store
            coord = Coordinator(url, work_dir=str(world["tmp"] / "work"))
        else:  # the same process; the store works again
            faults.k = None
        coord.recover()
        check_store_invariants(url)
        run_op(op, coord, ObjectStore(url), world)  # the caller (or Ray) replays the call
        same_outcome(outcome(url), want)
