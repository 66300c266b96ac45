"""A new router kind in files of its own (``toy_kind.py``, ``toy_kind_remote.py``) runs end to end
through the package's unchanged build, collection, writer, eval, workers, agent and coordinator:
``build_dume``, save, load with ``trust_remote_code`` (in a fresh process), a distributed submit
through the coordinator, and unlearning equal to a build without the node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import toy_kind  # noqa: F401  (registers the kind)
from dist_helpers import Flow, make_experts
from toy_kind_remote import bucket_of
from transformers import AutoModelForCausalLM

from dume_dist.distributed.coordinator import routers_of
from dume_dist.model.build import build_dume
from dume_dist.model.evaluate import randomise_routers
from dume_dist.model.kinds import load_stats

ROUTING = {"kind": "hashvote", "hash_buckets": 64, "prior": 0.5}
BUILD = {"max_tokens_per_seq": 16, "seq_len": 16, "max_tokens": 240, "batch_size": 4}
TESTS = Path(__file__).parent
LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
print(type(model).__module__)
"""


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_experts(tmp_path_factory.mktemp("toy"), domains=("alpha", "beta", "gamma"))
    torch.set_num_threads(before)


def _build(experts, out, names, **kw):
    return build_dume(
        {n: str(experts[n]["expert"]) for n in names},
        {n: [str(experts[n]["data"])] for n in names},
        out, backbone=f"base:{experts['base']}", routing=ROUTING, progress=False, **BUILD, **kw,
    )  # fmt: skip


def test_toy_kind_builds_saves_and_loads_with_remote_code(experts, tmp_path):
    names = ("alpha", "beta", "gamma")
    result = _build(experts, tmp_path / "toy", names, save_stats=tmp_path / "toy-stats")
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert config["routing"] == {"kind": "hashvote", "module": "toy_kind_remote", "buckets": 64}
    manifest = json.loads((tmp_path / "toy" / "dume_manifest.json").read_text())
    assert manifest["routing"]["kind"] == "hashvote" and manifest["feature_map"] == "hashvote"
    # Its statistics: additive counts, kept (outside the model) and read back by the kind's schema.
    stored = load_stats(tmp_path / "toy-stats" / "alpha" / "fit.safetensors")
    assert torch.equal(stored.counts_B, result.stats["alpha"].counts_B)
    assert stored.num_tokens == result.num_tokens["alpha"] > 0

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "toy", trust_remote_code=True).eval()
    ids = torch.randint(4, model.config.vocab_size, (2, 12))
    model.set_record_routing(True)
    with torch.no_grad():
        logits = model(ids).logits
    # Every token goes to the expert whose table is largest at the hash of its id.
    table = model.hash_router.log_probs
    want = table[:, bucket_of(ids, 64)].argmax(dim=0)
    for block in model.moe_blocks():
        assert torch.equal(block.last_topk_index[..., 0], want)
    torch.testing.assert_close(table.double(), result.routers, rtol=1e-6, atol=1e-6)

    # A fresh process loads it with trust_remote_code (the toy's inference module by its name).
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path / "toy"), str(tmp_path / "ids.pt"),
         str(tmp_path / "logits.pt")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "transformers_modules" in out.stdout
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits, rtol=0, atol=0)

    # Evaluation's random-routing baseline re-draws the toy's router through its own method.
    before = table.clone()
    randomise_routers(model, seed=1)
    assert not torch.equal(model.hash_router.log_probs, before)


