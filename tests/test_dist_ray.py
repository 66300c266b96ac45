"""The distributed layer on a real local Ray cluster: a head and two worker nodes on this
machine (`ray.cluster_utils.Cluster`), a detached coordinator actor, node agents pinned to
different nodes, gloo worker groups, a real S3 API server (moto) and file:// stores.

One cluster for the whole module (~5-10 s to start); every test uses its own coordinator name
and store, so they do not see each other.
"""

from __future__ import annotations

import uuid

import pytest
import torch
from dist_helpers import local_ray_cluster, make_experts
from s3server import S3Server

from dume_dist.distributed import cluster, genesis
from dume_dist.distributed.coordinator import Coordinator, routers_of
from dume_dist.model.kinds import stats_from_bytes
from dume_dist.store import CURRENT, BlobStore, ObjectStore, VersionStore

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_thread")]  # tests/conftest.py
ray = pytest.importorskip("ray")

SETTINGS = {"routing": "paper", "max_tokens_per_seq": 16}
JOIN = {"max_tokens": 240, "seq_len": 16, "batch_size": 4, "threads": 1}


@pytest.fixture(scope="module")
def ray_cluster():
    resources = [{f"dume_node_{i}": 1} for i in range(2)]
    with local_ray_cluster(node_resources=resources) as (c, nodes):
        yield {"cluster": c, "node_ids": [n.node_id for n in nodes]}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return make_experts(tmp_path_factory.mktemp("experts"))


@pytest.fixture(scope="module")
def s3():
    # A bucket of our own: moto's in-process backend outlives the server, and other modules
    # create the default bucket.
    with S3Server(bucket=f"dume-dist-{uuid.uuid4().hex[:8]}") as server:
        yield server


class RayFlow:
    """A detached coordinator actor on a store, plus node agents pinned to cluster nodes."""

    def __init__(self, url, options, experts, tmp, node_ids, settings=None):
        self.url, self.options, self.experts, self.tmp, self.node_ids = (
            url,
            options,
            experts,
            tmp,
            node_ids,
        )
        self.name = f"coord-{uuid.uuid4().hex[:8]}"
        self.store = ObjectStore(url, options)
        self.coord = cluster.start_coordinator(url, options, name=self.name, namespace="dume-test")
        _, self.op = genesis.found(self.coord, self.store, backbone=f"base:{experts['base']}",
                                   founding={}, settings=settings or SETTINGS)  # fmt: skip
        self.creds = {}

    def call(self, method, *args):
        return cluster.get(getattr(self.coord, method).remote(*args))

    def add(self, *names):
        for name in names:
            secret, hashed = genesis.issue_node_credential(name, name)
            self.call("add_node", self.op, name, name, hashed)
            self.creds[name] = secret

    def agent(self, name, node):
        return cluster.launch_agent(self.coord, name, name, self.creds[name], node_id=self.node_ids[node],
                                    cache_dir=str(self.tmp / f"cache-{node}"))  # fmt: skip

    def join(self, name, node, agent=None, **kw):
        agent = agent or self.agent(name, node)
        kwargs = {"expert_dir": str(self.experts[name]["expert"]), "data": [str(self.experts[name]["data"])],
                  **JOIN, **kw}  # fmt: skip
        try:
            return cluster.run_join(agent, kwargs, show_progress=False), agent
        finally:
            ray.kill(agent)

    def routers(self, vid):
        dest = self.tmp / f"pull-{self.name}-{vid}"
        VersionStore(self.store, CURRENT.versions).pull(vid, str(dest))
        return routers_of(dest), dest

    def stop(self):
        cluster.stop_coordinator(self.name, "dume-test")


def _in_process_build(experts, tmp, names):
    """The reference: the same contributions through an in-process coordinator on a new store."""
    from dume_dist.distributed.agent import NodeAgent

    url = str(tmp / f"ref-{uuid.uuid4().hex[:6]}")
    coord = Coordinator(url, work_dir=str(tmp / "ref-coord"))
    _, op = genesis.found(coord, ObjectStore(url), backbone=f"base:{experts['base']}", founding={},
                          settings=SETTINGS)  # fmt: skip
    for name in names:
        secret, hashed = genesis.issue_node_credential(name, name)
        coord.add_node(op, name, name, hashed)
        NodeAgent(coord, name, name, secret, cache_dir=str(tmp / "ref-cache")).join(
            str(experts[name]["expert"]), [str(experts[name]["data"])], **JOIN
        )
    vid = VersionStore(ObjectStore(url), CURRENT.versions).latest()
    VersionStore(ObjectStore(url), CURRENT.versions).pull(
        vid, str(tmp / f"{url.rsplit('/', 1)[-1]}-model")
    )
    return routers_of(tmp / f"{url.rsplit('/', 1)[-1]}-model")


