"""What an operator or a contributor does by hand on one machine (a ``file://`` store, the `dume`
commands that read it), and what they find when something in it is odd: a manifest edited by
hand, a mistyped store path, a destination that cannot be made, a relative store path handed to
another process. Each is one line and changes nothing."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from dume_dist.cli.main import main
from dume_dist.store import CURRENT, ObjectStore, VersionStore
from dume_dist.store.objectstore import absolute_url


def _published(root, n=2) -> tuple[str, VersionStore]:
    """A store with ``n`` versions whose manifests look like the coordinator's."""
    url = str(root / "store")
    versions = VersionStore(ObjectStore(url), CURRENT.versions)
    for i in range(1, n + 1):
        model = root / f"model{i}"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"i": i}))
        names = ["alpha", "beta"][:i]
        manifest = {
            "trigger": f"join {names[-1]}",
            "contributors": [{"name": x, "domain": x, "num_tokens": 10} for x in names],
        }
        versions.publish(str(model), manifest)
    return url, versions


def _manifest_key(vid: str) -> str:
    return f"{CURRENT.versions}/{vid}/manifest.json"


@pytest.mark.parametrize(
    "bad",
    [
        [],
        None,
        "v1",
        {},
        {"version": "v1", "files": {}},  # another version's manifest copied over this one
        {"version": "v1", "files": {"config.json": 5}},
    ],
    ids=["list", "null", "string", "empty", "other-version", "bad-file-entry"],
)
def test_a_manifest_edited_by_hand_is_one_line_and_hides_no_other_version(tmp_path, capsys, bad):
    url, versions = _published(tmp_path)
    store = ObjectStore(url)
    good = store.read_json(_manifest_key("v1"))
    if isinstance(bad, dict) and bad.get("version") == "v1":
        bad = {**good, **bad}
    store.write_json(_manifest_key("v2"), bad)
    before = store.list()
    assert main(["versions", "list", "--store", url]) == 0
    out, err = capsys.readouterr()
    assert "v1" in out and "alpha" in out
    assert err.count("\n") == 1 and "v2 skipped" in err and "malformed" in err
    assert main(["versions", "show", "v2", "--store", url]) == 2
    assert main(["versions", "pull", "v2", str(tmp_path / "out"), "--store", url]) == 2
    assert main(["versions", "gc", "--store", url]) == 2  # its chunks are unknown: keep them all
    _, err = capsys.readouterr()
    assert err.count("\n") == 3 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and store.list() == before


def test_contributors_or_marks_edited_by_hand_do_not_break_the_listing(tmp_path, capsys):
    url, _ = _published(tmp_path)
    store = ObjectStore(url)
    manifest = store.read_json(_manifest_key("v2"))
    store.write_json(_manifest_key("v2"), {**manifest, "contributors": 5, "trigger": 7})
    store.write_json(f"{CURRENT.versions}/v1/marks/000000000001.json", ["not", "a", "mark"])
    assert main(["versions", "list", "--store", url]) == 0
    out, err = capsys.readouterr()
    assert "malformed contributors" in out and "v1 skipped" in err and "Traceback" not in err


def test_gc_on_a_mistyped_store_writes_nothing(tmp_path, capsys):
    typo = tmp_path / "stroe"
    assert main(["versions", "gc", "--store", str(typo)]) == 0
    assert "kept 0 chunks, deleted 0" in capsys.readouterr().out
    assert not typo.exists()


def test_pull_into_a_directory_that_cannot_be_made_is_one_line(tmp_path, capsys):
    url, _ = _published(tmp_path, n=1)
    (tmp_path / "a-file").write_text("")
    assert main(["versions", "pull", "v1", str(tmp_path / "a-file" / "model"), "--store", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create" in err and "Traceback" not in err


def test_a_store_sent_to_another_process_keeps_the_directory_it_named(tmp_path, monkeypatch):
    """A Ray actor runs in its cluster's working directory, not the command's: a relative
    ``--store ./store`` must reach it as the directory the operator meant."""
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    store = ObjectStore("store")
    store.write_bytes("k", b"v")
    data = pickle.dumps(store)
    for url in ("store", "file://store", "./store"):
        assert absolute_url(url).endswith(str(tmp_path / "here" / "store"))
    assert absolute_url("s3://bucket/store") == "s3://bucket/store"
    monkeypatch.chdir(tmp_path / "there")
    assert pickle.loads(data).read_bytes("k") == b"v"


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node local cluster started here, in the tests' working directory, and stopped by
    its handle."""
    pytest.importorskip("ray")
    from dist_helpers import local_ray_cluster

    with local_ray_cluster() as (c, _):
        yield c


@pytest.mark.ray
def test_coordinator_started_with_a_relative_store_opens_the_operators_directory(
    ray_cluster, tmp_path, monkeypatch
):
    """`dume coordinator start --store ./store` from a directory other than the cluster's: the
    operator founded ./store here, and the actor (in the cluster's working directory) must
    resume that store, not look for (or found) another one beside the cluster."""
    import ray
    from dist_helpers import Flow, make_experts

    from dume_dist.distributed.calls import call
    from dume_dist.distributed.cluster import start_coordinator

    experts = make_experts(tmp_path / "experts", domains=("alpha",))
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    revision = flow.status()["revision"]
    assert revision >= 1 and os.getcwd() != str(tmp_path)
    monkeypatch.chdir(tmp_path)
    handle = start_coordinator("store", name="dume-relative-store", namespace="dume-test",
                               work_dir=str(tmp_path / "actor-work"))  # fmt: skip
    try:
        status = call(handle, "status")
        assert status["revision"] == revision
        assert status["store"] == str(tmp_path / "store")
    finally:
        ray.kill(handle)
