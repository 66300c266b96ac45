"""Counts of text each contributor's expert writes (``ngram_sample``, model/ngram_sample.py).

Pinned to references: a sampling loop without the KV cache (the cached sampler must draw the
same tokens), explicit Python counting of the sampled ids (a build's counts with the sample minus
its counts without must equal them), batches drawn in any order or by any worker (the same
bits), and a build that never had a contributor (removal gives the same tables bit for bit).
`tests/test_dist_ray.py` checks two gloo workers against one, `tests/test_dist_coordinator.py`
a node's join and unlearning against the single-machine build.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from dume_dist.core.ngram import NgramStats
from dume_dist.model.build import build_dume
from dume_dist.model.kinds import get_kind, stats_from_bytes, stats_to_bytes
from dume_dist.model.modeling_dume import ngram_bucket
from dume_dist.model.ngram_sample import (
    SAMPLE_BATCH,
    SampledBatches,
    batch_seed,
    sample_batch,
    sample_shape,
    start_token,
)
from dume_dist.model.routing import resolve_routing

SAMPLE = {"ngram_sample": 0.5, "ngram_buckets": 257}
BUILD = dict(max_tokens_per_seq=24, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_world import make_world

    return make_world(tmp_path_factory.mktemp("sample") / "world", num_docs=12)


def _build(world, out, names=("alpha", "beta", "gamma"), **routing):
    from dume_dist.model.build import build_dume

    spec = resolve_routing("follow", **routing)
    return build_dume(
        {n: world["experts"][n] for n in names}, {n: world["data"][n] for n in names}, out,
        routing=spec, backbone=f"base:{world['root'] / 'base'}", **BUILD,
    )  # fmt: skip


def _expert_model(world, name):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(world["experts"][name]).eval()


def test_sample_shape_follows_the_data_and_stops_at_the_cap():
    assert sample_shape(1000, 0.5, 1 << 20, 64) == (math.ceil(500 / 63), 63)
    assert sample_shape(1000, 0.5, 1 << 20, None) == (2, 256)
    assert sample_shape(10**9, 1.0, 1000, 1024) == (1000 // 256, 256)  # the cap
    assert sample_shape(1000, 0.0, 1 << 20, 64) == (0, 63)
    assert sample_shape(0, 1.0, 1 << 20, 64) == (0, 63)
    assert sample_shape(1000, 0.5, 40, 64) == (1, 40)  # a cap below one sequence shortens it


def test_batch_seed_names_the_expert_and_the_batch():
    seeds = {batch_seed(fp, b) for fp in ("a" * 64, "b" * 64) for b in range(3)}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert batch_seed("a" * 64, 1) == batch_seed("a" * 64, 1)


def test_start_token_is_bos_else_eos_else_a_clear_error():
    from tiny_world import make_config

    assert start_token(make_config()) == 1
    assert start_token(make_config(bos_token_id=None)) == 2
    with pytest.raises(ValueError, match="no BOS or EOS token.*ngram_sample 0"):
        start_token(make_config(bos_token_id=None, eos_token_id=None))


def test_start_token_falls_back_to_generation_config_and_is_checked_before_collecting(tmp_path):
    """Many checkpoints name BOS / EOS only in ``generation_config.json``; an expert that names
    neither is refused before any statistics are collected, naming it."""
    import json

    from tiny_world import make_config, make_world

    bare = make_config(bos_token_id=None, eos_token_id=None)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    assert start_token(bare, tmp_path) == 2
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 10**9}))
    with pytest.raises(ValueError, match="config.json or generation_config.json names no BOS"):
        start_token(bare, tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*generation_config.json"):
        start_token(bare, tmp_path)

    world = make_world(tmp_path / "w", num_docs=6)
    beta = world["experts"]["beta"]
    config = json.loads((beta / "config.json").read_text())
    config["bos_token_id"] = config["eos_token_id"] = None
    (beta / "config.json").write_text(json.dumps(config))
    (beta / "generation_config.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"^expert beta: .*no BOS or EOS token") as info:
        build_dume(world["experts"], world["data"], tmp_path / "out", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    build_dume(world["experts"], world["data"], tmp_path / "out", progress=False,
               routing=resolve_routing("follow", ngram_sample=0))  # fmt: skip


def test_cached_sampler_draws_what_a_full_forward_sampler_draws(world):
    model = _expert_model(world, "alpha")
    got = sample_batch(model, 1, rows=3, length=12, seed=7, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    ids = torch.full((3, 1), 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(12):
            probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[:, -1].float(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    assert torch.equal(got, ids)
    assert got.shape == (3, 13) and (got[:, 0] == 1).all()


def test_sample_batches_are_the_same_bits_in_any_order_and_from_any_worker(world):
    made = []

    def make():
        made.append(1)
        return _expert_model(world, "beta")

    sample = SampledBatches(make, "f" * 64, SAMPLE_BATCH + 5, 6, 1, "cpu")
    assert sample.num_batches == 2 and sample.num_tokens == (SAMPLE_BATCH + 5) * 7
    last, first = sample.batch(1), sample.batch(0)
    other = SampledBatches(make, "f" * 64, SAMPLE_BATCH + 5, 6, 1, "cpu")  # another worker
    assert torch.equal(other.batch(0)[0], first[0]) and torch.equal(other.batch(1)[0], last[0])
    assert first[0].shape == (SAMPLE_BATCH, 7) and last[0].shape == (5, 7)
    assert sample.tokens_of(0) + sample.tokens_of(1) == sample.num_tokens
    assert len(made) == 2  # one model per worker, made once
    assert not torch.equal(first[0][:5], last[0])  # batches have their own seeds
    third = SampledBatches(make, "e" * 64, SAMPLE_BATCH + 5, 6, 1, "cpu")
    assert not torch.equal(third.batch(0)[0], first[0])  # another expert, another sample
    with pytest.raises(IndexError):
        sample.batch(2)


def _counts(ids_NT, vocab, buckets):
    uni, ctx, big = Counter(), Counter(), Counter()
    for row in ids_NT.tolist():
        for i, t in enumerate(row):
            uni[t] += 1
            if i:
                ctx[row[i - 1]] += 1
                big[int(ngram_bucket(torch.tensor(row[i - 1]), torch.tensor(t), buckets))] += 1
    return [
        torch.tensor([float(c[i]) for i in range(n)], dtype=torch.float64)
        for c, n in ((uni, vocab), (ctx, vocab), (big, buckets))
    ]


@pytest.fixture(scope="module")
def builds(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample-builds")
    return {
        "plain": _build(world, root / "plain", ngram_buckets=257, ngram_sample=0.0),
        "sampled": _build(world, root / "sampled", **SAMPLE),
        "again": _build(world, root / "again", **SAMPLE),
        "two": _build(world, root / "two", names=("alpha", "gamma"), **SAMPLE),
    }


def test_build_counts_the_sample_exactly_and_records_it(world, builds):
    from dume_dist.model.backbone import Backbone
    from dume_dist.model.experts import load_expert_spec

    plain, sampled = builds["plain"], builds["sampled"]
    kind = get_kind("ngram")
    backbone = Backbone.from_spec(f"base:{world['root'] / 'base'}",
                                  [load_expert_spec(n, world["experts"][n])
                                   for n in ("alpha", "beta", "gamma")])  # fmt: skip
    vocab = backbone.config.vocab_size
    for name in ("alpha", "beta", "gamma"):
        without, with_ = plain.stats[name], sampled.stats[name]
        assert isinstance(with_, NgramStats) and "sampled_tokens" not in without.extra
        spec = load_expert_spec(name, world["experts"][name])
        sample = kind.sampled(
            sampled.routing.spec, backbone, spec, real_tokens=without.num_tokens,
            max_tokens_per_seq=BUILD["max_tokens_per_seq"],
            fingerprint=sampled.expert_fingerprints[name], device="cpu",
        )  # fmt: skip
        seqs, length = sample_shape(without.num_tokens, 0.5, 1 << 20, 24)
        assert (sample.sequences, sample.length) == (seqs, length) == (seqs, 23)
        ids = torch.cat([sample.batch(b)[0] for b in range(sample.num_batches)])
        assert with_.extra["sampled_tokens"] == ids.numel() == sample.num_tokens
        assert sampled.sampled_tokens[name] == ids.numel() and plain.sampled_tokens[name] == 0
        assert with_.num_tokens == without.num_tokens + ids.numel()
        want = _counts(ids, vocab, 257)
        for got, base, ref in zip((with_.unigram_V, with_.context_V, with_.bigram_H),
                                  (without.unigram_V, without.context_V, without.bigram_H),
                                  want):  # fmt: skip
            assert torch.equal(got - base, ref)
        kind.check_values(with_, sampled.routing.spec, None)
        assert stats_from_bytes(stats_to_bytes(with_)).extra["sampled_tokens"] == ids.numel()
    routing = sampled.manifest["routing"]
    assert routing["ngram_sample"] == 0.5 and routing["ngram_sample_max"] == 1 << 20


def test_sampled_builds_repeat_bit_for_bit_and_removal_is_exact(world, builds):
    a, b, two = builds["sampled"], builds["again"], builds["two"]
    for name in a.stats:
        for key in ("unigram_V", "context_V", "bigram_H"):
            assert torch.equal(getattr(a.stats[name], key), getattr(b.stats[name], key))
    assert torch.equal(a.routers.bigram_EH, b.routers.bigram_EH)
    # without beta (the same backbone, as a store keeps it): the same counts for alpha, gamma
    for j, name in ((0, "alpha"), (1, "gamma")):
        row = {"alpha": 0, "gamma": 2}[name]
        assert torch.equal(two.routers.unigram_EV[j], a.routers.unigram_EV[row])
        assert torch.equal(two.routers.bigram_EH[j], a.routers.bigram_EH[row])


def test_coordinator_check_refuses_a_forged_sample_count(builds):
    stats = builds["sampled"].stats["alpha"]
    spec = builds["sampled"].routing.spec
    for bad in (-1, "12", 1.5, True, stats.num_tokens + 1):
        forged = stats.with_meta(extra={**stats.extra, "sampled_tokens": bad})
        with pytest.raises(ValueError, match="sampled"):
            get_kind("ngram").check_values(forged, spec, None)


def test_a_private_contribution_counts_no_sample(world, tmp_path):
    from dume_dist.core.dp import DpSpec
    from dume_dist.model.build import build_dume

    names = ("alpha", "beta")
    result = build_dume(
        {n: world["experts"][n] for n in names}, {n: world["data"][n] for n in names},
        tmp_path / "m", routing=resolve_routing("follow", ngram_sample=0.5, ngram_buckets=257),
        dp=DpSpec(8.0, 1e-5, unit="token"), dp_seed=0, **BUILD,
    )  # fmt: skip
    # the sample's size would follow the data's (not within the guarantee): none is counted
    assert result.sampled_tokens == {"alpha": 0, "beta": 0}
    assert all("sampled_tokens" not in result.stats[n].extra for n in names)
    assert set(result.privacy) == set(names)