def assert_same_routers(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("routing", ["linear", "ngram"])
def test_two_gloo_workers_equal_one_worker(ray_cluster, experts, tmp_path, routing):
    """Fit and held-out statistics of two gloo ranks equal one worker's: ``linear``, the paper's
    token features with λ chosen on held-out Grams, Grams summed in fp64 (features are made per
    sequence before any reduction, so `context`'s prefix means take the same path); ``ngram``,
    counts summed exactly (the text the expert writes included: its batches shared between the
    ranks) and the held-out bigrams gathered and merged into the same held-out curve, bit for
    bit."""
    settings = {**SETTINGS, "routing": "ngram" if routing == "ngram" else "paper"}
    if routing == "ngram":  # with text the expert writes: its batches round-robin too
        settings.update(ngram_buckets=64, ngram_sample=0.5)
    else:
        settings.update(lam="auto", holdout_fraction=0.1)
    flow = RayFlow(
        str(tmp_path / "store"), {}, experts, tmp_path, ray_cluster["node_ids"], settings
    )
    try:
        flow.add("alpha")
        agent = flow.agent("alpha", 1)
        cluster.get(agent.authenticate.remote())
        backbone_dir = cluster.get(agent.fetch_backbone.remote())
        expert = str(experts["alpha"]["expert"])
        _, fingerprint = cluster.get(agent.check_expert.remote(expert))
        job = cluster.get(agent.job.remote(backbone_dir, expert, fingerprint, [str(experts["alpha"]["data"])],
                                           {"max_tokens": None, "seq_len": 16, "batch_size": 2}))  # fmt: skip
        one = cluster.get(agent.compute.remote(job, 1, 1))
        two = cluster.get(agent.compute.remote(job, 2, 1))
        upload = cluster.get(agent.check_expert.remote(expert))
        cluster.get(agent.upload_expert.remote(*upload))
        submitted = cluster.get(agent.submit.remote(job, two))  # through Ray object refs
        ray.kill(agent)
        assert submitted["status"] == "accepted" and submitted["version"] == "v1"
        (entry,) = flow.call("status")["registry"]["nodes"]["alpha"]["stats"]
        assert len(entry.get("holdout", [])) == 1
        assert set(one["holdout"]) == set(two["holdout"]) == {0.0}
        pairs = [(one["stats"], two["stats"])]
        pairs += [(one["holdout"][b], two["holdout"][b]) for b in one["holdout"]]
        maps = {"linear": ["token"] * 2,
                "ngram": ["ngram:64", "ngram:64+curve"]}[routing]  # fmt: skip
        for (a_bytes, b_bytes), feature_map in zip(pairs, maps, strict=True):
            a, b = stats_from_bytes(a_bytes), stats_from_bytes(b_bytes)
            assert a.feature_map == b.feature_map == feature_map
            assert a.num_tokens == b.num_tokens > 0
            if routing == "ngram":
                sampled = a.extra.get("sampled_tokens")
                assert sampled == b.extra.get("sampled_tokens")
                assert (sampled > 0) if feature_map == "ngram:64" else sampled is None
                for name in ("unigram_V", "context_V", "bigram_H"):
                    assert torch.equal(getattr(a, name), getattr(b, name)), name
                assert a.pairs_K3 is None and b.pairs_K3 is None  # no exact bigrams by default
                if a.curve_M is not None:  # the held-out curve: the same bits from two workers
                    assert torch.equal(a.curve_M, b.curve_M) and (a.curve_M < 0).all()
                continue
            scale = a.gram_LPP.abs().max()
            torch.testing.assert_close(
                b.gram_LPP, a.gram_LPP, rtol=1e-13, atol=1e-13 * float(scale)
            )
            assert not torch.equal(a.gram_LPP, torch.zeros_like(a.gram_LPP))
        fit_tokens = stats_from_bytes(one["stats"]).num_tokens
        assert fit_tokens > 100  # some docs held out
    finally:
        flow.stop()


def test_found_join_restart_unlearn_on_the_cluster(ray_cluster, experts, tmp_path, s3):
    """Agents pinned to different nodes join; the coordinator is killed between two submissions
    and comes back with the same registry; the next version and the version after unlearning are
    bit-identical to builds that never saw the restart / the unlearned node. On S3 (moto) only:
    found / join / unlearn on a cluster with a file:// store is `dume demo`'s story
    (tests/test_dist_demo.py), and a restarted coordinator on a file:// store is
    tests/test_dist_coordinator.py's (in process)."""
    url, options = s3.url(), s3.storage_options
    node_ids = ray_cluster["node_ids"]
    flow = RayFlow(url, options, experts, tmp_path, node_ids)
    try:
        flow.add("alpha", "beta", "gamma")
        for i, name in enumerate(("alpha", "beta", "gamma")):
            agent = flow.agent(name, i % 2)
            assert cluster.get(agent.node_id.remote()) == node_ids[i % 2]
            result, _ = flow.join(name, i % 2, agent=agent)
            assert result["worker_nodes"] == [node_ids[i % 2]]  # its workers too
            assert result["status"] == "accepted" and result["version"] == f"v{i + 1}"
            if name == "beta":
                before = flow.call("status")
                ray.kill(flow.coord, no_restart=False)  # Ray restarts it (max_restarts=-1)
                assert cluster.wait_for(lambda: _alive(flow), timeout_s=60)
                assert flow.call("status") == before
        everyone = ["alpha", "beta", "gamma"]
        assert_same_routers(flow.routers("v3")[0], _in_process_build(experts, tmp_path, everyone))

        unlearned = flow.call("unlearn", flow.op, "beta", "test")
        assert unlearned["version"] == "v4" and unlearned["affected_versions"] == ["v2", "v3"]
        assert not BlobStore(flow.store, CURRENT.blobs).list_blobs("stats", "beta")
        assert not BlobStore(flow.store, CURRENT.blobs).list_blobs("expert", "beta")
        versions = VersionStore(flow.store, CURRENT.versions)
        assert versions.get_manifest("v3")["marks"]["contains_unlearned"] == ["beta"]
        routers, model_dir = flow.routers("v4")
        assert_same_routers(routers, _in_process_build(experts, tmp_path, ["alpha", "gamma"]))

        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True)
        assert model.config.expert_names == ["alpha", "gamma"]
    finally:
        flow.stop()


