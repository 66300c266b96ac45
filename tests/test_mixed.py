"""`dume eval --mixed`: mixed-domain sequences scored against the segment oracle and delayed
oracles, on a DUME model built from tiny real experts (tiny_world)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from tiny_world import make_world

from dume_dist.cli.main import main
from dume_dist.model.build import build_dume
from dume_dist.model.evaluate import load_causal_lm
from dume_dist.model.mixed import (
    MixedBatch,
    MixedSettings,
    delayed_domains,
    domain_streams,
    evaluate_mixed,
    group_masks,
    mixed_batch,
    oracle_nll,
)
from dume_dist.model.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    world = make_world(root, num_docs=20)
    build_dume(world["experts"], world["data"], root / "model", routing="ngram", progress=False)
    return root / "model", world


def test_sequences_are_seeded_segments_of_distinct_domains(model_dir):
    _, world = model_dir
    streams = domain_streams(load_tokenizer(world["experts"]["alpha"]), world["data"])
    settings = MixedSettings(segment=8, segments=3, sequences=5, seed=3)
    batch = mixed_batch(streams, settings)
    assert batch.ids_BT.shape == (5, 24) and batch.starts == [0, 8, 16]
    for row in range(5):
        seg_domains = batch.domain_BT[row, ::8].tolist()
        assert len(set(seg_domains)) == 3
        for s, j in enumerate(seg_domains):
            ids = batch.ids_BT[row, 8 * s : 8 * s + 8]
            stream = streams[batch.domains[j]]
            assert any(torch.equal(stream[i : i + 8], ids) for i in range(len(stream) - 7))
    again = mixed_batch(streams, settings)
    assert torch.equal(again.ids_BT, batch.ids_BT)
    other = mixed_batch(streams, MixedSettings(segment=8, segments=3, sequences=5, seed=4))
    assert not torch.equal(other.ids_BT, batch.ids_BT)
    more = mixed_batch(streams, MixedSettings(segment=4, segments=7, sequences=3))
    assert (more.domain_BT[:, 4:] != more.domain_BT[:, :-4]).any(dim=1).all()
    for row in more.domain_BT[:, ::4].tolist():  # consecutive segments always switch domain
        assert all(a != b for a, b in zip(row, row[1:]))


def test_delayed_oracle_and_groups():
    domain_BT = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4])
    assert delayed_domains(domain_BT, 0) is domain_BT
    assert delayed_domains(domain_BT, 2)[0].tolist() == [0] * 6 + [1] * 4 + [2] * 2
    masks = group_masks(MixedBatch(domain_BT, domain_BT, ["a", "b", "c"], [0, 4, 8]), 2)
    targets = torch.arange(1, 12)
    assert targets[masks["first_segment"][0]].tolist() == [1, 2, 3]
    assert targets[masks["after_switch"][0]].tolist() == [4, 5, 8, 9]
    assert (masks["first_segment"] ^ masks["later_segments"]).all()


def test_oracle_without_delay_keeps_one_and_routing_is_scored(model_dir):
    out, world = model_dir
    model = load_causal_lm(out)
    streams = domain_streams(load_tokenizer(out, trust_remote_code=True), world["data"])
    settings = MixedSettings(segment=8, segments=3, sequences=6, delays=(0, 2), batch_size=4)
    batch = mixed_batch(streams, settings)
    result = evaluate_mixed(model, batch, settings)
    assert result["keep"]["oracle, 0 tokens late"] == pytest.approx(
        {g: 1.0 for g in result["segment_oracle_ppl"]}
    )
    assert set(result["keep"]["routing"]) == {
        "all",
        "first_segment",
        "later_segments",
        "after_switch",
    }
    assert 0 <= result["routing_accuracy"]["all"] <= 1
    assert result["top1_BLT"].shape == (6, 2, 24)
    # the oracle's per-token forcing equals forcing each segment's expert on its own prefix
    names = list(model.config.expert_names)
    first = names.index(batch.domains[int(batch.domain_BT[0, 0])])
    model.set_forced_expert(first)
    with torch.inference_mode():
        logits = model(input_ids=batch.ids_BT[:1, :8]).logits[:, :-1]
    model.set_forced_expert(None)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.ids_BT[:1, 1:8])
    got = oracle_nll(model, batch, settings)[0][0, :7].mean()
    torch.testing.assert_close(got.float(), nll.float(), rtol=1e-4, atol=1e-5)


def test_cli_eval_mixed_writes_json_and_png(model_dir, tmp_path, capsys):
    out, world = model_dir
    args = ["eval", "--model", str(out), "--mixed", "--segment", "8", "--segments", "3",
            "--sequences", "4", "--batch-size", "4", "--json", str(tmp_path / "m.json"),
            "--routing-png", str(tmp_path / "m.png")]  # fmt: skip
    for name, paths in world["data"].items():
        args += ["--data", f"{name}={paths[0]}"]
    assert main(args) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert set(result["keep"]) == {"routing", "oracle, 4 tokens late", "oracle, 16 tokens late"}
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert "segment oracle" in capsys.readouterr().out
    bad = ["eval", "--model", str(out), "--mixed", "--segment", "8", "--segments", "3",
           "--data", f"nope={world['data']['alpha'][0]}",
           "--data", f"alpha={world['data']['alpha'][0]}"]  # fmt: skip
    capsys.readouterr()
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "'nope' is not one of the model's experts" in err and err.count("\n") == 1


def test_eval_windows_stay_within_the_models_position_limit(model_dir, tmp_path, capsys):
    """`dume eval` and `--mixed` refuse windows past ``max_position_embeddings`` (one line, nothing
    written); by default the window is 256 tokens or the limit when that is shorter."""
    from transformers import PretrainedConfig

    from dume_dist.model.evaluate import eval_window

    out, world = model_dir
    limit = json.loads((out / "config.json").read_text())["max_position_embeddings"]
    data = [x for name, paths in world["data"].items() for x in ("--data", f"{name}={paths[0]}")]
    too_long = [
        ["eval", "--model", str(out), *data, "--seq-len", str(limit + 1)],
        ["eval", "--model", str(out), *data, "--mixed", "--segment", str(limit // 2 + 1),
         "--segments", "2"],
    ]  # fmt: skip
    for args in too_long:
        js = tmp_path / "never.json"
        capsys.readouterr()
        assert main([*args, "--json", str(js)]) == 2
        err = capsys.readouterr().err
        assert f"exceed the model's max_position_embeddings={limit}" in err
        assert err.count("\n") == 1 and not js.exists()
    assert main(["eval", "--model", str(out), *data, "--seq-len", str(limit),
                 "--max-eval-tokens", str(2 * limit)]) == 0  # fmt: skip
    assert eval_window(PretrainedConfig(max_position_embeddings=64), None) == 64
    assert eval_window(PretrainedConfig(max_position_embeddings=4096), None) == 256
    assert eval_window(PretrainedConfig(), None) == 256
    assert eval_window(PretrainedConfig(max_position_embeddings=64), 32) == 32


def test_bench_routing_scores_every_option_on_mixed_sequences(model_dir, tmp_path):
    from dume_dist.bench.routing import DEFAULT_OPTIONS, markdown_table, run_routing_bench

    _, world = model_dir
    # ngram, switch and the earlier follow share fit and held-out statistics (counts and the mu
    # curve; switch auto simulates its text from the held-out counts): each gets what a
    # contributor computes; the default follow's counts include text the experts write: its own
    starts = ("switch", "ngram (", "follow")
    options = [DEFAULT_OPTIONS[0]] + [o for o in DEFAULT_OPTIONS if o[0].startswith(starts)]
    assert len(options) == 5
    settings = MixedSettings(segment=8, segments=3, sequences=4, batch_size=4)
    result = run_routing_bench(
        world["experts"], world["data"], world["data"], options=options, seq_len=16,
        eval_seq_len=16, max_eval_tokens=256, batch_size=4, repeats=1, decode_tokens=2,
        mixed=settings,
    )  # fmt: skip
    for row in result["options"]:
        assert set(row["mixed"]["keep"]) == {
            "all",
            "first_segment",
            "later_segments",
            "after_switch",
        }
    assert result["settings"]["mixed"]["sequences"] == 4
    assert len(result["settings"]["statistics_seconds"]) == 3  # Grams, counts, with the sample
    # speed: every domain's batch timed, paired against the paper's run on the same input
    assert len(result["settings"]["forward_batches"]) == len(world["data"])
    assert result["options"][0]["forward_speed_vs_paper"] == 1.0
    assert all(len(r["decode_seconds_runs"]) == len(world["data"]) for r in result["options"])
    paper = result["options"][0]
    for row in result["options"][1:]:  # each run paired with the paper's run on the same input
        for kind in ("forward", "decode"):
            ratios = [
                a / b for a, b in zip(paper[f"{kind}_seconds_runs"], row[f"{kind}_seconds_runs"])
            ]
            assert row[f"{kind}_speed_vs_paper"] == statistics.median(ratios)
    assert result["mixed_delayed_oracle_keep"]["oracle, 4 tokens late"]["first_segment"] == 1.0
    assert "mixed keep" in markdown_table(result)
    held = {r["label"].split(" ")[0]: r["stats_bytes_per_contributor"]["holdout"]
            for r in result["options"]}  # fmt: skip
    assert 0 < held["follow"] == held["ngram"] == held["switch"]  # no option sends exact bigrams
