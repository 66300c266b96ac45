"""The coordinator's state machine, driven in-process (no Ray): found, join, improve, leave,
unlearn (bit-identical to a build that never had the node), restarts, duplicates, bad input.

The node agent runs in-process too (one worker, no process group); `test_dist_ray.py` runs
the same classes as Ray actors on a multi-node cluster.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from dist_helpers import JOIN, SETTINGS, Flow, assert_same_routers, make_experts

from dume_dist.core.stats import RouterStats
from dume_dist.distributed import genesis
from dume_dist.distributed.coordinator import Coordinator, routers_of
from dume_dist.model.kinds import stats_from_bytes, stats_to_bytes
from dume_dist.store import (
    CURRENT,
    BlobStore,
    ObjectStore,
    StoreError,
    StoreNotFound,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return make_experts(tmp_path_factory.mktemp("experts"))


def test_found_join_unlearn_is_bit_identical_to_a_build_without_the_node(experts, tmp_path):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "beta", "gamma")
    versions = [flow.join(n)["version"] for n in ("alpha", "beta", "gamma")]
    assert versions == ["v1", "v2", "v3"]
    manifest = flow.versions().get_manifest("v3")
    assert [c["name"] for c in manifest["contributors"]] == ["alpha", "beta", "gamma"]
    assert [c["expert_index"] for c in manifest["contributors"]] == [0, 1, 2]
    assert manifest["parent"] == "v2" and manifest["lam"] == SETTINGS["lam"]
    assert (
        manifest["backbone"]["fingerprint"] == flow.status()["registry"]["backbone"]["fingerprint"]
    )

    # Data never leaves the node: no store object holds any document's text; nor does any name a
    # directory of the operator's or of a node's machine (the founding base model, the experts,
    # the data): readers of the store see names, not paths.
    docs = [d.strip().encode() for n in ("alpha", "beta", "gamma")
            for d in experts[n]["data"].read_text().split("\n\n")]  # fmt: skip
    local = [str(experts["base"]).encode()] + [str(experts[n][k]).encode()
             for n in ("alpha", "beta", "gamma") for k in ("expert", "data")]  # fmt: skip
    for key in flow.store.list():
        raw = flow.store.read_bytes(key)
        assert not any(doc in raw for doc in docs), key
        assert not any(path in raw for path in local), key
    assert flow.status()["registry"]["backbone"]["sources"] == [{"name": "base"}]

    result = flow.coord.unlearn(flow.op, "beta", "contributor asked to be forgotten")
    assert result["version"] == "v4" and result["affected_versions"] == ["v2", "v3"]
    blobs = BlobStore(flow.store, CURRENT.blobs)
    assert blobs.list_blobs("stats", "beta") == [] and blobs.list_blobs("expert", "beta") == []
    assert not any("/beta/" in k for k in flow.store.list(CURRENT.blobs))
    assert flow.versions().get_manifest("v2")["marks"]["contains_unlearned"] == ["beta"]
    assert "contains_unlearned" not in flow.versions().get_manifest("v1")["marks"]

    fresh = Flow(str(tmp_path / "fresh"), experts, tmp_path / "f")
    fresh.add("alpha", "gamma")
    fresh.join("alpha")
    assert fresh.join("gamma")["version"] == "v2"
    assert_same_routers(flow.routers("v4"), fresh.routers("v2"))

    # ... and to the single-machine build of the same two experts on the same backbone.
    from dume_dist.model.build import build_dume

    names = ("alpha", "gamma")
    build_dume(
        {n: str(experts[n]["expert"]) for n in names},
        {n: [str(experts[n]["data"])] for n in names},
        tmp_path / "single",
        backbone=f"base:{experts['base']}", routing="paper",
        max_tokens_per_seq=16, seq_len=16, max_tokens=240, batch_size=4, progress=False,
    )  # fmt: skip
    assert_same_routers(flow.routers("v4"), routers_of(tmp_path / "single"))


def test_unlearn_purge_deletes_earlier_versions(experts, tmp_path):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "beta")
    flow.join("beta")
    flow.join("alpha")
    cache = tmp_path / "coord" / "stats-cache"
    cached = set(cache.glob("*.safetensors"))
    result = flow.coord.unlearn(flow.op, "beta", "legal request", purge=True)
    assert result["version"] == "v3" and result["affected_versions"] == ["v1", "v2"]
    assert flow.versions().list_versions() == ["v3"]
    # beta's statistics left the coordinator's disk too; the purge collected v1's and v2's chunks
    assert set() < set(cache.glob("*.safetensors")) < cached
    objects = {k.rsplit("/", 1)[-1] for k in flow.store.list(f"{CURRENT.versions}/objects")}
    assert objects == flow.versions().referenced()
    with pytest.raises(StoreNotFound):
        flow.versions().get_manifest("v1")
    assert not flow.store.list(f"{CURRENT.versions}/v1/files")
    registry = flow.status()["registry"]
    assert [v["purged"] for v in registry["versions"]] == [True, True, False]
    assert registry["nodes"]["beta"]["state"] == "unlearned"
    # Idempotent (a replayed call): nothing new.
    again = flow.coord.unlearn(flow.op, "beta", "legal request", purge=True)
    assert again["version"] == "v3" and flow.versions().list_versions() == ["v3"]
    # Its credential is revoked.
    with pytest.raises(PermissionError):
        flow.join("beta")


def test_restarted_coordinator_has_the_same_registry_and_next_version_is_correct(experts, tmp_path):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "gamma")
    flow.join("alpha")
    before = flow.status()
    flow.coord = Coordinator(flow.url, work_dir=str(tmp_path / "coord2"))  # a new actor, same store
    assert flow.coord.status() == before
    assert flow.join("gamma")["version"] == "v2"

    fresh = Flow(str(tmp_path / "fresh"), experts, tmp_path / "f")
    fresh.add("alpha", "gamma")
    fresh.join("gamma")
    fresh.join("alpha")
    assert_same_routers(flow.routers("v2"), fresh.routers("v2"))


def test_duplicate_submission_is_counted_once(experts, tmp_path):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha")
    first = flow.join("alpha")
    tokens = flow.status()["registry"]["nodes"]["alpha"]["stats"][0]["num_tokens"]
    assert first["status"] == "accepted"
    rerun = flow.join("alpha")  # same data, expert, backbone and settings: same submission id
    assert rerun["status"] == "duplicate" and rerun["version"] == "v1"
    # The same bytes under another submission id (a retried push): counted once as well.
    blob = flow.status()["registry"]["nodes"]["alpha"]["stats"][0]["blob"]
    data = BlobStore(flow.store, CURRENT.blobs).get_blob(blob)
    again = flow.coord.submit_stats(flow.creds["alpha"], "alpha", "alpha", data, "other-id", tokens)
    assert again["status"] == "duplicate"
    registry = flow.status()["registry"]
    assert len(registry["nodes"]["alpha"]["stats"]) == 1 and len(registry["versions"]) == 1


def test_improving_a_domain_adds_and_a_new_expert_invalidates(experts, tmp_path):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "beta")
    flow.join("alpha")
    flow.join("beta")
    more = flow.join("alpha", data=[experts["alpha"]["valid"]])
    assert more["status"] == "accepted" and more["version"] == "v3"
    alpha = flow.status()["registry"]["nodes"]["alpha"]
    assert len(alpha["stats"]) == 2
    assert flow.versions().get_manifest("v3")["trigger"] == "improve alpha"
    # alpha replaces its expert (gamma's weights): old statistics are stale and dropped.
    old_blobs = [s["blob"] for s in alpha["stats"]]
    replaced = flow.join("alpha", expert=experts["gamma"]["expert"])
    assert replaced["expert_uploaded"] and replaced["version"] == "v4"
    alpha = flow.status()["registry"]["nodes"]["alpha"]
    assert len(alpha["stats"]) == 1 and alpha["stats"][0]["blob"] not in old_blobs
    assert all(not flow.store.exists(f"{CURRENT.blobs}/{b}.bin") for b in old_blobs)


def test_hold_publish_and_leave(experts, tmp_path):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path, hold=True)
    flow.add("alpha", "beta", "gamma")
    for name in ("alpha", "beta", "gamma"):
        assert flow.join(name)["version"] is None  # held
    assert flow.versions().list_versions() == []
    assert flow.coord.publish(flow.op)["version"] == "v1"
    assert flow.coord.publish(flow.op)["version"] == "v1"  # nothing changed: no new version
    flow.coord.set_hold(flow.op, False)
    left = flow.coord.leave(flow.creds["gamma"], "gamma", "gamma")
    assert left["version"] == "v2"
    assert [c["name"] for c in flow.versions().get_manifest("v2")["contributors"]] == [
        "alpha",
        "beta",
    ]
    assert not flow.store.list(f"{CURRENT.blobs}/stats/gamma")
    # Leaving does not mark old versions (the node withdrew; unlearning marks).
    assert "contains_unlearned" not in flow.versions().get_manifest("v1")["marks"]


# -- bad input: a clear error and nothing changed --------------------------------------------------


@pytest.fixture(scope="module")
def founded(experts, tmp_path_factory):
    """One store shared by the bad-input tests: each asserts it changed nothing."""
    tmp_path = tmp_path_factory.mktemp("founded")
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "beta")
    flow.join("alpha")
    agent = flow.agent("beta")
    agent.authenticate()
    spec, fingerprint = agent.check_expert(str(experts["beta"]["expert"]))
    agent.upload_expert(spec, fingerprint)
    data = flow.status()["registry"]["nodes"]["alpha"]["stats"][0]["blob"]
    good = stats_from_bytes(BlobStore(flow.store, CURRENT.blobs).get_blob(data))
    flow.good = good.with_meta(
        expert_fingerprint=fingerprint
    )  # beta's fingerprint, alpha's numbers
    return flow


def _snapshot(flow):
    return (flow.status(), flow.store.list())


def _bad_stats(kind, good: RouterStats):
    g = good.gram_LPP.clone()
    if kind == "wrong_shape":
        g = torch.zeros(g.shape[0], g.shape[1] + 1, g.shape[2] + 1, dtype=torch.float64)
        g[:, -1, -1] = 5
        return stats_to_bytes(good.with_meta(gram_LPP=g)), 5
    if kind == "wrong_backbone":
        return stats_to_bytes(good.with_meta(backbone_fingerprint="0" * 64)), good.num_tokens
    if kind == "wrong_expert":
        return stats_to_bytes(good.with_meta(expert_fingerprint="1" * 64)), good.num_tokens
    if kind == "nan":
        g[0, 0, 0] = float("nan")
        return stats_to_bytes(good.with_meta(gram_LPP=g)), good.num_tokens
    if kind == "non_symmetric":
        g[0, 0, 1] += 1.0
        return good.with_meta(
            gram_LPP=g
        ), good.num_tokens  # as a tensor: bytes are always symmetric
    if kind == "wrong_token_count":
        return stats_to_bytes(good), good.num_tokens + 1
    if kind == "garbage":
        return b"not safetensors at all", 1
    raise AssertionError(kind)


BAD = [
    "wrong_shape",
    "wrong_backbone",
    "wrong_expert",
    "nan",
    "non_symmetric",
    "wrong_token_count",
    "garbage",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_statistics_change_nothing(founded, kind):
    before = _snapshot(founded)
    stats, tokens = _bad_stats(kind, founded.good)
    with pytest.raises(ValueError) as err:
        founded.coord.submit_stats(
            founded.creds["beta"], "beta", "beta", stats, f"sub-{kind}", tokens
        )
    assert "\n" not in str(err.value)
    assert _snapshot(founded) == before


def test_bad_requests_change_nothing(founded, experts):
    flow = founded
    before = _snapshot(flow)
    stats = stats_to_bytes(flow.good)
    with pytest.raises(PermissionError, match="credential rejected"):
        flow.coord.submit_stats("wrong-secret", "beta", "beta", stats, "x", flow.good.num_tokens)
    with pytest.raises(PermissionError, match="registered for domain"):
        flow.coord.submit_stats(
            flow.creds["beta"], "beta", "alpha", stats, "x", flow.good.num_tokens
        )
    with pytest.raises(PermissionError, match="credential rejected"):  # bound to its own name
        flow.coord.submit_stats(
            flow.creds["beta"], "alpha", "alpha", stats, "x", flow.good.num_tokens
        )
    with pytest.raises(ValueError, match="unknown node 'nobody'"):
        flow.coord.unlearn(flow.op, "nobody", "why")
    with pytest.raises(PermissionError, match="operator credential rejected"):
        flow.coord.unlearn(flow.creds["alpha"], "alpha", "a node cannot unlearn")
    with pytest.raises(PermissionError, match="operator credential rejected"):
        flow.coord.add_node("nope", "eve", "eve", "x")
    with pytest.raises(ValueError, match="fingerprint"):
        mlp = BlobStore(flow.store, CURRENT.blobs).get_blob(
            flow.status()["registry"]["nodes"]["alpha"]["expert"]["blob"]
        )
        flow.coord.register_expert(flow.creds["beta"], "beta", "beta", mlp, "2" * 64)
    assert _snapshot(flow) == before


def test_unreachable_store_is_one_clear_error(tmp_path):
    coord = Coordinator(
        "s3://dume-nowhere/x", {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}
    )
    with pytest.raises(StoreError) as err:
        coord.status()
    assert "cannot connect" in str(err.value) and "\n" not in str(err.value)


def test_status_has_no_secrets(founded):
    text = json.dumps(founded.status())
    assert "scrypt$" not in text and founded.creds["alpha"] not in text


def test_two_coordinators_on_one_store_do_not_overwrite_each_other(experts, tmp_path):
    from dume_dist.store import StoreConflict

    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    other = Coordinator(flow.url, work_dir=str(tmp_path / "other"))
    stale = flow.coord._load()  # coordinator A read the registry ...
    _, hashed = genesis.issue_node_credential("beta", "beta")
    other.add_node(flow.op, "beta", "beta", hashed)  # ... B changed it meanwhile
    flow.coord._load = lambda: stale
    _, hashed = genesis.issue_node_credential("alpha", "alpha")
    with pytest.raises(StoreConflict, match="another coordinator"):
        flow.coord.add_node(flow.op, "alpha", "alpha", hashed)
    assert set(other.status()["registry"]["nodes"]) == {"beta"}


def test_rebase_makes_statistics_stale_until_recomputed(experts, tmp_path):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "beta")
    flow.join("alpha")
    flow.join("beta")
    old_fp = flow.status()["registry"]["backbone"]["fingerprint"]
    with pytest.raises(PermissionError):
        flow.coord.rebase(flow.creds["alpha"], {})
    record = genesis.rebase_record(flow.store, f"base:{experts['delta']['expert']}", {})
    result = flow.coord.rebase(flow.op, record)
    assert result["rebased"] and result["stale_blobs"] == 2
    registry = flow.status()["registry"]
    assert registry["backbone"]["fingerprint"] == record["fingerprint"] != old_fp
    assert {r["state"] for r in registry["nodes"].values()} == {"registered"}
    assert not flow.store.list(f"{CURRENT.blobs}/stats")
    assert flow.join("alpha")["version"] == "v3"  # each recomputation publishes (unless held)
    again = flow.join("beta")
    assert again["status"] == "accepted" and again["version"] == "v4"
    manifest = flow.versions().get_manifest("v4")
    assert manifest["backbone"]["fingerprint"] == record["fingerprint"]
    assert [c["name"] for c in manifest["contributors"]] == ["alpha", "beta"]


def test_one_worker_per_gpu_else_one_cpu_worker():
    from dume_dist.distributed.agent import local_workers

    assert local_workers(None, 0) == (1, "gloo")
    assert local_workers(None, 4) == (4, "nccl")
    assert local_workers(2, 0) == (2, "gloo")
    assert local_workers(2, 4) == (2, "nccl")
    with pytest.raises(ValueError, match="has 4 GPUs"):
        local_workers(5, 4)
    with pytest.raises(ValueError):
        local_workers(0, 0)


# -- routing options: the distributed pipeline equals the single-machine build -------------------

CONTEXT = {"routing": "context", "max_tokens_per_seq": 16}
BUILD = {"max_tokens_per_seq": 16, "seq_len": 16, "max_tokens": 240, "batch_size": 4}


def _single_build(experts, out, names, **kw):
    from dume_dist.model.build import build_dume

    return build_dume(
        {n: str(experts[n]["expert"]) for n in names},
        {n: [str(experts[n]["data"])] for n in names},
        out, backbone=f"base:{experts['base']}", progress=False, **BUILD, **kw,
    )  # fmt: skip


def _config_routing(model_dir):
    return json.loads((model_dir / "config.json").read_text())["routing"]


def _pulled(flow, vid):
    flow.routers(vid)
    return flow.tmp / f"pull-{hashlib.sha1(flow.url.encode()).hexdigest()[:6]}-{vid}"


def test_context_routing_equals_the_single_machine_build(experts, tmp_path):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path, settings=CONTEXT)
    settings = flow.status()["registry"]["settings"]
    assert settings["routing"]["features"] == "prefix_mean" and settings["lam"] == "auto"
    assert settings["feature_map"] == "prefix_mean" and settings["routing"]["preset"] == "context"
    names = ("alpha", "beta", "gamma")
    flow.add(*names)
    for name in names:
        result = flow.join(name)
        assert result["status"] == "accepted" and result["holdout_bytes"] > 0
    nodes = flow.status()["registry"]["nodes"]
    for name in names:
        (entry,) = nodes[name]["stats"]
        assert [h["smoothing"] for h in entry["holdout"]] == [0.0]
        assert flow.store.exists(f"{CURRENT.blobs}/{entry['holdout'][0]['blob']}.bin")

    single = _single_build(experts, tmp_path / "single", names, routing="context")
    pulled = _pulled(flow, "v3")
    assert_same_routers(flow.routers("v3"), routers_of(tmp_path / "single"))
    assert _config_routing(pulled) == _config_routing(tmp_path / "single")
    assert _config_routing(pulled)["features"] == "prefix_mean"
    manifest = flow.versions().get_manifest("v3")
    assert manifest["lam"] == single.routing.lam == manifest["routing"]["lam"]
    assert manifest["routing"]["selection"] == single.manifest["routing"]["selection"]
    assert manifest["routing"]["solver"] == "lda"
    assert manifest["routing"]["priors"] == "equal" == _config_routing(pulled)["priors"]
    assert all("holdout" in s for c in manifest["contributors"] for s in c["stats"])


def _founded_with_beta_computed(experts, tmp_path, settings):
    """A store with ``settings`` where alpha joined and beta's expert is uploaded; beta's own
    statistics (fit and held-out) are computed but not submitted."""
    flow = Flow(str(tmp_path / "store"), experts, tmp_path, settings=settings)
    flow.add("alpha", "beta")
    flow.join("alpha")
    agent = flow.agent("beta")
    agent.authenticate()
    backbone_dir = agent.fetch_backbone()
    expert = str(experts["beta"]["expert"])
    spec, fingerprint = agent.check_expert(expert)
    agent.upload_expert(spec, fingerprint)
    opts = {k: JOIN[k] for k in ("max_tokens", "seq_len", "batch_size")}
    flow.job = agent.job(backbone_dir, expert, fingerprint, [str(experts["beta"]["data"])], opts)
    flow.computed = agent.compute(flow.job, threads=1)
    return flow


@pytest.fixture(scope="module")
def context_founded(experts, tmp_path_factory):
    return _founded_with_beta_computed(experts, tmp_path_factory.mktemp("context"), CONTEXT)


def _submit(flow, stats, holdout, sub_id="sub-x"):
    tokens = stats_from_bytes(stats).num_tokens if isinstance(stats, bytes) else stats.num_tokens
    return flow.coord.submit_stats(
        flow.creds["beta"], "beta", "beta", stats, sub_id, tokens, holdout
    )


def test_a_submission_without_the_needed_held_out_statistics_is_refused(context_founded):
    flow = context_founded
    before = _snapshot(flow)
    stats, held = flow.computed["stats"], flow.computed["holdout"]
    assert set(held) == {0.0}
    for holdout in (None, {}, {0.5: held[0.0]}):
        with pytest.raises(ValueError, match="held-out statistics") as err:
            _submit(flow, stats, holdout)
        assert "\n" not in str(err.value)
    assert _snapshot(flow) == before


def test_statistics_of_the_wrong_feature_map_are_refused(context_founded, experts, tmp_path):
    flow = context_founded
    before = _snapshot(flow)
    fit = stats_from_bytes(flow.computed["stats"])
    held = stats_from_bytes(flow.computed["holdout"][0.0])
    cases = [
        (fit.with_meta(feature_map="token"), {0.0: held}),  # right shape, wrong identity
        (fit, {0.0: held.with_meta(feature_map="prefix_mean+ema:0.5")}),
        (fit, {0.0: held.with_meta(feature_map="token")}),
    ]
    for stats, holdout in cases:
        with pytest.raises(ValueError, match="feature map") as err:
            _submit(flow, stats, holdout)
        assert "\n" not in str(err.value)
    # Token statistics (the paper's, of another shape) do not fit a prefix_mean coordinator.
    paper = Flow(str(tmp_path / "paper"), experts, tmp_path / "p")
    paper.add("beta")
    paper.join("beta")
    blob = paper.status()["registry"]["nodes"]["beta"]["stats"][0]["blob"]
    token = stats_from_bytes(BlobStore(paper.store, CURRENT.blobs).get_blob(blob))
    token = token.with_meta(expert_fingerprint=fit.expert_fingerprint,
                            backbone_fingerprint=fit.backbone_fingerprint)  # fmt: skip
    with pytest.raises(ValueError):
        _submit(flow, token, {0.0: held})
    assert _snapshot(flow) == before
    # The good submission is accepted, then a retry is a duplicate (no-op).
    accepted = _submit(flow, flow.computed["stats"], flow.computed["holdout"], "sub-good")
    assert accepted["status"] == "accepted"
    after = _snapshot(flow)
    again = _submit(flow, flow.computed["stats"], flow.computed["holdout"], "sub-good")
    other = _submit(flow, flow.computed["stats"], flow.computed["holdout"], "sub-other")
    assert again["status"] == other["status"] == "duplicate"
    assert _snapshot(flow) == after


def test_held_out_hashes_are_in_the_content_digest():
    from dume_dist.distributed import state as st

    node = {"domain": "d", "state": "active", "expert": {"fingerprint": "f"},
            "stats": [{"sha256": "a", "blob": "stats/n/a"}]}  # fmt: skip
    registry = {"backbone": {"fingerprint": "b"}, "settings": {}, "nodes": {"n": node}}
    plain = st.content_digest(registry)
    node["stats"][0]["holdout"] = [{"smoothing": 0.0, "sha256": "h1", "blob": "stats/n/h1"}]
    one = st.content_digest(registry)
    node["stats"][0]["holdout"][0]["sha256"] = "h2"
    assert len({plain, one, st.content_digest(registry)}) == 3
    assert st.entry_blobs(node["stats"][0]) == ["stats/n/a", "stats/n/h1"]


def test_an_old_registry_keeps_the_papers_routing(experts, tmp_path):
    from dume_dist.store import RegistryStore

    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    registry = RegistryStore(flow.store, CURRENT.registry)
    state, rev = registry.load()
    old = {"lam": 0.05, "temperature": 1.0, "top_k": 1, "max_tokens_per_seq": 16,
           "feature_map": "token"}  # fmt: skip
    state["settings"] = dict(old)  # as a coordinator before routing options wrote it
    registry.save(state, rev)
    flow.add("alpha", "gamma")
    flow.join("alpha")
    assert flow.join("gamma")["version"] == "v2"
    assert flow.status()["registry"]["settings"] == old  # read as it is, never rewritten
    assert "holdout" not in flow.status()["registry"]["nodes"]["alpha"]["stats"][0]
    manifest = flow.versions().get_manifest("v2")
    assert manifest["lam"] == 0.05 and manifest["routing"]["features"] == "token"
    assert manifest["routing"]["solver"] == "ridge"
    _single_build(experts, tmp_path / "single", ("alpha", "gamma"), routing="paper", lam=0.05)
    assert_same_routers(flow.routers("v2"), routers_of(tmp_path / "single"))


@pytest.mark.parametrize(
    "bad",
    [
        {"routing": "nope"},
        {"lam": -1.0},
        {"lam": "often"},
        {"solver": "lda", "lam": 2.0},
        {"features": "bag"},
        {"smoothing": 1.5},
        {"lam": "auto", "holdout_fraction": 1.0},
        {"top_k": 0},
        {"temperature": 0},
        {"max_tokens_per_seq": 0},
        {"routing": "paper", "colour": "blue"},
        {"routing": "context", "feature_map": "token"},
    ],
)
def test_bad_routing_settings_are_one_line_errors_and_write_nothing(experts, tmp_path, bad):
    from dume_dist.distributed.coordinator import check_settings

    with pytest.raises(ValueError) as err:
        check_settings(bad)
    assert "\n" not in str(err.value)
    url = str(tmp_path / "store")
    coord = Coordinator(url, work_dir=str(tmp_path / "coord"))
    with pytest.raises(ValueError):
        genesis.found(coord, ObjectStore(url), backbone=f"base:{experts['base']}", founding={},
                      settings={"max_tokens_per_seq": 16, **bad})  # fmt: skip
    assert ObjectStore(url).list() == []


def test_recover_deletes_blobs_no_registry_entry_references(experts, tmp_path):
    """A call that died between writing its blobs and saving the registry left them behind: the
    restarted coordinator deletes them (complete or half-written) and keeps every referenced one."""
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "beta")
    flow.join("alpha")
    blobs = BlobStore(flow.store, CURRENT.blobs)
    kept = {k for k in flow.store.list(CURRENT.blobs)}
    orphan = blobs.put_blob("stats", "beta", b"statistics whose registry save never happened")
    half = f"{CURRENT.blobs}/stats/alpha/{'0' * 64}.bin"  # died before its .json
    flow.store.write_bytes(half, b"partial")
    assert flow.coord.recover()["blobs_removed"] == 2
    assert set(flow.store.list(CURRENT.blobs)) == kept and not flow.store.exists(half)
    assert orphan.split("/")[2] not in " ".join(flow.store.list(CURRENT.blobs))
    assert flow.coord.recover()["blobs_removed"] == 0  # idempotent
    assert flow.join("beta")["version"] == "v2"  # the registry's own blobs all still read


def test_max_tokens_per_seq_defaults_to_the_experts_position_limit(experts, tmp_path):
    from transformers import AutoConfig

    limit = AutoConfig.from_pretrained(experts["base"]).max_position_embeddings
    url = str(tmp_path / "store")
    coord = Coordinator(url, work_dir=str(tmp_path / "coord"))
    with pytest.raises(ValueError, match="exceeds the experts' max_position_embeddings") as err:
        genesis.found(coord, ObjectStore(url), backbone=f"base:{experts['base']}", founding={},
                      settings={"routing": "paper", "max_tokens_per_seq": limit + 1})  # fmt: skip
    assert "\n" not in str(err.value) and ObjectStore(url).list() == []
    genesis.found(coord, ObjectStore(url), backbone=f"base:{experts['base']}", founding={},
                  settings={"routing": "paper"})  # fmt: skip
    assert coord.status()["registry"]["settings"]["max_tokens_per_seq"] == min(1024, limit)
    assert genesis.fit_settings({}, 4096)["max_tokens_per_seq"] == 1024  # the paper's at most


def test_settings_resolve_presets_and_overrides():
    from dume_dist.distributed.artifacts import routing_of
    from dume_dist.distributed.coordinator import check_settings
    from dume_dist.model.routing import resolve_routing

    assert routing_of(check_settings({})) == resolve_routing()  # the one default
    paper = check_settings({"routing": "paper"})
    assert routing_of(paper) == resolve_routing("paper")
    assert paper["lam"] == 0.01 and paper["feature_map"] == "token" and paper["top_k"] == 1
    tuned = check_settings({"routing": "paper", "lam": "auto", "smoothing": 0.5, "top_k": 2})
    spec = routing_of(tuned)
    assert spec.lam == "auto" and spec.holdout_fraction == 0.1 and spec.top_k == 2
    assert spec.holdout_smoothings() == (0.5,)
    ctx = check_settings({"routing": "context", "holdout_fraction": 0.2})
    assert routing_of(ctx) == resolve_routing("context", holdout_fraction=0.2)
    assert json.loads(json.dumps(ctx)) == ctx
    assert routing_of({"lam": 0.05, "top_k": 1, "feature_map": "token"}).lam == 0.05


# -- ngram routing: token counts instead of Grams ----------------------------------------------

NGRAM = {"routing": "ngram", "max_tokens_per_seq": 16}
SMALL_NGRAM = {**NGRAM, "ngram_buckets": 64}


def test_ngram_routing_equals_the_single_machine_build(experts, tmp_path):
    from dume_dist.core.ngram import NgramStats

    flow = Flow(str(tmp_path / "store"), experts, tmp_path, settings=NGRAM)
    registry = flow.status()["registry"]
    settings = registry["settings"]
    assert settings["routing"]["features"] == "ngram" and settings["lam"] == "auto"
    assert settings["feature_map"] == "ngram:4194304" and settings["routing"]["preset"] == "ngram"
    assert registry["backbone"]["vocab_size"] == registry["backbone"]["semantic_config"]["vocab_size"]  # fmt: skip
    names = ("alpha", "beta", "gamma")
    flow.add(*names)
    for name in names:
        result = flow.join(name)
        assert result["status"] == "accepted" and result["holdout_bytes"] > 0
    nodes = flow.status()["registry"]["nodes"]
    for name in names:
        (entry,) = nodes[name]["stats"]
        (held,) = entry["holdout"]
        assert held["smoothing"] == 0.0 and held["feature_map"] == "ngram:4194304+curve"
        stats = stats_from_bytes(BlobStore(flow.store, CURRENT.blobs).get_blob(entry["blob"]))
        assert isinstance(stats, NgramStats) and stats.pairs_K3 is None

    single = _single_build(experts, tmp_path / "single", names, routing="ngram")
    pulled = _pulled(flow, "v3")
    routers = flow.routers("v3")
    assert {k.split(".")[0] for k in routers} == {"ngram_router"}
    assert_same_routers(routers, routers_of(tmp_path / "single"))
    assert _config_routing(pulled) == _config_routing(tmp_path / "single")
    assert _config_routing(pulled)["features"] == "ngram"
    manifest = flow.versions().get_manifest("v3")
    assert manifest["lam"] == single.routing.lam == manifest["routing"]["lam"]
    # mu from the nodes' held-out curves (the same bits as the single machine's, next line)
    assert manifest["routing"]["selection"]["criterion"] == "heldout_loglik"
    assert manifest["routing"]["selection"] == single.manifest["routing"]["selection"]
    assert manifest["routing"]["solver"] == "nb"
    # routing shares estimated from the statistics, in the manifest and `dume status`
    assert manifest["routing"]["shares"] == single.manifest["routing"]["shares"]
    assert flow.status()["shares"] == manifest["routing"]["shares"]
    assert manifest["routing"]["shares"]["statistics"] == "held-out"
    assert flow.status()["warnings"] == []  # 2^22 buckets: tables far from full


@pytest.mark.parametrize(
    "settings,routing,router_key",
    [
        (CONTEXT, ("context", {}), "model.layers.0.mlp.router.weight"),
        (SMALL_NGRAM, ("ngram", {"ngram_buckets": 64}), "ngram_router.unigram_counts"),
        # with text each node's expert writes: the node's sample is the single machine's
        (
            {**SMALL_NGRAM, "ngram_sample": 0.5},
            ("ngram", {"ngram_buckets": 64, "ngram_sample": 0.5}),
            "ngram_router.unigram_counts",
        ),
    ],
    ids=["context", "ngram", "ngram-sample"],
)
def test_unlearning_equals_a_build_without_the_node(
    experts, tmp_path, settings, routing, router_key
):
    from dume_dist.model.routing import resolve_routing

    flow = Flow(str(tmp_path / "store"), experts, tmp_path, settings=settings)
    flow.add("alpha", "beta", "gamma")
    for name in ("alpha", "beta", "gamma"):
        flow.join(name)
    held = [h["blob"] for s in flow.status()["registry"]["nodes"]["beta"]["stats"]
            for h in s["holdout"]]  # fmt: skip
    result = flow.coord.unlearn(flow.op, "beta", "forget me")
    assert result["version"] == "v4"
    assert not any("/beta/" in k for k in flow.store.list(CURRENT.blobs))
    assert held and not any(flow.store.exists(f"{CURRENT.blobs}/{b}.bin") for b in held)

    preset, overrides = routing
    single = _single_build(
        experts,
        tmp_path / "single",
        ("alpha", "gamma"),
        routing=resolve_routing(preset, **overrides),
    )
    assert_same_routers(flow.routers("v4"), routers_of(tmp_path / "single"))
    assert _config_routing(_pulled(flow, "v4")) == _config_routing(tmp_path / "single")
    assert flow.versions().get_manifest("v4")["lam"] == single.routing.lam
    # Unlearning changed the routers (λ / μ is chosen again on the remaining held-out statistics).
    assert flow.routers("v3")[router_key].shape[0] == 3
    if "ngram_sample" in settings:  # the nodes counted text their experts wrote
        (entry,) = flow.status()["registry"]["nodes"]["alpha"]["stats"]
        stats = stats_from_bytes(BlobStore(flow.store, CURRENT.blobs).get_blob(entry["blob"]))
        assert 0 < stats.extra["sampled_tokens"] < stats.num_tokens
        assert flow.versions().get_manifest("v4")["routing"]["ngram_sample"] == 0.5
    if settings is SMALL_NGRAM:  # 64 buckets: `dume status` names the full tables
        assert any("fills" in w and "--ngram-buckets" in w for w in flow.status()["warnings"])


@pytest.fixture(scope="module")
def ngram_founded(experts, tmp_path_factory):
    """The same with ngram routing (64 buckets): beta's counts computed, not submitted."""
    return _founded_with_beta_computed(experts, tmp_path_factory.mktemp("ngram"), SMALL_NGRAM)


