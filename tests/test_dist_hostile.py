"""A registered node (or a reader, or a broken file) trying to break the coordinator: each failure
class of the reliability probe, fixed at its root. Every refusal is one line and changes nothing,
and the others' next join and publish still work."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch
from dist_helpers import Flow, make_experts

from dume_dist.cli.main import main
from dume_dist.cli.shared import read_secret, write_secret
from dume_dist.core.ngram import NgramStats
from dume_dist.core.stats import MAX_TOKENS
from dume_dist.distributed.coordinator import Coordinator
from dume_dist.distributed.state import public_view
from dume_dist.model.kinds import stats_from_bytes, stats_to_bytes
from dume_dist.store import CURRENT, BlobStore, ObjectStore, StoreError, VersionStore

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return make_experts(tmp_path_factory.mktemp("experts"), domains=("alpha", "beta", "gamma"))


def _prepared(experts, tmp, settings=None) -> Flow:
    """alpha joined; beta's expert uploaded and its statistics computed, not submitted."""
    flow = Flow(str(tmp / "store"), experts, tmp, settings=settings)
    flow.add("alpha", "beta", "gamma")
    flow.join("alpha")
    agent = flow.agent("beta")
    agent.authenticate()
    expert = str(experts["beta"]["expert"])
    spec, fingerprint = agent.check_expert(expert)
    agent.upload_expert(spec, fingerprint)
    job = agent.job(agent.fetch_backbone(), expert, fingerprint, [str(experts["beta"]["data"])],
                    {"max_tokens": 240, "seq_len": 16, "batch_size": 4})  # fmt: skip
    flow.computed = agent.compute(job, threads=1)
    return flow


@pytest.fixture(scope="module")
def paper(experts, tmp_path_factory):
    return _prepared(experts, tmp_path_factory.mktemp("paper"))


@pytest.fixture(scope="module")
def ngram(experts, tmp_path_factory):
    settings = {"routing": "ngram", "max_tokens_per_seq": 16, "ngram_buckets": 64}
    return _prepared(experts, tmp_path_factory.mktemp("ngram"), settings)


def snapshot(flow):
    return flow.status(), flow.store.list()


def refused(flow, fn, *args, error=ValueError, match=None):
    before = snapshot(flow)
    with pytest.raises(error, match=match) as err:
        fn(*args)
    assert "\n" not in str(err.value)
    assert snapshot(flow) == before
    return str(err.value)


def submit(flow, stats, tokens=None, sub_id="sub-bad", holdout=None):
    if tokens is None:
        tokens = (stats if not isinstance(stats, bytes) else stats_from_bytes(stats)).num_tokens
    args = (flow.creds["beta"], "beta", "beta", stats, sub_id, tokens)
    return flow.coord.submit_stats(*args, *([holdout] if holdout is not None else []))


# -- 1 and 5: statistics that would break the solve or the published router ------------------------


def test_an_indefinite_gram_is_refused_and_the_others_still_publish(paper):
    good = stats_from_bytes(paper.computed["stats"])
    g = good.gram_LPP.clone()
    g[:, 0, 1] = g[:, 1, 0] = 1e9  # symmetric, finite, not a Gram matrix (the probe's repro)
    msg = refused(paper, submit, paper, stats_to_bytes(good.with_meta(gram_LPP=g)))
    assert "positive semi-definite" in msg
    assert paper.join("gamma")["status"] == "accepted"  # the others' solve is untouched


def test_a_semidefinite_gram_of_impossible_size_is_refused(paper):
    good = stats_from_bytes(paper.computed["stats"])
    scale = torch.ones(good.gram_LPP.shape[1], dtype=torch.float64)
    scale[:-1] = 1e6  # PSD (D G D), same token count, features a million times too large
    huge = good.gram_LPP * scale[None, :, None] * scale[None, None, :]
    msg = refused(paper, submit, paper, stats_to_bytes(good.with_meta(gram_LPP=huge)))
    assert "larger features than the backbone allows" in msg
    many = good.gram_LPP * (2 * MAX_TOKENS / good.num_tokens)  # PSD, plausible per token
    msg = refused(paper, submit, paper, stats_to_bytes(good.with_meta(gram_LPP=many)))
    assert "more than one submission may" in msg