def _alive(flow) -> bool:
    try:
        return flow.call("ping") == "ok"
    except Exception:
        return False


@pytest.mark.parametrize("crash_after", ["compute", "submit"])
def test_agent_killed_midway_reruns_without_double_counting(
    ray_cluster, experts, tmp_path, crash_after
):
    flow = RayFlow(str(tmp_path / "store"), {}, experts, tmp_path, ray_cluster["node_ids"])
    try:
        flow.add("alpha")
        with pytest.raises(RuntimeError, match="actor died"):
            flow.join("alpha", 0, crash_after=crash_after)
        result, _ = flow.join("alpha", 0)
        assert result["status"] == ("duplicate" if crash_after == "submit" else "accepted")
        registry = flow.call("status")["registry"]
        assert len(registry["nodes"]["alpha"]["stats"]) == 1
        assert 0 < registry["nodes"]["alpha"]["stats"][0]["num_tokens"] <= JOIN["max_tokens"]
        assert [v["version"] for v in registry["versions"]] == ["v1"]
    finally:
        flow.stop()


def test_cli_flow_on_the_cluster(ray_cluster, experts, tmp_path, capsys):
    from dume_dist.cli.main import main

    ray_flags = ["--namespace", "dume-test", "--coordinator-name", f"cli-{uuid.uuid4().hex[:6]}"]
    op = ["--operator-credential-file", str(tmp_path / "operator.cred"), *ray_flags]
    start = ["coordinator", "start", "--store", str(tmp_path / "store"), "--backbone",
             f"base:{experts['base']}", "--max-tokens-per-seq", "16", "--hold", *op]  # fmt: skip
    assert main(start) == 0
    assert (tmp_path / "operator.cred").stat().st_mode & 0o777 == 0o600
    for name in ("alpha", "beta"):
        argv = [
            "admin",
            "add-node",
            "--name",
            name,
            "--domain",
            name,
            "--credential-out",
            str(tmp_path / name),
            *op,
        ]
        assert main(argv) == 0
    capsys.readouterr()

    def join(name, node, cred=None):
        return main(["node", "join", "--name", name, "--domain", name, "--expert", str(experts[name]["expert"]),
                     "--data", str(experts[name]["data"]), "--credential-file", cred or str(tmp_path / name),
                     "--max-tokens", "240", "--seq-len", "16", "--node-id", ray_cluster["node_ids"][node],
                     "--no-progress", *ray_flags])  # fmt: skip

    # the default routing (ngram, mu chosen on the nodes' held-out curves) needs no consent flag
    assert join("alpha", 0) == 0 and join("beta", 1) == 0
    out = capsys.readouterr().out
    assert out.count("statistics accepted") == 2 and "(held)" in out
    assert main(["coordinator", "publish", *op]) == 0
    assert "latest version: v1" in capsys.readouterr().out
    assert main(["coordinator", "hold", "--release", *op]) == 0
    assert main(["unlearn", "--node", "beta", "--reason", "test", *op]) == 0
    out = capsys.readouterr().out
    assert "latest version v2" in out and "v1" in out

    (tmp_path / "wrong").write_text("not-the-credential\n")
    (tmp_path / "wrong").chmod(0o600)  # a readable-by-others file is refused before it is read
    assert join("alpha", 0, cred=str(tmp_path / "wrong")) == 2
    err = capsys.readouterr().err.strip()
    assert "credential rejected" in err and len(err.splitlines()) == 1
    assert main(["unlearn", "--node", "nobody", "--reason", "x", *op]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown node 'nobody'" in err and len(err.splitlines()) == 1

    assert main(["status", *ray_flags]) == 0
    out = capsys.readouterr().out
    assert "unlearned" in out and "alpha" in out
    assert main(["node", "leave", "--name", "alpha", "--domain", "alpha", "--credential-file",
                 str(tmp_path / "alpha"), *ray_flags]) == 0  # fmt: skip
    assert main(["coordinator", "stop", *ray_flags]) == 0
    assert "coordinator stopped" in capsys.readouterr().out