def test_ngram_submission_without_held_out_counts_is_refused(ngram_founded):
    flow = ngram_founded
    assert flow.job.ngram_buckets == 64 and flow.job.holdout_smoothings == [0.0]
    before = _snapshot(flow)
    stats, held = flow.computed["stats"], flow.computed["holdout"]
    assert set(held) == {0.0}
    for holdout in (None, {}, {0.5: held[0.0]}):
        with pytest.raises(ValueError, match="held-out statistics") as err:
            _submit(flow, stats, holdout)
        assert "\n" not in str(err.value)
    # Held-out counts without their curve, or fit counts in the held-out slot, are refused.
    fit = stats_from_bytes(stats)
    no_curve = stats_from_bytes(held[0.0]).with_meta(curve_M=None, curve_mu_M=None,
                                                     curve_count_1=None, feature_map="ngram:64")  # fmt: skip
    for stats_, holdout in ((stats, {0.0: no_curve}), (stats, {0.0: fit}), (held[0.0], held)):
        with pytest.raises(ValueError, match="feature map") as err:
            _submit(flow, stats_, holdout)
        assert "\n" not in str(err.value)
    assert _snapshot(flow) == before


def test_hostile_heldout_curves_are_refused_and_change_nothing(ngram_founded):
    flow = ngram_founded
    before = _snapshot(flow)
    stats, held = flow.computed["stats"], stats_from_bytes(flow.computed["holdout"][0.0])
    curve, grid = held.curve_M, held.curve_mu_M
    assert held.pairs_K3 is None and curve.shape == (9,) and (curve < 0).all()
    bad = {
        "log-probabilities": held.with_meta(curve_M=-curve),  # above 0
        "bigram log-probabilities": held.with_meta(curve_M=curve * 1e6),  # far below the floor
        "finite": held.with_meta(curve_M=curve.clone().fill_(float("inf"))),
        "grid": held.with_meta(curve_mu_M=grid * 2),  # not the coordinator's grid
        "shape|layout|curve": held.with_meta(curve_M=curve[:4], curve_mu_M=grid[:4]),
        "scores": held.with_meta(curve_count_1=held.curve_count_1 + 1),  # not its bigram count
    }
    for match, forged in bad.items():
        with pytest.raises(ValueError, match=match) as err:
            _submit(flow, stats, {0.0: stats_to_bytes(forged)})
        assert "\n" not in str(err.value)
    assert _snapshot(flow) == before


