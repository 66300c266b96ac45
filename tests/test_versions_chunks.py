"""Versions that share tensors: content-addressed chunks in the store (``store/versions.py``,
``store/chunks.py``), pulls that equal the written directory, garbage collection that is safe
against a concurrent publish, and stores written before chunks (read and migrated)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_routing import check_loads_and_generates_without_dume_dist
from tiny_world import make_world

from dume_dist.model.build import build_dume
from dume_dist.model.experts import read_weight_index
from dume_dist.model.modeling_dume import DumeForCausalLM
from dume_dist.store import ChecksumError, ObjectStore, StoreConflict, StoreError, VersionStore
from dume_dist.store.objectstore import local_files

KW = dict(max_tokens_per_seq=16, seq_len=16, batch_size=4, progress=False, routing="paper")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Three builds over one fixed backbone: found (alpha, beta), join (+gamma), unlearn
    (-beta: gamma's index moves from 2 to 1). Sharded small, so each part has shards of its own."""
    root = tmp_path_factory.mktemp("chunks")
    world = make_world(root / "world", num_docs=6)
    out = {}
    for label, names in (("found", "ab"), ("join", "abg"), ("unlearn", "ag")):
        experts = {n: world["experts"][n] for n in world["experts"] if n[0] in names}
        data = {n: world["data"][n] for n in experts}
        out[label] = root / label
        build_dume(experts, data, out[label], backbone=f"base:{world['root'] / 'base'}",
                   max_shard_bytes=60_000, **KW)  # fmt: skip
    return out


def _objects(store: ObjectStore) -> set[str]:
    return set(store.list("versions/objects"))


def _published(tmp_path, builds, *labels):
    store = ObjectStore(str(tmp_path / "store"))
    versions = VersionStore(store)
    return store, versions, [versions.publish(str(builds[label]), {}) for label in labels]


def _object_bytes(store: ObjectStore, keys) -> int:
    return sum(len(store.read_bytes(k)) for k in keys)


def test_versions_share_expert_chunks_and_write_only_what_changed(tmp_path, builds):
    store = ObjectStore(str(tmp_path / "store"))
    versions = VersionStore(store)
    full = sum(p.stat().st_size for p in builds["join"].rglob("*") if p.is_file())
    versions.publish(str(builds["found"]), {})
    after_found = _objects(store)
    versions.publish(str(builds["join"]), {})
    after_join = _objects(store)
    versions.publish(str(builds["unlearn"]), {})
    after_unlearn = _objects(store)
    expert_bytes = sum(
        info.end - info.start
        for name, info in read_weight_index(builds["join"]).items()
        if ".experts.2." in name
    )
    joined = _object_bytes(store, after_join - after_found)
    unlearned = _object_bytes(store, after_unlearn - after_join)
    # A join writes gamma's expert, the routers and small files; an unlearn no expert at all.
    assert expert_bytes <= joined <= expert_bytes + 0.05 * full
    assert unlearned <= 0.05 * full
    # gamma is expert 2 in the join and expert 1 after the unlearn: one chunk serves both.
    m2, m3 = versions.get_manifest("v2"), versions.get_manifest("v3")
    chunks = {
        v: {c["sha256"] for e in m["files"].values() for c in e["chunks"]}
        for v, m in (("v2", m2), ("v3", m3))
    }
    gamma_files = {
        info.file.name
        for name, info in read_weight_index(builds["unlearn"]).items()
        if ".experts.1." in name
    }
    gamma = {c["sha256"] for f in gamma_files for c in m3["files"][f]["chunks"][1:]}
    assert gamma and gamma <= chunks["v2"]


