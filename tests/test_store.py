"""store: object store, versions, blobs, registry and credentials.

Every store-level test runs against a local directory (`file://`), fsspec memory,
and a real S3 API (moto's server on 127.0.0.1, see s3server.py).
"""

import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from s3server import s3_server  # noqa: F401  (session fixture)

from dume_dist.store import (
    MANIFEST_FILE,
    BlobStore,
    ChecksumError,
    ObjectStore,
    RegistryStore,
    StoreConflict,
    StoreError,
    StoreNotFound,
    VersionStore,
    hash_secret,
    new_secret,
    verify_secret,
)

BACKENDS = ["file", "memory", "s3"]


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    """(url, storage_options) of a fresh, empty store root."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}", None
    if request.param == "memory":
        return f"memory://dume-{uuid.uuid4().hex[:12]}", None
    s3 = request.getfixturevalue("s3_server")
    return s3.url(), s3.storage_options


@pytest.fixture
def open_store(store_url):
    """Factory of independent ObjectStore instances on one root (think: two coordinators)."""
    url, options = store_url
    return lambda: ObjectStore(url, options)


def race(fn, num_threads: int) -> list:
    """Run fn(i) on `num_threads` threads released together; return results or exceptions."""
    barrier = threading.Barrier(num_threads)
    results: list = [None] * num_threads

    def run(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - the caller inspects them
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def make_model_dir(path, seed: int) -> str:
    """A small model-like directory with a nested file; content depends on `seed`."""
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    (path / "model.safetensors").write_bytes(os.urandom(3000) + bytes([seed]))
    (path / "sub" / "tokenizer.json").write_text("tok" * seed)
    return str(path)


def read_tree(path) -> dict:
    out = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


# -- ObjectStore ----------------------------------------------------------------------


def test_bytes_round_trip(open_store):
    store = open_store()
    store.write_bytes("a/b.bin", b"one")
    store.write_bytes("a/b.bin", b"two")  # overwrite
    store.write_json("a/c/d.json", {"x": [1, 2]})
    assert store.read_bytes("a/b.bin") == b"two"
    assert store.read_json("a/c/d.json") == {"x": [1, 2]}
    assert store.exists("a/b.bin") and not store.exists("a") and not store.exists("zz")
    assert store.list("a") == ["a/b.bin", "a/c/d.json"]
    assert store.children("a") == ["b.bin", "c"]
    assert store.list("missing") == [] and store.children("missing") == []
    store.delete("a/b.bin")
    store.delete("a/b.bin", missing_ok=True)
    with pytest.raises(StoreNotFound):
        store.read_bytes("a/b.bin")
    store.delete_prefix("a")
    assert store.list("") == []


def test_store_pickles_to_a_working_copy(open_store):
    store = open_store()
    store.write_bytes("k", b"v")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.url == store.url and copy.read_bytes("k") == b"v"


def test_bad_keys_are_value_errors(open_store):
    store = open_store()
    for key in ["../x", "/abs", "a//b", "a/./b", ""]:
        with pytest.raises(ValueError):
            store.write_bytes(key, b"")
    with pytest.raises(ValueError):
        store.delete_prefix("")
    with pytest.raises(ValueError):
        store.write_json("k", {"nan": float("nan")})


def test_conditional_create_conflict_is_seen_by_another_instance(open_store):
    first, second = open_store(), open_store()
    first.create_bytes("head/0001", b"mine")
    with pytest.raises(StoreConflict, match="already exists"):
        second.create_bytes("head/0001", b"theirs")
    assert first.read_bytes("head/0001") == b"mine"
    assert second.read_bytes("head/0001") == b"mine"


def test_racing_creates_have_exactly_one_winner(open_store):
    stores = [open_store(), open_store()]  # each one an independent client
    results = race(lambda i: stores[i % 2].create_bytes("lock", str(i).encode()), 6)
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert all(isinstance(r, StoreConflict) for r in results if r is not None)
    assert stores[0].read_bytes("lock") == str(winners[0]).encode()


def test_file_transfer_checksums(open_store, tmp_path):
    store = open_store()
    local = tmp_path / "local"
    local.mkdir()
    src = local / "src.bin"
    src.write_bytes(os.urandom(10_000))
    entry = store.put_file(str(src), "f/src.bin")
    assert entry["size"] == 10_000
    store.get_file("f/src.bin", str(local / "copy.bin"), expected=entry)
    assert (local / "copy.bin").read_bytes() == src.read_bytes()
    wrong = {"sha256": "0" * 64, "size": 10_000}
    with pytest.raises(ChecksumError, match="corrupt"):
        store.get_file("f/src.bin", str(local / "bad.bin"), expected=wrong)
    assert sorted(os.listdir(local)) == ["copy.bin", "src.bin"]  # no partial file


# -- versions -------------------------------------------------------------------------


def test_publish_list_pull(open_store, tmp_path):
    versions = VersionStore(open_store())
    src = make_model_dir(tmp_path / "model", seed=1)
    assert versions.list_versions() == [] and versions.latest() is None
    v1 = versions.publish(src, {"lambda": 0.01, "contributors": ["math"]})
    v2 = versions.publish(src, {"lambda": 0.02})
    assert (v1, v2) == ("v1", "v2")
    assert versions.list_versions() == ["v1", "v2"]

    manifest = versions.get_manifest("v2")
    assert manifest["version"] == "v2" and manifest["parent"] == "v1"
    assert manifest["lambda"] == 0.02 and manifest["schema_version"] == 1
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "sub/tokenizer.json"}
    assert versions.get_manifest("v1")["parent"] is None
    assert manifest["marks"] == {}

    pulled = versions.pull("v2", str(tmp_path / "pulled"))
    tree = read_tree(tmp_path / "pulled")
    assert json.loads(tree.pop(MANIFEST_FILE)) == pulled
    assert tree == read_tree(src)
    with pytest.raises(ValueError, match="already exists"):
        versions.pull("v2", str(tmp_path / "pulled"))


def test_publish_rejects_store_fields(open_store, tmp_path):
    versions = VersionStore(open_store())
    src = make_model_dir(tmp_path / "model", seed=1)
    with pytest.raises(ValueError, match="set by the store"):
        versions.publish(src, {"files": {}})
    with pytest.raises(ValueError):
        versions.publish(src, {"bad": object()})
    with pytest.raises(ValueError):
        versions.publish(str(tmp_path / "nope"), {})
    assert versions.store.list("") == []  # nothing claimed


def test_racing_publishers_get_distinct_versions(open_store, tmp_path):
    stores = [VersionStore(open_store()), VersionStore(open_store())]
    sources = [make_model_dir(tmp_path / f"m{i}", seed=i + 1) for i in range(2)]

    def publish_three(i):
        return [stores[i].publish(sources[i], {"by": i}) for _ in range(3)]

    results = race(publish_three, 2)
    published = [vid for r in results for vid in r]
    assert sorted(published, key=lambda v: int(v[1:])) == [f"v{n}" for n in range(1, 7)]
    for i, vids in enumerate(results):
        for vid in vids:
            assert stores[1 - i].get_manifest(vid)["by"] == i
            dest = tmp_path / f"pull-{vid}"
            stores[1 - i].pull(vid, str(dest))
            tree = read_tree(dest)
            tree.pop(MANIFEST_FILE)
            assert tree == read_tree(sources[i])


def test_version_without_manifest_is_invisible(open_store, tmp_path):
    store = open_store()
    versions = VersionStore(store)
    versions.publish(make_model_dir(tmp_path / "model", seed=1), {})
    # A publisher that crashed after claiming v2 and uploading a file:
    store.create_json("versions/v2/claim.json", {"by": "crashed"})
    store.write_bytes("versions/v2/files/config.json", b"{}")
    assert versions.list_versions() == ["v1"]
    assert versions.list_incomplete() == ["v2"]
    with pytest.raises(StoreNotFound):
        versions.get_manifest("v2")
    with pytest.raises(StoreNotFound):
        versions.pull("v2", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert versions.publish(str(tmp_path / "model"), {}) == "v3"


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_pull_verifies_every_file(open_store, tmp_path, damage):
    store = open_store()
    versions = VersionStore(store)
    vid = versions.publish(make_model_dir(tmp_path / "model", seed=1), {})
    (chunk,) = versions.get_manifest(vid)["files"]["model.safetensors"]["chunks"]
    key = versions.object_key(chunk["sha256"])
    original = store.read_bytes(key)
    if damage == "corrupt":
        store.write_bytes(key, bytes([original[0] ^ 1]) + original[1:])
    elif damage == "truncate":
        store.write_bytes(key, original[:-1])
    else:
        store.delete(key)
    dest = tmp_path / "dest" / "model"
    with pytest.raises(StoreError, match="model.safetensors"):
        versions.pull(vid, str(dest))
    assert not dest.exists()
    assert os.listdir(tmp_path / "dest") == []  # the temp dir was cleaned up


def test_marks_and_purge(open_store, tmp_path):
    store = open_store()
    versions = VersionStore(store)
    src = make_model_dir(tmp_path / "model", seed=1)
    v1, v2 = versions.publish(src, {}), versions.publish(src, {})
    stored = store.read_bytes(f"versions/{v1}/manifest.json")

    versions.mark(v1, "contains_unlearned", ["nodeX"])
    versions.mark(v1, "reason", "nodeX left")
    versions.mark(v1, "contains_unlearned", ["nodeX", "nodeY"])
    assert versions.get_manifest(v1)["marks"] == {
        "contains_unlearned": ["nodeX", "nodeY"],
        "reason": "nodeX left",
    }
    assert store.read_bytes(f"versions/{v1}/manifest.json") == stored  # immutable
    with pytest.raises(StoreNotFound):
        versions.mark("v9", "k", 1)

    versions.purge(v1, reason="unlearned nodeX")
    versions.purge(v1)  # idempotent
    assert versions.list_versions() == [v2]
    assert versions.list_versions(include_purged=True) == [v1, v2]
    assert not any(k.startswith(f"versions/{v1}/files/") for k in store.list("versions"))
    with pytest.raises(StoreNotFound, match="purged"):
        versions.get_manifest(v1)
    with pytest.raises(StoreNotFound):
        versions.pull(v1, str(tmp_path / "out"))
    assert versions.publish(src, {}) == "v3"  # purged numbers are never reused


# -- blobs ----------------------------------------------------------------------------


def test_blob_dedup_and_verification(open_store):
    store = open_store()
    blobs = BlobStore(store)
    data = os.urandom(5000)
    first = blobs.put_blob("stats", "node-a", data, {"layer_count": 4})
    again = blobs.put_blob("stats", "node-a", data, {"layer_count": 999})  # a retry
    assert first == again and first.startswith("stats/node-a/")
    assert blobs.list_blobs("stats", "node-a") == [first]
    assert len(store.list("blobs")) == 2  # one .bin + one .json
    assert blobs.get_blob(first) == data
    assert blobs.get_meta(first)["meta"] == {"layer_count": 4}  # first submission kept

    store.write_bytes(f"blobs/{first}.bin", data[:-1] + b"\x00")
    with pytest.raises(ChecksumError, match="corrupt"):
        blobs.get_blob(first)
    with pytest.raises(StoreNotFound):
        blobs.get_blob("stats/node-a/" + "0" * 64)
    with pytest.raises(ValueError):
        blobs.put_blob("stats", "../escape", b"x")
    with pytest.raises(ValueError):
        blobs.get_blob("not-an-id")


def test_delete_owner_removes_all_kinds(open_store):
    blobs = BlobStore(open_store())
    a1 = blobs.put_blob("stats", "node-a", b"1")
    blobs.put_blob("expert", "node-a", b"2")
    b1 = blobs.put_blob("stats", "node-b", b"1")  # same bytes, other owner
    assert a1 != b1
    assert blobs.delete_owner("node-a") == 2
    assert blobs.list_blobs("stats", "node-a") == []
    assert blobs.list_blobs("expert", "node-a") == []
    assert blobs.list_blobs("stats", "node-b") == [b1]
    assert blobs.get_blob(b1) == b"1"
    assert blobs.delete_owner("nobody") == 0


# -- registry -------------------------------------------------------------------------


def test_registry_optimistic_concurrency(open_store):
    first, second = RegistryStore(open_store()), RegistryStore(open_store())
    assert first.load() == ({}, 0)
    r1 = first.save({"contributors": {"math": {"expert": 0}}}, expected_revision=0)
    state, revision = second.load()
    assert (state, revision) == ({"contributors": {"math": {"expert": 0}}}, r1)
    r2 = second.save({"contributors": {}}, expected_revision=revision)

    with pytest.raises(StoreConflict, match="registry changed"):
        first.save({"contributors": {"stale": {}}}, expected_revision=r1)
    assert first.load() == ({"contributors": {}}, r2)  # the stale write changed nothing
    assert first.history() == [1, 2]
    assert first.load(revision=1)[0] == {"contributors": {"math": {"expert": 0}}}

    with pytest.raises(ValueError):
        first.save({"x": object()}, expected_revision=r2)
    with pytest.raises(ValueError, match="does not exist"):
        first.save({}, expected_revision=r2 + 5)  # would leave a gap
    assert first.load()[1] == r2


def test_registry_racing_saves(open_store):
    registries = [RegistryStore(open_store()), RegistryStore(open_store())]
    results = race(lambda i: registries[i % 2].save({"writer": i}, expected_revision=0), 4)
    assert sum(r == 1 for r in results) == 1
    assert sum(isinstance(r, StoreConflict) for r in results) == 3
    state, revision = registries[0].load()
    assert revision == 1 and results[state["writer"]] == 1


def test_registry_head_hint_may_lag(open_store):
    store = open_store()
    registry = RegistryStore(store)
    for n in range(3):
        registry.save({"n": n}, expected_revision=n)
    store.write_bytes("registry/HEAD", b"1")  # a writer that crashed before updating it
    assert registry.load() == ({"n": 2}, 3)
    store.delete("registry/HEAD")
    assert registry.load() == ({"n": 2}, 3)


# -- errors ---------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_one_line(error: StoreError, url: str) -> None:
    message = str(error)
    assert "\n" not in message and message.startswith(url), message


def test_unreachable_endpoint(s3_server):  # noqa: F811
    url = s3_server.url()
    options = {**s3_server.storage_options, "endpoint_url": f"http://127.0.0.1:{_closed_port()}"}
    start = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect") as info:
        ObjectStore(url, options)
    assert time.monotonic() - start < 5
    _assert_one_line(info.value, url)


def test_missing_bucket(s3_server):  # noqa: F811
    url = "s3://no-such-bucket/prefix"
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist") as info:
        ObjectStore(url, s3_server.storage_options)
    _assert_one_line(info.value, url)
    unchecked = ObjectStore(url, s3_server.storage_options, check=False)
    with pytest.raises(StoreError, match="bucket does not exist"):
        unchecked.write_bytes("k", b"v")


def test_wrong_credentials(s3_server):  # noqa: F811
    url = s3_server.url()
    options = {**s3_server.storage_options, "key": "wrong", "secret": "wrong"}
    with s3_server.auth_required():
        with pytest.raises(StoreError, match="access denied") as info:
            ObjectStore(url, options)
    _assert_one_line(info.value, url)


def test_endpoint_from_environment(s3_server, monkeypatch):  # noqa: F811
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store = ObjectStore(s3_server.url())  # keys come from the env set by the fixture
    store.write_bytes("k", b"v")
    assert store.read_bytes("k") == b"v"


def test_local_root_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        ObjectStore(str(tmp_path / "file"))


class IgnoresCreateFS(MemoryFileSystem):
    """A store that silently overwrites on `mode="create"` (like some S3 look-alikes)."""

    protocol = "dumeleaky"

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        super().pipe_file(path, value, mode="overwrite", **kwargs)


def test_store_without_conditional_create_refuses_to_write():
    fsspec.register_implementation("dumeleaky", IgnoresCreateFS, clobber=True)
    store = ObjectStore("dumeleaky://root")
    store.write_bytes("plain", b"ok")  # unconditional writes still work
    with pytest.raises(StoreError, match="ignores conditional create"):
        store.create_bytes("head", b"1")
    assert not store.exists("head")


# -- credentials and layering ---------------------------------------------------------


def test_credentials():
    secret = new_secret()
    assert len(secret) >= 40 and secret != new_secret()
    hashed = hash_secret(secret)
    assert secret not in hashed and hashed != hash_secret(secret)  # salted
    assert verify_secret(secret, hashed)
    assert not verify_secret(secret + "x", hashed)
    assert not verify_secret("", hashed)
    with pytest.raises(ValueError):
        verify_secret(secret, "plaintext")
    with pytest.raises(ValueError):
        hash_secret("")


def test_store_imports_neither_ray_nor_torch():
    code = (
        "import sys, dume_dist.store; "
        "bad = [m for m in ('ray', 'torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