def test_gram_and_ngram_statistics_do_not_cross(ngram_founded, context_founded):
    ngram, context = ngram_founded, context_founded
    fp = stats_from_bytes(ngram.computed["stats"])
    meta = dict(expert_fingerprint=fp.expert_fingerprint,
                backbone_fingerprint=fp.backbone_fingerprint)  # fmt: skip
    grams = stats_from_bytes(context.computed["stats"]).with_meta(**meta)
    held_grams = stats_from_bytes(context.computed["holdout"][0.0]).with_meta(**meta)
    counts = stats_from_bytes(ngram.computed["stats"])
    held_counts = stats_from_bytes(ngram.computed["holdout"][0.0])

    before = ngram_before = _snapshot(ngram)
    for stats, holdout in ((grams, {0.0: held_grams}), (counts, {0.0: held_grams})):
        with pytest.raises(ValueError) as err:
            _submit(ngram, stats, holdout)
        assert "\n" not in str(err.value)
    assert "n-gram counts" in str(_raises(_submit, ngram, grams, {0.0: held_grams}))
    assert _snapshot(ngram) == before

    before = _snapshot(context)
    for stats, holdout in ((counts, {0.0: held_counts}), (counts, {0.0: held_grams})):
        with pytest.raises(ValueError) as err:
            _submit(context, stats, holdout)
        assert "\n" not in str(err.value)
    assert "Gram statistics" in str(_raises(_submit, context, counts, {0.0: held_counts}))
    assert _snapshot(context) == before

    # Counts over another vocabulary or another number of buckets are refused too.
    wider = counts.with_meta(
        unigram_V=torch.cat([counts.unigram_V, torch.ones(1, dtype=torch.float64)]),
        context_V=torch.cat([counts.context_V, torch.zeros(1, dtype=torch.float64)]),
    )
    assert "token ids" in str(_raises(_submit, ngram, wider, {0.0: held_counts}))
    more = counts.with_meta(
        bigram_H=torch.cat([counts.bigram_H, torch.zeros(64, dtype=torch.float64)]),
        feature_map="ngram:128",
    )
    assert "buckets" in str(_raises(_submit, ngram, more, {0.0: held_counts}))
    assert _snapshot(ngram) == ngram_before

    # The good submission is accepted, then a retry is a duplicate (no-op).
    accepted = _submit(ngram, ngram.computed["stats"], ngram.computed["holdout"], "sub-good")
    assert accepted["status"] == "accepted" and accepted["version"] == "v2"
    after = _snapshot(ngram)
    again = _submit(ngram, ngram.computed["stats"], ngram.computed["holdout"], "sub-other")
    assert again["status"] == "duplicate" and _snapshot(ngram) == after


