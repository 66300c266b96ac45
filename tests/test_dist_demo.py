"""`dume demo` end to end (its own local multi-node Ray cluster) on tiny random experts: v1 from
the founding nodes, v2 when one more joins, v3 after unlearning one; the cluster is cleaned up.
Two founders here (the README's `dume demo` runs four): every step of the story, each node's own
Ray worker node, at the fewest processes."""

from __future__ import annotations

import os

import pytest
from dist_helpers import make_experts

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_demo_story(tmp_path, capsys):
    import ray

    from dume_dist.distributed.demo import run_demo

    domains = ["alpha", "gamma", "omega"]
    experts = make_experts(tmp_path, domains=domains)
    inputs = {
        "founding": domains[:2],
        "joining": "omega",
        "experts": {d: str(experts[d]["expert"]) for d in domains},
        "train": {d: str(experts[d]["data"]) for d in domains},
        "valid": {d: str(experts[d]["valid"]) for d in domains},
    }
    tmpdir_before = os.environ.get("RAY_TMPDIR")
    result = run_demo(inputs=inputs, settings={"max_tokens_per_seq": 16}, max_tokens=200,
                      eval_tokens=64, seq_len=16, unlearn="gamma", show_progress=False)  # fmt: skip
    versions = {m["version"]: m for m in result["versions"]}
    assert list(versions) == ["v1", "v2", "v3"]
    names = {v: [c["name"] for c in m["contributors"]] for v, m in versions.items()}
    assert names == {"v1": ["alpha", "gamma"], "v2": ["alpha", "gamma", "omega"], "v3": ["alpha", "omega"]}  # fmt: skip
    assert versions["v1"]["marks"]["contains_unlearned"] == ["gamma"]
    assert versions["v2"]["marks"]["contains_unlearned"] == ["gamma"]
    assert "contains_unlearned" not in versions["v3"]["marks"]
    assert set(result["ppl"]) == {"v1", "v2", "v3", "own dense expert"}
    assert set(result["ppl"]["v3"]) == set(domains)
    out = capsys.readouterr().out
    assert "held-out perplexity" in out and "unlearn gamma" in out
    assert not ray.is_initialized() and os.environ.get("RAY_TMPDIR") == tmpdir_before


def test_federated_demo_story(tmp_path, capsys):
    """`dume demo --federated` on tiny experts: the operator's cluster here, each contributor in
    its own process on its own Ray instance (own GCS, own token), HTTPS on 127.0.0.1 only."""
    import ray

    from dume_dist.distributed.federated_demo import run_federated_demo

    domains = ["alpha", "beta", "gamma"]
    experts = make_experts(tmp_path, domains=domains)
    inputs = {
        "founding": domains[:2],
        "joining": "gamma",
        "experts": {d: str(experts[d]["expert"]) for d in domains},
        "train": {d: str(experts[d]["data"]) for d in domains},
        "valid": {d: str(experts[d]["valid"]) for d in domains},
    }
    result = run_federated_demo(inputs=inputs, settings={"max_tokens_per_seq": 16},
                                max_tokens=200, eval_tokens=64, seq_len=16, unlearn="beta")  # fmt: skip
    names = {m["version"]: [c["name"] for c in m["contributors"]] for m in result["versions"]}
    assert names == {"v1": ["alpha", "beta"], "v2": ["alpha", "beta", "gamma"], "v3": ["alpha", "gamma"]}  # fmt: skip
    assert result["api_url"].startswith("https://127.0.0.1:")
    for d in domains:
        sent = result["sent"][d]
        assert sent["expert"] > 0 and sent["stats"] > 0 and sent["requests"] > 0
        assert sent["backbone received"] > 0
    out = capsys.readouterr().out
    assert result["api_url"] in out and "what each node sent to the coordinator" in out
    assert "own Ray cluster" in out and "held-out perplexity" in out
    assert not ray.is_initialized()