def test_ngram_counts_that_would_publish_inf_are_refused(ngram):
    good = stats_from_bytes(ngram.computed["stats"])
    held = ngram.computed["holdout"]
    assert isinstance(good, NgramStats)
    uni, ctx = good.unigram_V.clone(), good.context_V.clone()
    token = int(uni.argmax())
    uni[token] = 1e300  # the probe's repro: one token seen 1e300 times
    bad = stats_to_bytes(good.with_meta(unigram_V=uni, context_V=ctx))
    msg = refused(ngram, submit, ngram, bad, None, "sub-bad", held)
    assert "more than one submission may" in msg


def test_a_wrong_shape_is_refused_from_the_header(paper):
    good = stats_from_bytes(paper.computed["stats"])
    layers = good.gram_LPP.shape[0]
    more = torch.cat([good.gram_LPP, good.gram_LPP[:1]])  # one layer too many
    msg = refused(paper, submit, paper, stats_to_bytes(good.with_meta(gram_LPP=more)))
    assert f"expected F64 [{layers}," in msg  # named by the header check, before any tensor
    data = stats_to_bytes(good)
    msg = refused(paper, submit, paper, data[: len(data) // 2], good.num_tokens)  # truncated
    assert "header describes" in msg or "not safetensors" in msg


# -- 3 and 4: names and unbounded fields ---------------------------------------------------------


@pytest.mark.parametrize("name", ["gamma\n", "gam\nma", "-x", "a/b", "", "x" * 65, "é"])
def test_names_are_matched_whole(paper, name):
    from dume_dist.distributed import genesis

    _, hashed = genesis.issue_node_credential("n", "n")
    refused(paper, paper.coord.add_node, paper.op, name, "law", hashed, match="invalid")
    refused(paper, paper.coord.add_node, paper.op, "fine", name, hashed, match="invalid")
    blob_owner = "x" * 129 if name == "x" * 65 else name  # blob names may have 128
    with pytest.raises(ValueError):
        BlobStore(paper.store, CURRENT.blobs).put_blob("stats", blob_owner, b"x")


def test_unbounded_fields_are_refused(paper):
    stats = paper.computed["stats"]
    tokens = stats_from_bytes(stats).num_tokens
    beta = (paper.creds["beta"], "beta", "beta", stats)
    for sub_id in ("x" * 20_000_000, {"a": 1}, "two\nlines", ""):
        refused(paper, paper.coord.submit_stats, *beta, sub_id, tokens, match="submission id")
    refused(paper, paper.coord.submit_stats, *beta, "ok", float(tokens), match="claims")
    from safetensors.torch import save as st_save

    from dume_dist.core.stats import pack_symmetric

    good = stats_from_bytes(stats)
    meta = {"schema": "dume-stats/1", "feature_map": good.feature_map,
            "feature_dim": str(good.feature_dim), "num_layers": str(good.num_layers),
            "backbone_fingerprint": good.backbone_fingerprint,
            "expert_fingerprint": good.expert_fingerprint,
            "extra": "[" * 100_000 + "]" * 100_000}  # fmt: skip
    deep = st_save({"gram_packed": pack_symmetric(good.gram_LPP)}, metadata=meta)
    refused(paper, submit, paper, deep, tokens, match="extra")  # never a RecursionError
    refused(paper, paper.coord.unlearn, paper.op, "alpha", "r" * 10_000, match="reason")


# -- 6: a replayed leave is authenticated ---------------------------------------------------------


def test_leave_replay_with_a_wrong_credential_is_refused(experts, tmp_path):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "beta")
    flow.join("alpha")
    flow.join("beta")
    left = flow.coord.leave(flow.creds["beta"], "beta", "beta")
    assert left["version"] == "v3"
    refused(flow, flow.coord.leave, "not-the-secret", "beta", "beta", error=PermissionError)
    again = flow.coord.leave(flow.creds["beta"], "beta", "beta")  # the real replay: a no-op
    assert again["version"] == "v3" and flow.versions().list_versions() == ["v1", "v2", "v3"]


# -- 7: secrets on disk ---------------------------------------------------------------------------


def test_secrets_are_written_0600_and_readable_by_others_refused(tmp_path):
    path = tmp_path / "cred"
    path.write_text("old\n")
    path.chmod(0o644)
    write_secret(path, "s3cret")
    assert (path.stat().st_mode & 0o777) == 0o600 and read_secret(
        str(path), "NOPE", "x"
    ) == "s3cret"
    path.chmod(0o640)
    with pytest.raises(ValueError, match="readable by others"):
        read_secret(str(path), "NOPE_NOT_SET", "node credential")


# -- 10: credential refusals -----------------------------------------------------------------------


def test_one_refusal_for_unknown_node_wrong_domain_and_wrong_secret(paper):
    stats = paper.computed["stats"]
    msgs = {
        refused(paper, paper.coord.node_info, secret, name, domain, error=PermissionError).split(
            ":"
        )[1]
        for secret, name, domain in (
            (paper.creds["beta"], "nobody", "beta"),
            (paper.creds["beta"], "beta", "alpha"),
            ("wrong", "beta", "beta"),
        )
    }
    assert msgs == {" no active node registered for domain 'beta' holds this credential",
                    " no active node registered for domain 'alpha' holds this credential"}  # fmt: skip
    assert stats


def test_refusals_cost_one_scrypt_whether_the_node_exists_or_not(paper, monkeypatch):
    """Timing does not tell an unknown node from a wrong secret: both run one real scrypt."""
    from dume_dist.distributed import identity

    calls = []

    def counted(material, hashed):
        calls.append(hashed)
        return real(material, hashed)

    real = identity.verify_secret
    monkeypatch.setattr(identity, "verify_secret", counted)
    for secret, name, domain in (
        ("wrong", "beta", "beta"),  # an active node, a wrong secret
        (paper.creds["beta"], "nobody", "beta"),  # no such node
        (paper.creds["beta"], "beta", "alpha"),  # a node, another domain
    ):
        calls.clear()
        refused(paper, paper.coord.node_info, secret, name, domain, error=PermissionError)
        assert len(calls) == 1 and calls[0].startswith("scrypt$")


def test_credential_checks_do_not_wait_for_the_registry_lock(paper):
    """A wrong secret is refused while another call holds the registry: scrypt runs outside the
    lock, so wrong secrets queued at the (threaded) actor never delay the others."""
    done = threading.Event()
    with paper.coord._lock:
        errors = []

        def wrong():
            try:
                paper.coord.node_info("wrong", "beta", "beta")
            except PermissionError as exc:
                errors.append(exc)
            done.set()

        thread = threading.Thread(target=wrong)
        thread.start()
        assert done.wait(timeout=30), "the credential check waited for the lock"
        thread.join()
    assert len(errors) == 1


# -- 8 and 9: what readers see, and one bad file ---------------------------------------------------


def test_readers_need_only_the_public_prefix(experts, tmp_path, capsys):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha")
    flow.join("alpha")
    keys = flow.store.list()
    public = [k for k in keys if k.startswith("public/")]
    assert public and all(k.startswith(("public/", "private/")) for k in keys)
    assert not any(k.startswith("public/") and ("registry" in k or "blobs" in k) for k in keys)
    reader = tmp_path / "reader"  # a copy of public/ only: what a reader's credentials reach
    shutil.copytree(tmp_path / "store" / "public", reader / "public")
    assert main(["versions", "list", "--store", str(reader)]) == 0
    assert "v1" in capsys.readouterr().out
    assert main(["versions", "pull", "v1", str(tmp_path / "model"), "--store", str(reader)]) == 0
    assert (tmp_path / "model" / "config.json").is_file()


def test_one_bad_manifest_does_not_hide_the_others(experts, tmp_path, capsys):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "beta")
    flow.join("alpha")
    flow.join("beta")
    key = f"{CURRENT.versions}/v1/manifest.json"
    flow.store.write_bytes(key, flow.store.read_bytes(key)[:40])  # truncated
    assert main(["versions", "list", "--store", flow.url]) == 0
    out, err = capsys.readouterr()
    assert "v2" in out and "v1 skipped" in err and len(err.strip().splitlines()) == 1