def _raises(fn, *args):
    with pytest.raises(ValueError) as err:
        fn(*args)
    return err.value


def test_vocab_size_of_an_old_backbone_record(ngram_founded):
    from dume_dist.distributed.artifacts import record_vocab_size

    flow = ngram_founded
    state, _ = flow.coord.registry.load()
    record = state["backbone"]
    want = record["vocab_size"]
    old = {k: v for k, v in record.items() if k != "vocab_size"}
    assert record_vocab_size(old) == want
    older = {**old, "semantic_config": {}}
    with pytest.raises(ValueError):
        record_vocab_size(older)
    assert flow.coord._vocab_size({**state, "backbone": older}) == want


def test_ngram_settings():
    from dume_dist.distributed.artifacts import routing_of
    from dume_dist.distributed.coordinator import check_settings
    from dume_dist.model.routing import resolve_routing

    settings = check_settings({"routing": "ngram", "ngram_buckets": 64})
    assert routing_of(settings) == resolve_routing("ngram", ngram_buckets=64)
    assert settings["feature_map"] == "ngram:64"
    fixed = check_settings({"features": "ngram", "lam": 10.0})
    assert routing_of(fixed).solver == "nb" and routing_of(fixed).holdout_smoothings() == ()
    assert routing_of(settings).top_k == 2 and routing_of(settings).min_weight == 0.05
    pruned = check_settings({"routing": "ngram", "min_weight": 0.2})
    assert routing_of(pruned) == resolve_routing("ngram", min_weight=0.2)
    for bad in ({"routing": "ngram", "ngram_buckets": 0}, {"routing": "ngram", "smoothing": 0.5},
                {"features": "ngram", "solver": "lda"}, {"routing": "ngram", "min_weight": 0.6}):  # fmt: skip
        with pytest.raises(ValueError) as err:
            check_settings(bad)
        assert "\n" not in str(err.value)