def test_toy_kind_through_the_coordinator_and_unlearning(experts, tmp_path):
    flow = Flow(str(tmp_path / "store"), experts, tmp_path,
                settings={"routing": ROUTING, "max_tokens_per_seq": 16})  # fmt: skip
    assert flow.status()["registry"]["settings"]["feature_map"] == "hashvote:64"
    flow.add("alpha", "beta", "gamma")
    assert [flow.join(n)["version"] for n in ("alpha", "beta", "gamma")] == ["v1", "v2", "v3"]
    assert flow.versions().get_manifest("v3")["routing"]["kind"] == "hashvote"
    # Statistics of another kind are refused with a one-line error, and change nothing.
    paper = build_dume(
        {"alpha": str(experts["alpha"]["expert"])}, {"alpha": [str(experts["alpha"]["data"])]},
        tmp_path / "paper", backbone=f"base:{experts['base']}", routing="paper",
        progress=False, **BUILD,
    )  # fmt: skip
    gram = paper.stats["alpha"]
    before = flow.status()["revision"]
    with pytest.raises(ValueError, match="hashed token counts") as err:
        flow.coord.submit_stats(flow.creds["gamma"], "gamma", "gamma", gram, "other",
                                gram.num_tokens)  # fmt: skip
    assert "\n" not in str(err.value) and flow.status()["revision"] == before

    flow.coord.unlearn(flow.op, "beta", "asked to be forgotten")
    _build(experts, tmp_path / "without", ("alpha", "gamma"))
    got, want = flow.routers("v4"), routers_of(tmp_path / "without")
    assert got.keys() == want.keys() == {"hash_router.log_probs"}
    assert torch.equal(got["hash_router.log_probs"], want["hash_router.log_probs"])


# Benchmarks that measure what one kind's statistics leak or withstand (issue #13): they study
# those statistics themselves, so they name the kind; everything else goes through the interface.
KIND_STUDIES = {"bench/leakage.py", "bench/robustness.py", "cli/bench.py"}
CALL_SITES = {
    "model/build.py", "model/collect.py", "model/writer.py", "model/formats/dume.py",
    "model/evaluate.py", "distributed/workers.py", "distributed/agent.py",
    "distributed/coordinator.py", "distributed/validation.py", "distributed/publishing.py",
    "cli/build.py", "cli/coordinator.py", "cli/node.py",
}  # fmt: skip


def test_kind_names_appear_in_at_most_four_package_files():
    """Outside docstrings, the built-in kinds' names (and the n-gram kind's older solver name)
    are string constants of at most four package files — the options, the inference code, the
    n-gram kind's own module (its config key) and the routing benchmark's preset labels — and of
    no module that calls the interface."""
    import ast

    import dume_dist

    names, root = {"linear", "ngram", "nb"}, Path(dume_dist.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }  # fmt: skip
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and node.value in names
                and id(node) not in docstrings
            ):
                found.add(path.relative_to(root).as_posix())
    assert not found & CALL_SITES, sorted(found & CALL_SITES)
    assert len(found - KIND_STUDIES) <= 4, sorted(found - KIND_STUDIES)


def test_routing_settings_of_earlier_versions_read_as_before():
    """A registry founded before router kinds stored every field of the older spec (``lam`` for
    whichever solver, the n-gram fields on every routing): it reads as the same routing."""
    from dume_dist.model.routing import PRESETS, resolve_routing

    grid = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 1.0]
    common = {"smoothing": 0.0, "smoothing_grid": grid, "lam_grid": None, "ngram_alpha": 0.1,
              "ngram_buckets": 262144}  # fmt: skip
    older = {
        "paper": {"features": "token", "solver": "ridge", "lam": 0.01, "top_k": 1,
                  "holdout_fraction": 0.0, "min_weight": 0.0},
        "context": {"features": "prefix_mean", "solver": "lda", "lam": "auto", "top_k": 1,
                    "holdout_fraction": 0.1, "min_weight": 0.0},
        "ngram": {"features": "ngram", "solver": "nb", "lam": "auto", "top_k": 2,
                  "holdout_fraction": 0.1, "min_weight": 0.05},
    }  # fmt: skip
    # what each preset was then: `context` solved with the token counts as priors, `ngram` on
    # 2^18 buckets (kept: the registry's statistics were counted so)
    then = {**PRESETS, "context": PRESETS["context"].replace(priors="tokens"),
            "ngram": PRESETS["ngram"].replace(ngram_buckets=262144)}  # fmt: skip
    for name, fields in older.items():
        spec = resolve_routing({**common, **fields, "preset": name})
        assert spec == then[name] and resolve_routing(spec.to_json()) == spec
        assert (spec.lam, spec.features, spec.solver) == (fields["lam"], fields["features"],
                                                          fields["solver"])  # fmt: skip
    assert resolve_routing({**common, **older["context"], "lam": 0.3}).lda_shrinkage == 0.3
    assert resolve_routing({**common, **older["ngram"], "lam": 10.0}).mu == 10.0
