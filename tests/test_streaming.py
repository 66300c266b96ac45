"""Streaming: the solve reads one contribution at a time and sums bit-identically to the
in-memory sum (unlearning included); a build's peak memory does not grow with the number of
experts (a memory probe, not a timing)."""

from __future__ import annotations

import torch

from dume_dist.core.solve import normal_equations, solve_routers
from dume_dist.core.stats import RouterStats
from dume_dist.model.stats_files import StatsFiles, contributions


def _random_stats(seed: int, layers=3, dim=6, tokens=50) -> RouterStats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layers, tokens, dim, generator=g, dtype=torch.float64) * (1 + seed)
    x = torch.cat([x, torch.ones(layers, tokens, 1, dtype=torch.float64)], dim=2)
    gram = x.transpose(1, 2) @ x
    gram[:, 0, 0] = -0.0 if seed == 3 else gram[:, 0, 0]  # a signed zero must survive the sum
    return RouterStats(torch.triu(gram) + torch.triu(gram, 1).transpose(1, 2), "token")


def _reference(contribs: dict, num_experts: int):
    """The sum as it was computed in memory: out of place, sorted names."""
    keys = sorted(contribs)
    a = contribs[keys[0]][1].gram_LPP
    for k in keys[1:]:
        a = a + contribs[k][1].gram_LPP
    b = torch.zeros(*a.shape[:2], num_experts, dtype=torch.float64)
    for k in keys:
        b[:, :, contribs[k][0]] += contribs[k][1].gram_LPP[:, :, -1]
    return a, b


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64)


def test_streaming_sum_and_solve_are_bit_identical_including_after_unlearning(tmp_path):
    names = {f"node{i % 4}/{i:02d}": (i % 4, _random_stats(i)) for i in range(9)}
    files = StatsFiles(tmp_path / "stats")
    for name, (_, st) in names.items():
        files.put(name, st)
    lazy = contributions(files, {n: e for n, (e, _) in names.items()})
    want_a, want_b = _reference(names, 4)
    got_a, got_b = normal_equations(lazy, 4)
    assert torch.equal(_bits(got_a), _bits(want_a)) and torch.equal(_bits(got_b), _bits(want_b))
    for streamed, in_memory in zip(solve_routers(lazy, 4), solve_routers(names, 4)):
        assert torch.equal(_bits(streamed.weight_EF), _bits(in_memory.weight_EF))
        assert torch.equal(_bits(streamed.bias_E), _bits(in_memory.bias_E))
    # Unlearning node2 (expert 2 goes, experts 3 -> 2): the streamed solve without its files
    # equals, bit for bit, an in-memory solve that never had it.
    kept = {n: (e - (e > 2), st) for n, (e, st) in names.items() if not n.startswith("node2/")}
    files_kept = StatsFiles(tmp_path / "kept")
    for name in kept:
        files_kept.add_file(name, files.path(name))
    lazy_kept = contributions(files_kept, {n: e for n, (e, _) in kept.items()})
    for streamed, fresh in zip(solve_routers(lazy_kept, 3), solve_routers(kept, 3)):
        assert torch.equal(_bits(streamed.weight_EF), _bits(fresh.weight_EF))
        assert torch.equal(_bits(streamed.bias_E), _bits(fresh.bias_E))


def test_build_memory_does_not_grow_with_the_number_of_experts(tmp_path):
    from dume_dist.bench.scale import SHAPES, make_random_experts, run_child
    from dume_dist.demo import data_path

    synth = make_random_experts(tmp_path / "experts", 6, SHAPES["tiny"], dtype="float32")
    shape = SHAPES["tiny"]
    mlp_bytes = (
        shape["num_hidden_layers"] * 3 * shape["hidden_size"] * shape["intermediate_size"] * 4
    )
    peaks = {}
    for n in (2, 6):
        experts = {f"e{i}": str(synth["experts"][f"e{i}"]) for i in range(n)}
        result = run_child("build", dict(
            experts=experts, data=str(data_path("python", "train")), out=str(tmp_path / f"out{n}"),
            max_tokens=512, backbone="average", threads=1,
        ))  # fmt: skip
        peaks[n] = result["peak_rss_bytes"]
    # Holding every expert (or its statistics) would add 4 experts' MLPs (50 MB) and more.
    assert peaks[6] - peaks[2] < mlp_bytes, peaks
