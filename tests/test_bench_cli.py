"""`dume bench ...` from the command line: results written as JSON with its Markdown table
beside it, the table printed; bad expert flags are one-line errors."""

from __future__ import annotations

import json

import pytest
from tiny_world import make_world

from dume_dist.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("bench"), num_docs=4)


def test_bench_inference_writes_json_and_its_table(world, tmp_path, capsys):
    out = tmp_path / "res" / "inference.json"
    expert = str(next(iter(world["experts"].values())))
    argv = ["bench", "inference", "--json", str(out), "--expert", expert, "--num-experts", "2",
            "--batch-size", "1", "--seq-len", "8", "--repeats", "1", "--threads", "1",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    table = out.with_suffix(".md").read_text()
    printed = capsys.readouterr().out
    assert "| path | tokens/s |" in table and table.strip() in printed
    assert f"wrote {out} and {out.with_suffix('.md')}" in printed
    assert result["settings"]["batch_size"] == 1 and result["settings"]["num_experts"] == 2


def test_bench_routing_refuses_experts_without_their_texts(world, tmp_path, capsys):
    name, expert = next(iter(world["experts"].items()))
    argv = ["bench", "routing", "--json", str(tmp_path / "r.json"), "--expert", f"{name}={expert}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--train needs every --expert name" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


def test_poisoning_bench_claimed_volume_buys_nothing_under_equal_priors(tmp_path):
    """The bench on tiny experts: under equal priors (fit only, and with held-out statistics the
    target forges alike) ×10 leaves the target's shares and every keep as honest; every row
    reports what the manifest would estimate and flag."""
    from dume_dist.bench.robustness import poisoning_table, run_poisoning_bench

    w = make_world(tmp_path / "w", num_docs=12)
    names = list(w["experts"])
    text = {n: str(w["data"][n][0]) for n in names}
    result = run_poisoning_bench(
        {n: str(p) for n, p in w["experts"].items()}, text, text, target=names[0],
        kinds=("paper-equal", "context-auto"), seq_len=16, eval_seq_len=16, max_eval_tokens=64,
        batch_size=4,
    )  # fmt: skip
    rows = {(r["kind"], r["attack"]): r for r in result["rows"]}
    assert set(rows) == {(k, a) for k in ("paper-equal", "context-auto")
                         for a in ("honest", "x10", "features x3", "mimic")}  # fmt: skip
    for kind in ("paper-equal", "context-auto"):
        honest, x10 = rows[(kind, "honest")], rows[(kind, "x10")]
        assert x10["target_share"] == pytest.approx(honest["target_share"], abs=1e-12)
        assert x10["keep"] == pytest.approx(honest["keep"], rel=1e-6)
        assert x10["lam"] == honest["lam"]
        assert "flagged" in x10 and len(x10["estimated_by_class"]) == len(names)
    table = poisoning_table(result)
    assert "| context-auto | mimic |" in table and "| flagged |" in table
