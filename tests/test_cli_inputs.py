"""`dume build` and `dume eval` given what a new user gives them: data directories, byte-order
marks, damaged expert weights, an --out that holds the inputs, outputs that cannot be written,
odd flag values. Each refusal is one line, comes before any work and leaves nothing behind."""

import json
import shutil
import struct

import pytest
import torch
from cli_helpers import NAMES, build_args, one_line_error
from safetensors.torch import load_file
from tiny_world import DOMAINS, make_world

from dume_dist.cli.main import main
from dume_dist.model.data import read_documents


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("inputs"), domains={n: DOMAINS[n] for n in NAMES})


@pytest.fixture(scope="module")
def built(world):
    """A model whose beta data is a directory: its .txt files are read, other files skipped."""
    folder = world["root"] / "beta-data"
    folder.mkdir()
    shutil.copyfile(world["data"]["beta"][0], folder / "beta.txt")
    (folder / "notes.md").write_text("not data")
    out = world["root"] / "model"
    assert main(build_args(world, out, data={"beta": folder})) == 0  # was IsADirectoryError
    return out


def test_data_directory_builds(built):
    manifest = json.loads((built / "dume_manifest.json").read_text())
    assert manifest["num_experts"] == 2


def test_byte_order_mark_and_crlf_are_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfw1 w2\r\n\r\nw3\r\n")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "w1 w2"}\r\n{"text": "w3"}\r\n')
    assert read_documents(tmp_path / "bom.txt") == ["w1 w2", "w3"]
    assert read_documents(tmp_path / "bom.jsonl") == ["w1 w2", "w3"]  # was 'not valid JSON'


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _huge_header(data: bytes) -> bytes:  # would allocate 1 PB before reading it
    return struct.pack("<Q", 10**15) + data[8:]


def _garbage(data: bytes) -> bytes:
    return bytes(range(256)) * 20