def test_pulled_version_equals_the_written_directory_and_loads_without_dume_dist(tmp_path, builds):
    _, versions, (vid,) = _published(tmp_path, builds, "join")
    pulled = tmp_path / "pulled"
    manifest = versions.pull(vid, str(pulled))
    src = builds["join"]
    assert (src / "model.safetensors.index.json").is_file()
    assert set(local_files(str(pulled))) == set(local_files(str(src)))
    for rel in local_files(str(src)):
        if rel != "dume_manifest.json":
            assert (pulled / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert json.loads((pulled / "dume_manifest.json").read_text())["version"] == manifest["version"]
    want, got = read_weight_index(src), read_weight_index(pulled)
    assert set(want) == set(got)
    for name in want:
        a = load_file(str(want[name].file))[name]
        b = load_file(str(got[name].file))[name]
        assert torch.equal(a, b), name
    card = (pulled / "README.md").read_text()
    assert card.startswith("---\n") and "gamma" in card and "## Routing" in card
    model = DumeForCausalLM.from_pretrained(pulled).eval()
    check_loads_and_generates_without_dume_dist(model, pulled, tmp_path)


def test_corrupted_chunk_is_detected_on_pull(tmp_path, builds):
    store, versions, (vid,) = _published(tmp_path, builds, "found")
    entry = next(
        e for rel, e in versions.get_manifest(vid)["files"].items() if len(e["chunks"]) > 1
    )
    key = versions.object_key(entry["chunks"][1]["sha256"])
    data = bytearray(store.read_bytes(key))
    data[len(data) // 2] ^= 0x01
    store.write_bytes(key, bytes(data))
    with pytest.raises(ChecksumError, match="corrupt"):
        versions.pull(vid, str(tmp_path / "pulled"))
    assert not (tmp_path / "pulled").exists()


def test_purge_collects_only_unreferenced_chunks(tmp_path, builds):
    store, versions, (v1, v2) = _published(tmp_path, builds, "found", "join")
    only_v1 = _objects(store)
    versions.purge(v1, reason="test")
    kept = _objects(store)
    assert kept < only_v1  # v1's routers and header chunks are gone
    refs = versions.referenced()
    assert {k.rsplit("/", 1)[-1] for k in kept} == refs
    versions.pull(v2, str(tmp_path / "v2"))  # everything v2 needs is still there


class PausingVersions(VersionStore):
    """A publisher that stops after uploading its missing chunks (it skipped those already in
    the store) and before writing its manifest, until told to go on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.uploaded, self.go = threading.Event(), threading.Event()

    def _upload_chunks(self, *args, **kwargs):
        super()._upload_chunks(*args, **kwargs)
        self.uploaded.set()
        assert self.go.wait(60)


def test_gc_keeps_chunks_of_a_publish_in_flight(tmp_path, builds):
    store, versions, (v1,) = _published(tmp_path, builds, "found")
    slow = PausingVersions(ObjectStore(str(tmp_path / "store")))
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(v=slow.publish(str(builds["found"]), {}))
    )
    thread.start()
    assert slow.uploaded.wait(60)
    before = _objects(store)
    versions.purge(v1, reason="test")  # v1's chunks are referenced only by the publish in flight
    assert _objects(store) == before
    slow.go.set()
    thread.join(60)
    pulled = tmp_path / "pulled"
    versions.pull(result["v"], str(pulled))
    assert (pulled / "config.json").read_bytes() == (builds["found"] / "config.json").read_bytes()


def _live_lock(age_s: float = 0.0) -> dict:
    """A lock record of a collector on another machine that beat ``age_s`` seconds ago."""
    stamp = (datetime.now(timezone.utc) - timedelta(seconds=age_s)).isoformat(timespec="seconds")
    return {"since": stamp, "beat": stamp, "by": "elsewhere/boot|123|feedface"}


def test_publish_waits_for_a_running_collection(tmp_path, builds):
    store, versions, _ = _published(tmp_path, builds, "found")
    store.create_json("versions/gc.lock", _live_lock())  # a collection between list and delete
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(v=versions.publish(str(builds["join"]), {}))
    )
    thread.start()
    thread.join(1.0)
    assert thread.is_alive() and not store.exists("versions/v2/manifest.json")
    store.delete("versions/gc.lock")
    thread.join(60)
    assert result["v"] == "v2"
    impatient = VersionStore(store, gc_wait_s=0.1)
    store.create_json("versions/gc.lock", _live_lock())
    with pytest.raises(StoreError, match="gc.lock"):
        impatient.publish(str(builds["join"]), {})
    assert versions.resume_collection() is None and store.exists("versions/gc.lock")  # alive


def test_a_dead_holders_lock_is_taken_over_and_a_live_one_is_not(tmp_path, builds):
    """The lease: another machine's lock is live while beaten; a lock of a process of this
    machine that is gone, or of this process once its collection ended, is dead at once."""
    from dume_dist.store.gclock import GcLock, holder_alive

    store, versions, _ = _published(tmp_path, builds, "found")
    assert holder_alive(_live_lock(10)) and not holder_alive(_live_lock(3600))
    assert not holder_alive({"since": "then", "by": "a format nobody wrote"})
    mine = GcLock(store, "versions/gc.lock")
    mine.take()
    record = store.read_json("versions/gc.lock")
    assert holder_alive(record)  # its collection runs in this process
    machine, _, token = record["by"].split("|")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert not holder_alive({**record, "by": f"{machine}|{gone}|{token}"})  # its process ended
    mine._forget()  # the collection died without releasing (as a crash leaves it)
    assert not holder_alive(record)
    rival = GcLock(store, "versions/gc.lock")
    rival.take(create=False)  # took the dead lock over
    with pytest.raises(StoreConflict, match="taken over"):
        mine.beat(check=True)  # the first holder stops before deleting anything
    rival.release()
    assert not store.exists("versions/gc.lock")
    store.create_json("versions/gc.lock", _live_lock(3600))  # another machine, silent for 1 h
    assert versions.publish(str(builds["join"]), {}) == "v2"  # taken over, not waited out
    assert not store.exists("versions/gc.lock")


def test_a_collection_that_died_holding_its_lock_is_finished_on_recovery(tmp_path, builds):
    store, versions, (v1,) = _published(tmp_path, builds, "found")
    assert versions.resume_collection() is None  # no lock: nothing to finish
    versions.publish(str(builds["join"]), {})
    store.write_json("versions/v1/purged.json", {"reason": "test"})  # purged, then the
    store.create_json("versions/gc.lock", {"since": "then", "by": "a dead collector"})  # crash
    before = _objects(store)
    done = versions.resume_collection()
    assert done["deleted"] > 0 and not store.exists("versions/gc.lock")
    assert _objects(store) < before
    versions.pull("v2", str(tmp_path / "v2"))  # what v2 references survived
    assert VersionStore(store, gc_wait_s=0.1).publish(str(builds["join"]), {}) == "v3"


def _legacy_publish(store: ObjectStore, local: Path, vid: str) -> None:
    """A version as stores written before chunks hold it: whole files, manifest last."""
    files = store.put_dir(str(local), f"versions/{vid}/files", exclude=("dume_manifest.json",))
    store.create_json(f"versions/{vid}/claim.json", {"by": "old"})
    store.create_json(
        f"versions/{vid}/manifest.json",
        {"version": vid, "parent": None, "created_at": "2026-01-01T00:00:00+00:00",
         "schema_version": 1, "files": files},
    )  # fmt: skip


def test_stores_written_before_chunks_are_read_and_migrated(tmp_path, builds):
    store = ObjectStore(str(tmp_path / "store"))
    _legacy_publish(store, builds["found"], "v1")
    versions = VersionStore(store)
    versions.pull("v1", str(tmp_path / "before"))
    assert versions.publish(str(builds["join"]), {}) == "v2"  # a new version beside old ones
    assert versions.migrate() == ["v1"]
    assert not any(k.startswith("versions/v1/files/") for k in store.list("versions"))
    assert versions.migrate() == []
    versions.collect_garbage()
    versions.pull("v1", str(tmp_path / "after"))
    for rel in local_files(str(tmp_path / "before")):
        if rel != "dume_manifest.json":
            assert (tmp_path / "after" / rel).read_bytes() == (
                tmp_path / "before" / rel
            ).read_bytes()
    # v1 and v2 share alpha and beta: migrating v1 stored nothing twice.
    assert len(versions.referenced()) == len(_objects(store))


def test_ngram_router_rows_are_shared_between_versions(tmp_path):
    """The n-gram router's count tables hold one row per expert (its counts alone): a join
    stores the new expert's rows, not the whole tables again."""
    world = make_world(tmp_path / "world", num_docs=6)
    kw = {**KW, "routing": "ngram", "lam": 10.0, "top_k": 1}
    dirs = {}
    for label, names in (("found", "ab"), ("join", "abg")):
        experts = {n: world["experts"][n] for n in world["experts"] if n[0] in names}
        dirs[label] = tmp_path / label
        build_dume(experts, {n: world["data"][n] for n in experts}, dirs[label],
                   backbone=f"base:{world['root'] / 'base'}", **kw)  # fmt: skip
    store = ObjectStore(str(tmp_path / "store"))
    versions = VersionStore(store)
    versions.publish(str(dirs["found"]), {})
    before = _objects(store)
    versions.publish(str(dirs["join"]), {})
    joined = _object_bytes(store, _objects(store) - before)
    index = read_weight_index(dirs["join"])
    table = index["ngram_router.bigram_counts"]
    row = (table.end - table.start) // table.shape[0]
    expert = sum(i.end - i.start for n, i in index.items() if ".experts.2." in n)
    full = sum(p.stat().st_size for p in dirs["join"].rglob("*") if p.is_file())
    assert row >= 64 << 10 and table.end - table.start > 0.1 * full  # the tables dominate
    assert joined <= expert + row + 0.05 * full
