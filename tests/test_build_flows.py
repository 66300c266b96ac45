"""`dume build`'s remaining single-machine flows and `dume bench`'s inputs: Mixtral options it
cannot hold, --config values, --shard-size / --device / --backbone refusals, sharded experts whose
index points outside them, --save-stats reuse and tampering, bench output paths. Each refusal is
one line, before any work, and leaves nothing behind."""

import json
import shutil

import pytest
from cli_helpers import NAMES, build_args, one_line_error
from tiny_world import DOMAINS, make_world

from dume_dist.cli.main import main, make_parser
from dume_dist.model.build import build_dume
from dume_dist.model.experts import load_expert_spec


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("flows"), domains={n: DOMAINS[n] for n in NAMES})


def _no_work(monkeypatch):
    """Any statistics or build started fails the test."""

    def boom(*a, **k):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr("dume_dist.model.build.build_dume", boom)


def test_mixtral_refuses_min_weight_it_cannot_hold(world, tmp_path, capsys, monkeypatch):
    """Mixtral always runs its k experts: a min_weight was dropped without a word."""
    monkeypatch.setattr("dume_dist.model.build.expert_statistics", lambda *a, **k: 1 / 0)
    out = tmp_path / "out"
    code = main(
        build_args(world, out, "--format", "mixtral", "--top-k", "2", "--min-weight", "0.3")
    )
    one_line_error(capsys, code, "min_weight=0.3 with k=2")
    assert not out.exists()


@pytest.mark.parametrize(
    "line, needle",
    [
        ("temperature: inf", "expected a finite number > 0"),  # was an ArgumentTypeError traceback
        ("top_k: nan", "expected an integer"),
        ("shard_size: 10XB", "expected a size such as 2GB"),
        ("backbone: [average]", "takes a single value"),
        ("backbone: true", "takes text"),  # was an AttributeError traceback
    ],
)
def test_config_values_of_the_wrong_kind_are_one_line_errors(
    world, tmp_path, capsys, monkeypatch, line, needle
):
    _no_work(monkeypatch)
    config = tmp_path / "c.yaml"
    config.write_text(line + "\n")
    code = main(["--config", str(config), *build_args(world, tmp_path / "out")])
    one_line_error(capsys, code, needle)


def test_config_list_of_experts_is_a_text_list(world, tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    config = tmp_path / "c.yaml"
    config.write_text(f"expert: [{{alpha: {world['experts']['alpha']}}}]\n")  # a mapping, not text
    args = ["build", "--out", str(tmp_path / "out"), "--data", "alpha=x"]
    one_line_error(capsys, main(["--config", str(config), *args]), "config key 'expert' takes text")


def test_command_line_list_replaces_the_config_files(tmp_path):
    """A repeatable flag on the command line wins over the file: argparse appended to it."""
    config = tmp_path / "c.yaml"
    config.write_text("expert: [a=/x, b=/y]\ndata: [a=/p]\n")
    argv = ["--config", str(config), "build", "--out", "o", "--expert", "c=/z"]
    parser = make_parser()
    from dume_dist.cli.config import apply_config_defaults

    apply_config_defaults(parser, argv, str(config))
    args = parser.parse_args(argv)
    assert args.expert == ["c=/z"]
    assert args.data == ["a=/p"]  # not given on the command line: the file's


def test_shard_size_garbage_names_its_reason(world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(build_args(world, tmp_path / "out", "--shard-size", "10XB"))
    err = capsys.readouterr().err  # was "invalid _size value: '10XB'"
    assert "argument --shard-size: expected a size such as 2GB or 500MB, got '10XB'" in err


@pytest.mark.parametrize("device", ["foo", "5"])
def test_unknown_device_is_one_line_error_before_work(world, tmp_path, capsys, monkeypatch, device):
    _no_work(monkeypatch)  # was a RuntimeError traceback from torch
    code = main(build_args(world, tmp_path / "out", "--device", device))
    one_line_error(capsys, code, "is not a device")


@pytest.mark.parametrize("backbone", ["base:", "avg", "base:/nonexistent-dume-base"])
def test_backbone_is_checked_before_work(world, tmp_path, capsys, monkeypatch, backbone):
    _no_work(monkeypatch)
    code = main(build_args(world, tmp_path / "out", "--backbone", backbone))
    one_line_error(capsys, code, "--backbone")


def _sharded_expert(world, tmp_path):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(world["experts"]["alpha"])
    model.save_pretrained(d, max_shard_size="20KB")
    for f in world["experts"]["alpha"].glob("tokenizer*"):
        shutil.copy(f, d / f.name)
    return d


@pytest.mark.parametrize("where", ["../outside.safetensors", "ABS"])
def test_index_naming_a_shard_outside_the_expert_is_refused(world, tmp_path, where):
    expert = _sharded_expert(world, tmp_path)
    assert load_expert_spec("alpha", expert).index  # the sharded expert as saved reads
    index_path = expert / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    outside = tmp_path / "outside.safetensors"
    shutil.move(expert / shard, outside)  # the same tensors, but outside the expert
    target = str(outside) if where == "ABS" else where
    index["weight_map"] = {k: target if v == shard else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is not a file of"):  # was read
        load_expert_spec("alpha", expert)


def _build(world, out, stats, **kw):
    experts = {n: world["experts"][n] for n in NAMES}
    data = {n: world["data"][n] for n in NAMES}
    return build_dume(experts, data, out, routing="paper", seq_len=16, max_tokens_per_seq=12,
                      save_stats=stats, progress=False, **kw)  # fmt: skip


def test_saved_statistics_follow_stats_dtype_and_refuse_tampering(world, tmp_path):
    import torch

    stats = tmp_path / "stats"
    assert _build(world, tmp_path / "m1", stats).reused_stats == []
    assert _build(world, tmp_path / "m2", stats, dtype=torch.float16).reused_stats == list(NAMES)
    # the experts ran in bf16: other statistics (were reused from the fp32 run)
    assert _build(world, tmp_path / "m3", stats, stats_dtype=torch.bfloat16).reused_stats == []
    assert _build(world, tmp_path / "m4", stats, stats_dtype=torch.bfloat16).reused_stats == list(
        NAMES
    )
    fit = stats / "alpha" / "fit.safetensors"
    data = bytearray(fit.read_bytes())
    data[-3] ^= 1  # one bit of one statistic: still a valid file
    fit.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):  # was trusted
        _build(world, tmp_path / "m5", stats, stats_dtype=torch.bfloat16)
    assert not (tmp_path / "m5").exists()


@pytest.mark.parametrize("json_name, needle", [("dir", "is a directory"), ("r.md", "overwrite")])
def test_bench_json_is_checked_before_work(tmp_path, capsys, monkeypatch, json_name, needle):
    monkeypatch.setattr("dume_dist.bench.inference.run_inference_bench", lambda **k: 1 / 0)
    (tmp_path / "dir").mkdir()
    code = main(["bench", "inference", "--json", str(tmp_path / json_name)])
    one_line_error(capsys, code, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_bench_scale_refuses_a_used_work_dir_before_making_experts(tmp_path, monkeypatch):
    from dume_dist.bench import scale

    monkeypatch.setattr(scale, "make_random_experts", lambda *a, **k: 1 / 0)
    (tmp_path / "n2").mkdir()
    with pytest.raises(ValueError, match="already holds n2"):  # was FileExistsError after work
        scale.run_scale_bench(counts=(2,), shape="tiny", work=str(tmp_path))
    with pytest.raises(ValueError, match="must differ"):
        scale.run_scale_bench(counts=(2, 2), shape="tiny")