def test_a_corrupt_registry_head_or_revision_falls_back(experts, tmp_path, caplog):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha")
    flow.join("alpha")
    before = flow.status()
    flow.store.write_bytes(f"{CURRENT.registry}/HEAD", b"999")
    restarted = Coordinator(flow.url, work_dir=str(tmp_path / "c2"))
    assert restarted.status() == before
    newest = before["revision"]
    key = f"{CURRENT.registry}/{newest:012d}.json"
    flow.store.write_bytes(key, flow.store.read_bytes(key)[:100])  # a truncated newest revision
    with caplog.at_level("WARNING"):
        status = Coordinator(flow.url, work_dir=str(tmp_path / "c3")).status()
    assert status["revision"] == newest and "unreadable" in caplog.text
    previous = flow.coord.registry.load(revision=newest - 1)[0]
    assert status["registry"]["nodes"] == public_view(previous)["nodes"]  # the revision before
    flow.coord = Coordinator(flow.url, work_dir=str(tmp_path / "c4"))
    assert flow.join("alpha")["status"] in ("accepted", "duplicate")  # and it carries on


def test_an_orphan_version_is_adopted_and_marked_on_unlearn(experts, tmp_path):
    """A second coordinator that uploads a version and then loses the registry race leaves a
    listed version the registry does not know: it is adopted (the next version's parent) and
    marked when one of its nodes is unlearned."""
    from dume_dist.store import StoreConflict

    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "beta")
    flow.join("alpha")
    loser = Coordinator(flow.url, work_dir=str(tmp_path / "loser"))
    stale = loser._load()
    flow.join("beta")  # v2, recorded
    reg, rev = stale
    reg.nodes["beta"] = flow.coord._load()[0].nodes["beta"]  # the loser saw beta's statistics
    digest = reg.content_digest()
    orphan = loser.publisher.publish(reg, digest, "join beta")  # uploaded ...
    with pytest.raises(StoreConflict):
        loser._save(reg, rev)  # ... and the registry race lost
    assert orphan == "v3" and VersionStore(flow.store, CURRENT.versions).latest() == "v3"
    result = flow.coord.unlearn(flow.op, "beta", "forget")
    assert result["affected_versions"] == ["v2", "v3"] and result["version"] == "v4"
    versions = VersionStore(flow.store, CURRENT.versions)
    assert versions.get_manifest("v3")["marks"]["contains_unlearned"] == ["beta"]
    assert versions.get_manifest("v4")["parent"] == "v3"
    recorded = {v["version"]: v for v in flow.status()["registry"]["versions"]}
    assert recorded["v3"]["adopted"] and recorded["v3"]["marked"] == ["beta"]


