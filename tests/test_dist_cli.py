"""The distributed CLI without a cluster: config files cover every flag, the readers
(`versions list|show|pull`, `status --store`) on a store built in-process, and one-line errors.
The commands that talk to the coordinator run in `test_dist_ray.py`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml
from dist_helpers import make_experts

from dume_dist.cli.config import apply_config_defaults
from dume_dist.cli.main import main, make_parser
from dume_dist.distributed import genesis
from dume_dist.distributed.agent import NodeAgent
from dume_dist.distributed.coordinator import Coordinator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _subparser(parser: argparse.ArgumentParser, *words: str) -> argparse.ArgumentParser:
    for word in words:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def _flag_keys(sub: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in sub._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize(
    "words,config",
    [(("coordinator", "start"), "coordinator.yaml"), (("node", "join"), "node.yaml")],
)
def test_every_flag_has_a_config_key(words, config):
    keys = set(yaml.safe_load((CONFIGS / config).read_text()))
    flags = _flag_keys(_subparser(make_parser(), *words))
    assert flags - keys == set(), f"flags without a key in configs/{config}"
    assert keys - flags == set(), f"keys of configs/{config} that are no flags"
    # The file parses into the command's arguments.
    parser = make_parser()
    argv = list(words)
    apply_config_defaults(parser, argv, str(CONFIGS / config))
    args = parser.parse_args(argv)
    for key in keys:
        assert hasattr(args, key)
    if config == "node.yaml":
        assert args.data == ["/data/python/train.txt"] and args.workers is None
    else:
        assert args.routing is None and args.lam is None and args.top_k is None
        assert args.max_tokens_per_seq is None  # the experts' limit, at genesis
        assert args.backbone == "average" and args.hold is False


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with two versions (alpha, then alpha + beta), built in-process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("cli")
    experts = make_experts(tmp / "experts", domains=("alpha", "beta"))
    url = str(tmp / "store")
    coord = Coordinator(url, work_dir=str(tmp / "coord"))
    from dume_dist.store import ObjectStore

    _, op = genesis.found(coord, ObjectStore(url), backbone="average",
                          founding={d: str(experts[d]["expert"]) for d in ("alpha", "beta")},
                          settings={"routing": "paper", "max_tokens_per_seq": 16})  # fmt: skip
    for name in ("alpha", "beta"):
        secret, hashed = genesis.issue_node_credential(name, name)
        coord.add_node(op, name, name, hashed)
        NodeAgent(coord, name, name, secret, cache_dir=str(tmp / "cache")).join(
            str(experts[name]["expert"]), [str(experts[name]["data"])], max_tokens=120, seq_len=16
        )
    torch.set_num_threads(before)
    return url


def test_versions_list_show_pull_and_status(store, tmp_path, capsys):
    assert main(["versions", "list", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "v1" in out and "v2" in out and "join beta" in out
    assert main(["versions", "show", "v2", "--store", store]) == 0
    out = capsys.readouterr().out
    assert '"content_digest"' in out and '"parent": "v1"' in out
    assert main(["versions", "pull", "v2", str(tmp_path / "model"), "--store", store]) == 0
    assert (tmp_path / "model" / "dume_manifest.json").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), trust_remote_code=True)
    assert model.config.expert_names == ["alpha", "beta"]
    assert main(["status", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "active" in out and "scrypt" not in out
    assert "routing paper (token/ridge) ridge_lambda=0.01 T=1.0 k=1" in " ".join(out.split())


def test_status_names_the_routings_solver_parameter():
    from dume_dist.distributed.tables import _solver_parameter
    from dume_dist.model.routing import resolve_routing

    for preset, named in (("follow", "mu=auto"), ("context", "lda_shrinkage=auto")):
        routing = resolve_routing(preset).to_json()
        assert _solver_parameter({"lam": "auto", "routing": routing}) == named
    assert _solver_parameter({"lam": 0.01}) == "λ=0.01"  # a registry from before routing options


def test_reader_errors_are_one_line(store, tmp_path, capsys):
    assert main(["versions", "show", "v9", "--store", store]) == 2
    err = capsys.readouterr().err.strip()
    assert "v9" in err and len(err.splitlines()) == 1
    assert main(["versions", "pull", "v1", str(tmp_path), "--store", store]) == 2  # exists
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    bad = ["--store", "s3://dume-nowhere/x", "--storage-option", "endpoint_url=http://127.0.0.1:9"]
    assert main(["versions", "list", *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot connect" in err and len(err.splitlines()) == 1
    assert main(["status", *bad]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_coordinator_start_refuses_an_unreachable_store_before_touching_ray(tmp_path, capsys):
    argv = ["coordinator", "start", "--store", "s3://dume-nowhere/x", "--storage-option",
            "endpoint_url=http://127.0.0.1:9", "--operator-credential-file", str(tmp_path / "op")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot connect" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "op").exists()
    import ray

    assert not ray.is_initialized()


def _containers(obj):
    """Every container spec in a Kubernetes object (walks the whole tree)."""
    if isinstance(obj, dict):
        if "containers" in obj and isinstance(obj["containers"], list):
            yield from obj["containers"]
        for value in obj.values():
            yield from _containers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _containers(value)


def test_deploy_manifests_turn_ray_token_auth_on():
    deploy = CONFIGS.parent / "deploy"
    for path in sorted((deploy / "kuberay").glob("*.yaml")):
        docs = list(yaml.safe_load_all(path.read_text()))
        containers = [c for doc in docs for c in _containers(doc)]
        assert containers or {d["kind"] for d in docs} <= {"Service", "Ingress"}, path
        for c in containers:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE") == "token", (path.name, c["name"])
            assert env.get("RAY_AUTH_TOKEN_PATH"), (path.name, c["name"])
    launcher = yaml.safe_load((deploy / "cluster-launcher.yaml").read_text())
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    for cmd in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        assert "ray stop" == cmd or "RAY_AUTH_MODE=token" in cmd
    assert "RAY_AUTH_MODE=token" in (deploy / "Dockerfile").read_text()


def test_coordinator_start_checks_founding_experts_before_touching_ray(tmp_path, capsys):
    argv = ["coordinator", "start", "--store", str(tmp_path / "store"), "--founding-expert",
            f"a={tmp_path / 'missing'}", "--operator-credential-file", str(tmp_path / "op")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "missing" in err and len(err.splitlines()) == 1
    import ray

    assert not ray.is_initialized() and not (tmp_path / "op").exists()


def test_clusters_dume_starts_get_token_auth_unless_the_environment_decides(monkeypatch):
    import os
    import subprocess
    import sys

    from dume_dist.distributed.auth import token_auth_for_a_new_cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert token_auth_for_a_new_cluster() is False
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert token_auth_for_a_new_cluster() is True
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    code = (
        "import os; from dume_dist.distributed.auth import token_auth_for_a_new_cluster as f; on = f(); "
        "print(on, os.environ['RAY_AUTH_MODE'], len(os.environ['RAY_AUTH_TOKEN']))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "token", "64"], out.stderr


def test_coordinator_start_takes_ngram_routing():
    from dume_dist.cli.coordinator import settings_from_args as _settings

    argv = ["coordinator", "start", "--store", "/nowhere", "--routing", "ngram",
            "--ngram-buckets", "64"]  # fmt: skip
    settings = _settings(make_parser().parse_args(argv))
    assert settings["routing"] == "ngram" and settings["ngram_buckets"] == 64
    argv = ["coordinator", "start", "--store", "/nowhere", "--features", "ngram", "--solver", "nb"]
    assert _settings(make_parser().parse_args(argv))["features"] == "ngram"


def test_deploy_exposes_only_the_api_with_tls():
    """Federated contributors reach the coordinator's HTTP API through an Ingress with TLS, and
    nothing else of the cluster (no Ray port)."""
    kuberay = CONFIGS.parent / "deploy" / "kuberay"
    docs = {d["kind"]: d for d in yaml.safe_load_all((kuberay / "api-ingress.yaml").read_text())}
    ingress, service = docs["Ingress"], docs["Service"]
    assert ingress["spec"]["tls"][0]["secretName"]
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert [p["path"] for p in paths] == ["/v1/"]
    assert {p["backend"]["service"]["port"]["number"] for p in paths} == {8000}
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]
    assert service["spec"]["selector"]["ray.io/node-type"] == "head"
    job = yaml.safe_load((kuberay / "rayjob-coordinator.yaml").read_text())
    assert "--api-port 8000" in job["spec"]["entrypoint"]
    head = yaml.safe_load((kuberay / "raycluster.yaml").read_text())["spec"]["headGroupSpec"]
    ports = {p["containerPort"] for c in _containers(head) for p in c.get("ports", [])}
    assert 8000 in ports
