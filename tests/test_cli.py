"""The `dume` command as a user runs it: build, eval, Mixtral format, config files, bad input."""

import json

import pytest
import yaml
from tiny_world import make_world
from transformers import AutoModelForCausalLM, AutoTokenizer

from dume_dist.cli.main import main
from dume_dist.model.backbone import Backbone
from dume_dist.model.collect import dense_model_for
from dume_dist.model.data import eval_windows, load_texts
from dume_dist.model.evaluate import evaluate_batches
from dume_dist.model.experts import load_expert_specs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("cli"))


def _flags(world, flag, what):
    out = []
    for name in ("alpha", "beta", "gamma"):
        out += [flag, f"{name}={world[what][name] if what == 'experts' else world[what][name][0]}"]
    return out


def _build_args(world, out, *extra):
    return [
        "build", *_flags(world, "--expert", "experts"), *_flags(world, "--data", "data"),
        "--out", str(out), "--seq-len", "16", "--max-tokens-per-seq", "12", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def built(world):
    """The paper's routing: every baseline of the eval table applies (bias-free included)."""
    out = world["root"] / "model"
    stats = world["root"] / "model-stats"
    assert main(_build_args(world, out, "--routing", "paper", "--save-stats", str(stats))) == 0
    return out


def test_default_build_is_follow_routing_chosen_on_held_out_statistics(world, tmp_path, capsys):
    out = tmp_path / "follow"
    assert main(_build_args(world, out)) == 0
    config = json.loads((out / "config.json").read_text())
    manifest = json.loads((out / "dume_manifest.json").read_text())
    assert config["routing"]["features"] == "ngram" and config["routing"]["solver"] == "nb"
    assert config["routing"]["ngram"]["mu"] == manifest["routing"]["lam"]
    assert config["routing"]["ngram"]["switch_rates"] == [0.0, 1e-4, 1e-3, 1e-2]
    assert config["routing"]["ngram"]["evidence_scale"] == 0.3
    assert manifest["routing"]["ngram_sample"] == 0.5
    assert manifest["routing"]["spec"]["preset"] == "follow"
    assert manifest["routing"]["selection"]["lam"] == manifest["routing"]["lam"]
    printed = capsys.readouterr().out
    assert "held-out tokens" in printed and "warning" not in printed
    assert all(0 < f < 0.01 for f in manifest["routing"]["bucket_fill"])  # of 2^22 buckets
    # a table too small for its text is named, with a bucket count that fits it
    assert main(_build_args(world, tmp_path / "small", "--ngram-buckets", "2")) == 0
    assert "warning: expert alpha fills" in capsys.readouterr().out
    code = main(["build", *_build_args(world, tmp_path / "m", "--lam", "auto",
                                       "--format", "mixtral")[1:]])  # fmt: skip
    assert code == 0  # mixtral defaults to the paper's routing, λ chosen on held-out data
    bad = _build_args(world, tmp_path / "bad", "--routing", "context", "--format", "mixtral")
    assert main(bad) == 2
    assert not (tmp_path / "bad").exists()


def test_build_then_eval_prints_every_baseline(world, built, tmp_path, capsys):
    js, png = tmp_path / "eval.json", tmp_path / "heat.png"
    code = main([
        "eval", "--model", str(built), *_flags(world, "--experts", "experts"),
        *_flags(world, "--data", "data"), "--json", str(js), "--heatmap", str(png),
        "--seq-len", "16", "--stats", str(world["root"] / "model-stats"),
    ])  # fmt: skip
    assert code == 0
    result = json.loads(js.read_text())
    variants = set(result["ppl"])
    expected = {"expert alpha", "expert beta", "expert gamma", "weight average", "oracle",
                "dume k=1", "dume k=2", "dume no-bias (mixtral)", "random routers"}  # fmt: skip
    assert expected <= variants
    # Oracle routing = the averaged backbone with the domain's own expert MLPs, densely.
    specs = load_expert_specs({n: world["experts"][n] for n in ("alpha", "beta", "gamma")})
    backbone = Backbone.average(specs)
    tok = AutoTokenizer.from_pretrained(built)
    for spec in specs:
        dense = dense_model_for(backbone, spec)
        texts = load_texts(world["data"][spec.name], domain=spec.name)
        ev = evaluate_batches(dense, eval_windows(tok, texts, seq_len=16, max_tokens=32768))
        assert result["ppl"]["oracle"][spec.name] == pytest.approx(ev.ppl, rel=1e-5)
        own = result["ppl"][f"expert {spec.name}"][spec.name]
        assert result["retention"]["dume k=1"][spec.name] == pytest.approx(
            own / result["ppl"]["dume k=1"][spec.name]
        )
    acc = result["routing_accuracy"]["dume k=1"]
    assert set(acc) == {"alpha", "beta", "gamma"} and len(acc["alpha"]) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "held-out perplexity" in out and "routing accuracy" in out


def test_build_mixtral_format_loads_without_remote_code(world, tmp_path):
    out = tmp_path / "mixtral"
    assert main(_build_args(world, out, "--format", "mixtral", "--top-k", "2")) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda a, w: a + ["--data", f"delta={w['data']['alpha'][0]}"], "delta"),
        (lambda a, w: a + ["--expert", f"delta={w['root'] / 'nope'}"], "nope"),
        (lambda a, w: [x.replace("gamma.txt", "missing.txt") for x in a], "missing.txt"),
        (lambda a, w: a + ["--backbone", "middle"], "backbone"),
        (lambda a, w: a + ["--top-k", "9"], "top"),
    ],
)
def test_bad_input_one_line_error_nothing_written(world, tmp_path, capsys, mutate, needle):
    out = tmp_path / "out"
    code = main(mutate(_build_args(world, out), world))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]


def test_config_file_fills_flags_and_rejects_unknown_keys(world, tmp_path, capsys):
    cfg = tmp_path / "build.yaml"
    cfg.write_text(yaml.safe_dump({
        "expert": [f"{n}={world['experts'][n]}" for n in ("alpha", "beta")],
        "data": [f"{n}={world['data'][n][0]}" for n in ("alpha", "beta")],
        "seq_len": 16, "max-tokens-per-seq": 12, "lam": 0.05,
    }))  # fmt: skip
    out = tmp_path / "m"
    assert main(["--config", str(cfg), "build", "--out", str(out)]) == 0
    manifest = json.loads((out / "dume_manifest.json").read_text())
    assert manifest["lam"] == 0.05 and manifest["num_experts"] == 2
    cfg.write_text(yaml.safe_dump({"lamda": 0.1}))
    assert (
        main(
            [
                "--config",
                str(cfg),
                "build",
                "--out",
                str(tmp_path / "m2"),
                "--expert",
                "a=b",
                "--data",
                "a=c",
            ]
        )
        == 2
    )
    assert "lamda" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"lam": "big"}))
    assert (
        main(
            [
                "--config",
                str(cfg),
                "build",
                "--out",
                str(tmp_path / "m3"),
                "--expert",
                "a=b",
                "--data",
                "a=c",
            ]
        )
        == 2
    )
    assert "'lam'" in capsys.readouterr().err
