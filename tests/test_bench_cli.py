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