def test_a_node_whose_expert_cannot_write_the_sample_is_refused_before_computing(experts, tmp_path):
    """The routing asks each node for text its expert writes; an expert with no BOS or EOS
    token to start from is refused when the job is made (one line, naming it), not after the
    node has counted its data."""
    import json
    import shutil

    flow = Flow(str(tmp_path / "store"), experts, tmp_path,
                settings={**SMALL_NGRAM, "ngram_sample": 0.5})  # fmt: skip
    flow.add("alpha", "beta")
    flow.join("alpha")
    agent = flow.agent("beta")
    agent.authenticate()
    backbone_dir = agent.fetch_backbone()
    expert = tmp_path / "beta-expert"
    shutil.copytree(experts["beta"]["expert"], expert)
    config = json.loads((expert / "config.json").read_text())
    config["bos_token_id"] = config["eos_token_id"] = None
    (expert / "config.json").write_text(json.dumps(config))
    (expert / "generation_config.json").unlink(missing_ok=True)
    spec, fingerprint = agent.check_expert(str(expert))
    opts = {k: JOIN[k] for k in ("max_tokens", "seq_len", "batch_size")}
    with pytest.raises(ValueError, match=r"^expert beta: .*no BOS or EOS token") as info:
        agent.job(backbone_dir, str(expert), fingerprint, [str(experts["beta"]["data"])], opts)
    assert "\n" not in str(info.value)


def test_node_names_one_case_apart_are_refused_and_retired_names_say_so(experts, tmp_path):
    """Blobs live under the node's name: `Alpha` beside `alpha` would share (and, on a
    case-insensitive file system, delete) them. A name that left is never reused, and the
    refusal says so."""
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha")
    before = flow.status()["revision"]
    _, hashed = genesis.issue_node_credential("Alpha", "alpha")
    with pytest.raises(ValueError, match="'Alpha' differs from node 'alpha' only in case"):
        flow.coord.add_node(flow.op, "Alpha", "alpha", hashed)
    assert flow.status()["revision"] == before
    flow.join("alpha")
    flow.coord.leave(flow.creds["alpha"], "alpha", "alpha")
    _, hashed = genesis.issue_node_credential("alpha", "alpha")
    with pytest.raises(ValueError, match="state left.*never reused"):
        flow.coord.add_node(flow.op, "alpha", "alpha", hashed)
