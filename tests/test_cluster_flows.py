"""An operator and a contributor using the commands as the docs show them, where earlier runs
went wrong: a rerun of a join whose publish failed, readers pointed at a store that does not
exist, ``file://`` URLs with escapes, credentials that could be issued and lost, credential
files that only ever fail, API flags checked after the store was founded, a dry run that
under-reported what leaves the node, and unlearn reports that said what the flag asked rather
than what the registry holds.

All in-process (a plain `Coordinator` and `NodeAgent`, no Ray): the CLI's operator commands are
given the in-process coordinator in place of the actor handle.
"""

from __future__ import annotations

import pickle

import pytest
from dist_helpers import Flow, make_experts

from dume_dist.cli import admin as admin_cli
from dume_dist.cli import shared
from dume_dist.cli import unlearn as unlearn_cli
from dume_dist.cli.main import main
from dume_dist.store import ObjectStore, StoreError
from dume_dist.store.objectstore import absolute_url

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return make_experts(tmp_path_factory.mktemp("experts"), domains=("alpha", "beta"))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- (a) a join counted but never published ------------------------------------------------------


def test_rerun_of_a_join_whose_publish_failed_publishes_it(experts, tmp_path, monkeypatch):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "beta")
    assert flow.join("alpha")["version"] == "v1"

    def unwritable(*args, **kwargs):
        raise StoreError("store: cannot write public/versions: read-only file system")

    publish = flow.coord.publisher.publish
    monkeypatch.setattr(flow.coord.publisher, "publish", unwritable)
    with pytest.raises(StoreError):
        flow.join("beta")  # statistics accepted and recorded, the publish failed
    assert flow.versions().list_versions() == ["v1"]
    monkeypatch.setattr(flow.coord.publisher, "publish", publish)

    again = flow.join("beta")  # the store is writable again; the contributor reruns
    assert again["status"] == "duplicate" and again["skipped_compute"]
    assert again["version"] == "v2"  # not the old v1, which does not contain beta
    manifest = flow.versions().get_manifest("v2")
    assert [c["name"] for c in manifest["contributors"]] == ["alpha", "beta"]
    assert flow.join("beta")["version"] == "v2"  # nothing pending: nothing more published


def test_settle_respects_a_hold_and_authenticates_the_node(experts, tmp_path):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path, hold=True)
    flow.add("alpha")
    assert flow.join("alpha")["version"] is None
    assert flow.join("alpha")["version"] is None  # a rerun does not publish a held change
    with pytest.raises(PermissionError):
        flow.coord.settle("wrong secret", "alpha", "alpha")
    assert flow.versions().list_versions() == []


# -- (b) readers pointed at a store that does not exist -------------------------------------------


def test_readers_of_a_store_that_does_not_exist_get_one_line(experts, tmp_path, capsys):
    typo = tmp_path / "stroe"
    for argv in (["versions", "list"], ["versions", "show", "v1"], ["status"]):
        assert main([*argv, "--store", str(typo)]) == 2
        assert "does not exist" in _one_line_error(capsys)
    assert main(["versions", "list", "--store", f"file://{typo}"]) == 2
    _one_line_error(capsys)
    assert not typo.exists()

    Flow(str(tmp_path / "store"), experts, tmp_path)  # founded, nothing published yet
    assert main(["versions", "list", "--store", str(tmp_path / "store")]) == 0
    assert main(["status", "--store", str(tmp_path / "store")]) == 0
    assert "does not exist" not in capsys.readouterr().err


# -- (c) file:// URLs with escapes ----------------------------------------------------------------


def test_file_urls_are_percent_decoded(tmp_path):
    where = tmp_path / "my store"
    store = ObjectStore(f"file://{tmp_path}/my%20store")
    store.write_bytes("k", b"v")
    assert (where / "k").read_bytes() == b"v"
    assert not (tmp_path / "my%20store").exists()
    # sent to another process (a Ray actor) it is still that directory
    assert pickle.loads(pickle.dumps(store)).read_bytes("k") == b"v"
    assert ObjectStore(absolute_url(f"file://{where}")).read_bytes("k") == b"v"
    assert ObjectStore(f"file://localhost{tmp_path}/my%20store").read_bytes("k") == b"v"


# -- credentials ----------------------------------------------------------------------------------