@pytest.mark.parametrize("damage", [_truncated, _huge_header, _garbage])
def test_damaged_expert_weights_are_one_line_errors(world, tmp_path, capsys, damage):
    bad = tmp_path / "bad"
    shutil.copytree(world["experts"]["beta"], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    out = tmp_path / "out"
    code = main(build_args(world, out, experts={"beta": bad}))
    one_line_error(capsys, code, "cannot read safetensors file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
    if damage is _truncated:  # eval loads through transformers: its error, in one line
        code = main(["eval", "--model", str(bad), "--data", f"beta={world['data']['beta'][0]}"])
        one_line_error(capsys, code, "cannot load model")


def test_out_that_holds_an_input_is_refused_even_with_overwrite(world, capsys):
    before = sorted(p.name for p in world["experts"]["alpha"].iterdir())
    for out in (world["experts"]["alpha"], world["root"]):
        code = main(build_args(world, out, "--overwrite"))
        one_line_error(capsys, code, "would delete")
    assert sorted(p.name for p in world["experts"]["alpha"].iterdir()) == before


def test_out_and_save_stats_under_a_file_refused_before_work(world, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code = main(build_args(world, tmp_path / "afile" / "out"))
    one_line_error(capsys, code, "afile is not a directory")
    code = main(build_args(world, tmp_path / "o", "--save-stats", tmp_path / "afile" / "stats"))
    one_line_error(capsys, code, "afile is not a directory")
    code = main(build_args(world, tmp_path / "o", "--save-stats", tmp_path / "afile"))
    one_line_error(capsys, code, "--save-stats")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_same_data_file_twice_is_refused(world, tmp_path, capsys):
    twice = ["--data", f"alpha={world['data']['alpha'][0]}"]
    code = main(build_args(world, tmp_path / "out", *twice))
    one_line_error(capsys, code, "given twice")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, value, reason",
    [
        ("--temperature", "inf", "a finite number > 0"),  # was accepted: routing weights all equal
        ("--temperature", "nan", "a finite number > 0"),
        ("--switch-rates", "a,b", "comma-separated numbers"),
        ("--top-k", "nan", "an integer"),
        ("--mu", "x", "a number or 'auto'"),
    ],
)
def test_flag_values_are_refused_with_their_reason(world, tmp_path, capsys, flag, value, reason):
    with pytest.raises(SystemExit) as exit_:
        main(build_args(world, tmp_path / "out", flag, value))
    assert exit_.value.code == 2
    assert f"argument {flag}: expected {reason}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_outputs_are_checked_before_any_work(world, tmp_path, capsys):
    dense = str(world["experts"]["alpha"])
    base = ["eval", "--model", dense, "--data", f"alpha={world['data']['alpha'][0]}"]
    js = tmp_path / "eval.json"
    one_line_error(capsys, main([*base, "--json", str(tmp_path)]), "is a directory")
    one_line_error(capsys, main([*base, "--json", str(tmp_path / "no" / "e.json")]), "no does not")
    code = main([*base, "--json", str(js), "--heatmap", str(tmp_path / "h.png")])
    one_line_error(capsys, code, "--heatmap needs a DUME model")  # was: JSON written, then refused
    code = main([*base, "--experts", f"alpha={dense}", "--stats", str(tmp_path / "nostats")])
    one_line_error(capsys, code, "--stats")  # was ignored: no bias-free row, no word
    one_line_error(capsys, main([*base, "--stats", str(tmp_path)]), "needs --experts")
    code = main([*base, "--mixed", "--routing-png", str(tmp_path / "no" / "r.png")])
    one_line_error(capsys, code, "--routing-png")
    assert list(tmp_path.iterdir()) == []


def test_eval_too_short_text_names_its_domain(world, tmp_path, capsys):
    (tmp_path / "one.txt").write_text("w1\n")
    args = [
        "eval",
        "--model",
        str(world["experts"]["alpha"]),
        "--data",
        f"alpha={tmp_path / 'one.txt'}",
    ]
    one_line_error(capsys, main(args), "domain alpha has 1 tokens")


def test_mixed_with_one_segment_writes_strict_json(world, built, tmp_path):
    js = tmp_path / "mixed.json"
    data = [x for n in NAMES for x in ("--data", f"{n}={world['data'][n][0]}")]
    code = main(["eval", "--model", str(built), *data, "--mixed", "--segment", "8",
                 "--segments", "1", "--sequences", "2", "--json", str(js)])  # fmt: skip
    assert code == 0

    def refuse(constant):
        raise AssertionError(f"{constant} in JSON")

    result = json.loads(js.read_text(), parse_constant=refuse)  # was NaN: no switch to score
    assert "after_switch" not in result["routing_accuracy"]
    assert 0 <= result["routing_accuracy"]["all"] <= 1


def test_any_os_error_is_one_line(world, monkeypatch, capsys):
    import dume_dist.model.evaluate as evaluate

    def broken(*args, **kwargs):
        raise IsADirectoryError(21, "Is a directory", "/somewhere")

    monkeypatch.setattr(evaluate, "compare", broken)
    args = ["eval", "--model", str(world["experts"]["alpha"])]
    one_line_error(capsys, main([*args, "--data", f"alpha={world['data']['alpha'][0]}"]), "Is a")


def test_build_dume_reads_a_data_directory_as_its_files(world, tmp_path):
    """The library call too (not only the CLI): a directory's files are hashed for the
    statistics' key and read, like the same files named one by one."""
    from dume_dist.model.build import build_dume

    folder = tmp_path / "alpha-data"
    folder.mkdir()
    shutil.copyfile(world["data"]["alpha"][0], folder / "alpha.txt")
    experts = {n: world["experts"][n] for n in NAMES}
    settings = {"routing": "paper", "max_tokens_per_seq": 12, "seq_len": 16, "progress": False}
    by_dir = build_dume(experts, {"alpha": [folder], "beta": world["data"]["beta"]},
                        tmp_path / "by-dir", save_stats=tmp_path / "s1", **settings)  # fmt: skip
    by_file = build_dume(experts, {"alpha": [folder / "alpha.txt"], "beta": world["data"]["beta"]},
                         tmp_path / "by-file", save_stats=tmp_path / "s2", **settings)  # fmt: skip
    assert by_dir.num_tokens == by_file.num_tokens
    key = lambda d: json.loads((d / "alpha" / "entry.json").read_text())["key"]  # noqa: E731
    assert key(tmp_path / "s1") == key(tmp_path / "s2")
    for blob in (tmp_path / "s1" / "alpha").glob("*.safetensors"):
        ours, theirs = load_file(blob), load_file(tmp_path / "s2" / "alpha" / blob.name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_one_expert_directory_under_two_names_is_refused(world, tmp_path, capsys):
    out = tmp_path / "out"
    args = build_args(world, out, experts={"beta": world["experts"]["alpha"]})
    one_line_error(capsys, main(args), "are the same directory")
    assert not out.exists()


def test_an_unbounded_range_is_written_with_inf(world, tmp_path, capsys):
    """`--lam -1` with the default routing (λ is the n-gram μ there): the bound reads (0.0, inf),
    not (0.0, None]."""
    out = tmp_path / "out"
    one_line_error(capsys, main(build_args(world, out, "--lam", "-1")), "must be in (0.0, inf)")
    assert not out.exists()