def test_store_keys_never_hold_control_characters(tmp_path):
    store = ObjectStore(str(tmp_path / "s"))
    for key in ("a/b\n", "a\x00b", "a/\tb"):
        with pytest.raises(ValueError):
            store.write_bytes(key, b"x")
    assert not os.listdir(tmp_path / "s") if (tmp_path / "s").exists() else True
    with pytest.raises(StoreError):
        ObjectStore(str(tmp_path / "s")).read_bytes("missing")


def test_reads_and_operator_calls_have_threads_of_their_own():
    """On the actor, `status` and `ping` run in the "reads" concurrency group and operator calls
    in "operator": wrong node secrets queued at the default group (one scrypt each) delay
    neither (measured: `status` 36 ms with 50 wrong secrets queued, 4.8 s when the groups were
    not applied). Ray ignores a group on a wrapper carrying the base class's __qualname__."""
    from dume_dist.distributed.cluster import OPERATOR_METHODS, coordinator_actor_class

    actor = coordinator_actor_class()
    for name, group in [("status", "reads"), ("ping", "reads")] + [
        (n, "operator") for n in OPERATOR_METHODS
    ]:
        method = getattr(actor, name)
        assert method.__ray_concurrency_group__ == group
        assert not method.__qualname__.startswith("Coordinator.")
    assert not hasattr(actor.submit_stats, "__ray_concurrency_group__")