def test_a_credential_that_cannot_be_written_registers_no_node(experts, tmp_path, capsys, monkeypatch):  # fmt: skip
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    monkeypatch.setattr(admin_cli, "coordinator", lambda args: flow.coord)
    monkeypatch.setattr(shared, "coordinator", lambda args: flow.coord)
    op = tmp_path / "op"
    shared.write_secret(op, flow.op)
    (tmp_path / "a-file").write_text("")
    base = ["--operator-credential-file", str(op)]
    argv = ["admin", "add-node", "--name", "alpha", "--domain", "alpha", *base]
    assert main([*argv, "--credential-out", str(tmp_path / "a-file" / "alpha")]) == 2
    assert "cannot write a credential" in _one_line_error(capsys)
    assert "alpha" not in flow.status()["registry"]["nodes"]  # no node whose secret is lost

    good = tmp_path / "creds" / "alpha"
    assert main([*argv, "--credential-out", str(good)]) == 0
    assert main([*argv, "--credential-out", str(tmp_path / "creds" / "again")]) == 2
    assert "rotate-credential" in _one_line_error(capsys)  # how to get a new one
    assert not (tmp_path / "creds" / "again").exists()  # a new file of a failed call is removed

    # a rotation that could not write the new credential keeps the old one working
    rotate = ["admin", "rotate-credential", "--name", "alpha", *base]
    assert main([*rotate, "--credential-out", str(tmp_path / "a-file" / "new")]) == 2
    _one_line_error(capsys)
    flow.creds["alpha"] = good.read_text().strip()
    assert flow.join("alpha")["status"] == "accepted"


def test_credential_files_that_could_only_fail_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DUME_CREDENTIAL", raising=False)
    pasted = tmp_path / "pasted"
    shared.write_secret(pasted, "node 'alpha' (alpha) registered; its credential (shown once):\nabc")  # fmt: skip
    with pytest.raises(ValueError, match="more than one line"):
        shared.read_secret(str(pasted), "DUME_CREDENTIAL", "node credential")
    trailing = tmp_path / "trailing"
    trailing.write_text("  abc-def \n\n")
    trailing.chmod(0o600)
    assert shared.read_secret(str(trailing), "DUME_CREDENTIAL", "node credential") == "abc-def"
    monkeypatch.setenv("DUME_CREDENTIAL", " \n")
    with pytest.raises(ValueError, match="only whitespace"):
        shared.read_secret(None, "DUME_CREDENTIAL", "node credential")


# -- coordinator start ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--api-port", "99999"], "--api-port"),
        (["--api-port", "8443", "--tls-cert", "nowhere.pem"], "both --tls-cert and --tls-key"),
        (["--api-port", "8443", "--tls-cert", "c.pem", "--tls-key", "k.pem"], "does not exist"),
        (["--tls-key", "k.pem"], "need --api-port"),
    ],
)
def test_bad_api_flags_fail_before_the_store_is_founded(experts, tmp_path, capsys, flags, says):
    store = tmp_path / "store"
    argv = ["coordinator", "start", "--store", str(store), "--backbone", f"base:{experts['base']}",
            "--operator-credential-file", str(tmp_path / "op"), *flags]  # fmt: skip
    assert main(argv) == 2
    assert says in _one_line_error(capsys)
    assert not store.exists() and not (tmp_path / "op").exists()


# -- node join --dry-run --------------------------------------------------------------------------


def test_what_a_dry_run_shows_is_what_leaves_the_node(experts, tmp_path):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha")
    agent = flow.agent("alpha")
    from dist_helpers import JOIN

    shown = agent.join(str(experts["alpha"]["expert"]), [str(experts["alpha"]["data"])],
                       dry_run=True, **JOIN)["outbound"]  # fmt: skip
    assert flow.versions().list_versions() == []  # nothing sent
    result = agent.send_prepared()
    by_kind = {o["kind"]: o["bytes"] for o in shown}
    assert by_kind["weights"] == result["sent_bytes"]["expert"] == result["expert_bytes"]
    assert sum(by_kind.values()) == sum(result["sent_bytes"].values())


# -- dume unlearn ---------------------------------------------------------------------------------


def test_unlearn_reports_what_the_registry_records(experts, tmp_path, capsys, monkeypatch):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "beta")
    flow.join("alpha")
    flow.join("beta")
    monkeypatch.setattr(unlearn_cli, "coordinator", lambda args: flow.coord)
    op = tmp_path / "op"
    shared.write_secret(op, flow.op)
    base = ["--operator-credential-file", str(op)]
    capsys.readouterr()
    assert main(["unlearn", "--node", "beta", "--reason", "asked", "--purge", *base]) == 0
    assert "(purged): v2" in capsys.readouterr().out
    assert main(["unlearn", "--node", "beta", "--reason", "asked", *base]) == 0  # again
    assert "(purged): v2" in capsys.readouterr().out  # v2 is gone, not "marked"
    assert flow.versions().list_versions() == ["v1", "v3"]

    assert main(["unlearn", "--node", "alpha", "--reason", "asked", *base]) == 0
    out = capsys.readouterr().out
    assert "no version without it was published" in out and "v3 contains it" in out


def test_the_http_api_and_its_client_offer_settle(monkeypatch):
    from dume_dist.distributed import api
    from dume_dist.distributed.client import HttpTransport

    assert hasattr(api.CoordinatorAPI.func_or_class, "settle")  # POST /v1/node/settle
    assert "/v1/node/settle" in api.__doc__
    link = HttpTransport("https://127.0.0.1:8443", "alpha", "alpha", "secret")
    sent = []
    monkeypatch.setattr(link, "_json", lambda *a: sent.append(a) or {"version": "v2"})
    assert link.settle() == {"version": "v2"} and sent == [("POST", "/v1/node/settle", {})]
