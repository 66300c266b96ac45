"""Routing options beyond the paper: context-aware features, logit smoothing, the lda solver,
held-out selection of λ / β.

Pinned to references: a full forward without cache (generation with a cache must match it), the
explicit held-out squared error and a Monte-Carlo error rate (the statistics-only criteria must
match them), a build that never had a contributor (removal must give its routers bit for bit), and
a fresh interpreter without dume_dist (a saved context-aware model must load and generate there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_modeling_dume import dense_experts, dume_from_dense, tiny_base_config

from dume_dist.core.select import estimated_error, select_routing
from dume_dist.core.solve import solve_routers
from dume_dist.core.stats import GramAccumulator
from dume_dist.model.collect import collect_stats
from dume_dist.model.modeling_dume import (
    CACHE_ATTR,
    DumeForCausalLM,
    RoutingContext,
    causal_ema,
    causal_features,
)
from dume_dist.model.routing import (
    AUTO,
    DEFAULT_PRESET,
    PRESETS,
    RoutingSpec,
    feature_map_name,
    resolve_routing,
    solve_routing,
)

torch.set_num_threads(1)  # tiny matmuls: more threads only contend

# Every inference-time routing option (the model reads features and smoothing).
MODEL_ROUTINGS = [
    {"features": "token"},
    {"features": "token", "smoothing": 0.7},
    {"features": "token", "smoothing": 1.0},
    {"features": "prefix_mean"},
    {"features": "prefix_mean", "smoothing": 0.9},
]
STATEFUL = [r for r in MODEL_ROUTINGS if r != {"features": "token"}]


def _left_padded(batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(3, 96, (batch, length), generator=g)
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[0, :3] = 0
    mask_BT[1, :1] = 0
    ids_BT[mask_BT == 0] = 0
    return ids_BT, mask_BT


def _model(routing, k=1, seed=0):
    return dume_from_dense(
        dense_experts(tiny_base_config(), 3, seed=seed), routing=routing, num_experts_per_tok=k
    )


# -- KV cache: generation with a cache equals the full forward -----------------------------------


@pytest.mark.parametrize("routing", MODEL_ROUTINGS, ids=lambda r: "+".join(map(str, r.values())))
@pytest.mark.parametrize("k", [1, 2])
def test_cached_generation_equals_full_forward(routing, k):
    dume = _model(routing, k)
    ids_BT, mask_BT = _left_padded()
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = dume.generate(ids_BT, attention_mask=mask_BT, use_cache=True, **kw)
    full = dume.generate(ids_BT, attention_mask=mask_BT, use_cache=False, **kw)
    assert cached.shape == (3, 15)
    assert torch.equal(cached, full)


def _incremental_logits(dume, ids_BT, mask_BT, prompt: int):
    """Prefill ``prompt`` positions, then feed one token at a time through the cache."""
    with torch.no_grad():
        out = dume(ids_BT[:, :prompt], attention_mask=mask_BT[:, :prompt], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(prompt, ids_BT.shape[1]):
            step = dume(
                ids_BT[:, t : t + 1], attention_mask=mask_BT[:, : t + 1], past_key_values=cache
            )
            logits.append(step.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("routing", STATEFUL, ids=lambda r: "+".join(map(str, r.values())))
def test_cache_carries_the_routing_state(routing, monkeypatch):
    dume = _model(routing)
    ids_BT, mask_BT = _left_padded(length=12, seed=1)
    real_BT = mask_BT.bool()
    with torch.no_grad():
        full = dume(ids_BT, attention_mask=mask_BT, use_cache=False).logits
    inc, cache = _incremental_logits(dume, ids_BT, mask_BT, prompt=5)
    torch.testing.assert_close(inc[real_BT], full[real_BT], rtol=1e-4, atol=1e-5)
    assert getattr(cache, CACHE_ATTR)["seen"] == 12
    # The state matters: dropping it between steps changes the routing (this test can fail).
    monkeypatch.setattr(RoutingContext, "__init__", _stateless_context)
    broken, _ = _incremental_logits(dume, ids_BT, mask_BT, prompt=5)
    assert not torch.allclose(broken[real_BT], full[real_BT], rtol=1e-4, atol=1e-5)


def _stateless_context(self, real_BT, layers):
    self.real_BT, self.layers = real_BT, None


def test_beam_search_reorders_the_routing_state():
    dume = _model({"features": "prefix_mean", "smoothing": 0.8}, k=2)
    ids_BT, mask_BT = _left_padded(batch=2)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    cached = dume.generate(ids_BT, attention_mask=mask_BT, use_cache=True, **kw)
    full = dume.generate(ids_BT, attention_mask=mask_BT, use_cache=False, **kw)
    assert torch.equal(cached, full)


def test_a_cache_out_of_step_with_the_routing_state_is_refused():
    dume = _model({"features": "prefix_mean"})
    ids_BT, mask_BT = _left_padded()
    _, cache = _incremental_logits(dume, ids_BT, mask_BT, prompt=4)
    cache.crop(-2)
    with pytest.raises(ValueError, match="routing state covers"):
        dume(ids_BT[:, :1], past_key_values=cache)


# -- one feature formula for statistics and inference --------------------------------------------


def test_statistics_features_equal_inference_features():
    """The Gram collect_stats computes (forced expert 1) equals the Gram of the features the model
    routes with, recorded during a padded full forward and during cached decoding, when every
    router sends everything to expert 1 (so the hidden states are the forced ones)."""
    dume = _model({"features": "prefix_mean", "smoothing": 0.5})
    for block in dume.moe_blocks():
        block.router.weight.data.zero_()
        block.router.bias.data = torch.tensor([0.0, 10.0, 0.0])
    ids_BT, mask_BT = _left_padded(length=10, seed=2)
    right_ids = torch.stack(
        [torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids_BT, mask_BT)]
    )
    right_mask = mask_BT.sort(dim=1, descending=True).values

    dume.set_forced_expert(1)
    stats = collect_stats(
        dume,
        [(right_ids, right_mask)],
        max_tokens_per_seq=64,
        features="prefix_mean",
        progress=False,
    )
    dume.set_forced_expert(None)

    def recorded_gram(run):
        seen = {i: [] for i in range(len(dume.moe_blocks()))}
        originals = {}
        for i, block in enumerate(dume.moe_blocks()):
            originals[i] = block.router_logits

            def spy(feats, _i=i, _orig=originals[i], _block=block):
                ctx = _block.routing_context
                real = ctx.real_BT if ctx is not None and ctx.real_BT is not None else None
                seen[_i].append(
                    feats[real] if real is not None else feats.reshape(-1, feats.shape[-1])
                )
                return _orig(feats)

            block.router_logits = spy
        run()
        for i, block in enumerate(dume.moe_blocks()):
            block.router_logits = originals[i]
        acc = GramAccumulator(len(seen), stats.feature_dim)
        for i, parts in seen.items():
            acc.add(i, torch.cat(parts))
        return acc.result().gram_LPP

    full = recorded_gram(lambda: dume(ids_BT, attention_mask=mask_BT, use_cache=False))
    incremental = recorded_gram(lambda: _incremental_logits(dume, ids_BT, mask_BT, prompt=4))
    assert stats.feature_map == "prefix_mean" and stats.num_tokens == int(mask_BT.sum())
    for gram in (full, incremental):
        torch.testing.assert_close(gram, stats.gram_LPP, rtol=1e-5, atol=1e-3)


def test_features_and_smoothing_split_anywhere_equal_whole():
    g = torch.Generator().manual_seed(0)
    x_BTD = torch.randn(2, 300, 4, generator=g)
    real_BT = torch.rand(2, 300, generator=g) > 0.2
    whole_f, _ = causal_features("prefix_mean", x_BTD, real_BT)
    part1, state = causal_features("prefix_mean", x_BTD[:, :137], real_BT[:, :137])
    part2, _ = causal_features("prefix_mean", x_BTD[:, 137:], real_BT[:, 137:], state)
    torch.testing.assert_close(torch.cat([part1, part2], 1), whole_f)
    for decay in (0.5, 0.9, 1.0):
        whole, _ = causal_ema(x_BTD, decay, real_BT)
        a, st = causal_ema(x_BTD[:, :200], decay, real_BT[:, :200])
        b, _ = causal_ema(x_BTD[:, 200:], decay, real_BT[:, 200:], st)
        torch.testing.assert_close(torch.cat([a, b], 1), whole)
        # Reference: the recurrence over real tokens, position by position.
        num, den = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        for t in range(300):
            m = real_BT[:, t]
            num = torch.where(m[:, None], decay * num + x_BTD[:, t].double(), num)
            den = torch.where(m, decay * den + 1, den)
            ref = num / den.clamp_min(1e-300)[:, None]
            torch.testing.assert_close(whole[:, t][m], ref[m].float(), rtol=1e-5, atol=1e-6)


# -- statistics: additive per contributor, identity of the feature map ---------------------------


def _synthetic_stats(features, seed, label, num_seqs=12, length=24, dim=6, betas=(0.0,)):
    """Held-out style statistics {β: RouterStats} of class-``label`` sequences."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.zeros(dim)
    centre[label % dim] = 1.5
    x_BTD = centre + torch.randn(num_seqs, length, dim, generator=g)
    real_BT = torch.ones(num_seqs, length, dtype=torch.bool)
    real_BT[: num_seqs // 3, : length // 4] = False  # some left padding
    feats_BTF, _ = causal_features(features, x_BTD, real_BT)
    out = {}
    for beta in betas:
        smoothed_BTF, _ = causal_ema(feats_BTF, beta, real_BT)
        acc = GramAccumulator(2, feats_BTF.shape[-1])
        for layer in range(2):
            acc.add(layer, smoothed_BTF[real_BT] * (1 + layer))
        out[beta] = acc.result(feature_map=feature_map_name(features, beta))
    return out


SPECS = {
    "paper": PRESETS["paper"],
    "token-ridge-auto": RoutingSpec(lam=AUTO, smoothing=AUTO, holdout_fraction=0.1),
    "prefix-ridge-auto": RoutingSpec(features="prefix_mean", lam=AUTO, holdout_fraction=0.1),
    "token-lda": RoutingSpec(solver="lda", lam=0.1),
    "context": PRESETS["context"],
    "paper-equal": PRESETS["paper"].replace(priors="equal"),
    "token-ridge-auto-equal": RoutingSpec(lam=AUTO, priors="equal", holdout_fraction=0.1),
    "context-tokens": PRESETS["context"].replace(priors="tokens"),
    "context-equal": PRESETS["context"].replace(priors="equal"),
}


def _contributions(spec, names_labels):
    betas = spec.holdout_smoothings() or (0.0,)
    fit, held = {}, {}
    for i, (name, label) in enumerate(names_labels):
        fit[name] = (label, _synthetic_stats(spec.features, 100 + i, label)[0.0])
        for beta, st in _synthetic_stats(spec.features, 200 + i, label, betas=betas).items():
            held.setdefault(beta, {})[name] = (label, st)
    return fit, held


@pytest.mark.parametrize("name", list(SPECS))
def test_adding_then_removing_a_contributor_returns_identical_routers(name):
    spec = SPECS[name]
    fit, held = _contributions(spec, [("a", 0), ("b", 1), ("c", 2), ("d", 0)])
    without = lambda m: {k: v for k, v in m.items() if k != "d"}  # noqa: E731
    never = solve_routing(spec, without(fit), 3, {b: without(h) for b, h in held.items()})
    grown = solve_routing(spec, fit, 3, held)
    removed = solve_routing(
        spec, without(dict(fit)), 3, {b: without(dict(h)) for b, h in held.items()}
    )
    assert not torch.equal(grown.routers[0].weight_EF, never.routers[0].weight_EF)
    assert (removed.lam, removed.smoothing) == (never.lam, never.smoothing)
    for r0, r1 in zip(never.routers, removed.routers):
        assert torch.equal(r0.weight_EF, r1.weight_EF) and torch.equal(r0.bias_E, r1.bias_E)
    # Subtracting the contribution's Grams from the sum gives the same routers to fp64 rounding.
    a_plus_d = (fit["a"][0], fit["a"][1] + fit["d"][1])
    sub = {**without(fit), "a": (0, a_plus_d[1] - fit["d"][1])}
    subtracted = solve_routers(sub, 3, lam=never.lam, solver=spec.solver, priors=spec.priors)
    for r0, r1 in zip(never.routers, subtracted):
        torch.testing.assert_close(r1.weight_EF, r0.weight_EF, rtol=1e-7, atol=1e-9)


def test_statistics_of_two_feature_maps_cannot_be_mixed():
    token = _synthetic_stats("token", 0, 0)[0.0]
    prefix = _synthetic_stats("prefix_mean", 1, 1)[0.0]
    with pytest.raises(ValueError, match="feature map"):
        solve_routers({"a": (0, token), "b": (1, token.with_meta(feature_map="prefix_mean"))}, 2)
    with pytest.raises(ValueError, match="feature map"):
        solve_routing(PRESETS["paper"], {"a": (0, token), "b": (1, prefix)}, 2)
    with pytest.raises(ValueError, match="feature map 'prefix_mean'"):
        solve_routing(PRESETS["paper"], {"a": (0, prefix), "b": (1, prefix)}, 2)
    # Held-out Grams must carry their smoothing: a plain Gram is not a β = 0.9 one.
    spec = RoutingSpec(lam=AUTO, smoothing=AUTO, holdout_fraction=0.1, smoothing_grid=(0.0, 0.9))
    fit, held = _contributions(spec, [("a", 0), ("b", 1)])
    held[0.9] = held[0.0]
    with pytest.raises(ValueError, match=r"held-out statistics of 'a' are of feature map 'token'"):
        solve_routing(spec, fit, 2, held)


def test_checkpoint_writer_refuses_statistics_of_another_feature_map(tmp_path):
    from tiny_world import make_world

    from dume_dist.model.backbone import Backbone
    from dume_dist.model.experts import load_expert_specs
    from dume_dist.model.formats import BuildStats, CheckpointInput
    from dume_dist.model.routing import RoutingSpec, SolvedRouting
    from dume_dist.model.writer import write_dume_checkpoint

    world = make_world(tmp_path / "world", num_docs=2)
    specs = load_expert_specs(world["experts"])
    backbone = Backbone.from_spec("average", specs)
    token = _synthetic_stats("token", 0, 0, dim=32)[0.0]
    prefix = _synthetic_stats("prefix_mean", 0, 0, dim=32)[0.0]
    routers = solve_routers({s.name: (j, prefix) for j, s in enumerate(specs)}, len(specs))
    solved = SolvedRouting(routers, RoutingSpec(features="prefix_mean"), 1e-2, 0.0, None)
    inp = CheckpointInput(
        backbone=backbone, experts=specs, routing=solved,
        stats=BuildStats(fit={s.name: token for s in specs}),
    )  # fmt: skip
    with pytest.raises(ValueError, match="feature map 'token'"):
        write_dume_checkpoint(tmp_path / "out", inp)
    assert not (tmp_path / "out").exists()


# -- held-out selection ------------------------------------------------------------------------


def _explicit_problem(seed, n, dim=5, num_e=3, noise=2.0):
    """Gaussian classes around fixed centres; ``seed`` draws the samples only."""
    centres = torch.randn(num_e, dim, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_e
    x = centres[labels] + noise * torch.randn(n, dim, generator=g)
    return x.double(), labels


def _stats_of(x, labels, num_e):
    out = {}
    for j in range(num_e):
        acc = GramAccumulator(1, x.shape[1])
        acc.add(0, x[labels == j])
        out[f"c{j}"] = (j, acc.result())
    return out


def test_heldout_lambda_is_the_minimiser_of_the_explicit_heldout_loss():
    """On explicit data: the statistics-only curve equals ‖X_h W(λ) - Y_h‖² / N_h with W(λ) the
    explicit ridge solution on the fit data, and the chosen λ is its argmin. Few fit tokens in a
    noisy problem: the answer is an interior λ, neither end of the grid."""
    num_e = 3
    x_fit, y_fit = _explicit_problem(0, 30)
    x_held, y_held = _explicit_problem(1, 3000)
    grid = [10.0 ** (k / 2) for k in range(-6, 9)]
    sel = select_routing(
        _stats_of(x_fit, y_fit, num_e), {0.0: _stats_of(x_held, y_held, num_e)}, num_e,
        solver="ridge", lam_grid=grid,
    )  # fmt: skip
    xt_fit = torch.cat([x_fit, torch.ones(len(x_fit), 1, dtype=torch.float64)], 1)
    xt_held = torch.cat([x_held, torch.ones(len(x_held), 1, dtype=torch.float64)], 1)
    onehot = torch.nn.functional.one_hot
    explicit = []
    for lam in grid:
        w = torch.linalg.solve(
            xt_fit.T @ xt_fit + lam * torch.eye(6, dtype=torch.float64),
            xt_fit.T @ onehot(y_fit, num_e).double(),
        )
        err = xt_held @ w - onehot(y_held, num_e).double()
        explicit.append(float((err**2).sum()) / len(x_held))
    torch.testing.assert_close(
        torch.tensor(sel.curves["ridge_loss"][0]), torch.tensor(explicit), rtol=1e-8, atol=1e-10
    )
    best = min(range(len(grid)), key=explicit.__getitem__)
    assert sel.lam == grid[best] and 0 < best < len(grid) - 1
    # Scored on its own fit data, the least regularised λ always wins.
    on_fit = select_routing(
        _stats_of(x_fit, y_fit, num_e), {0.0: _stats_of(x_fit, y_fit, num_e)}, num_e,
        solver="ridge", lam_grid=grid,
    )  # fmt: skip
    assert on_fit.lam == grid[0]


def test_heldout_smoothing_prefers_the_running_mean_when_the_domain_is_fixed_per_sequence():
    """Each sequence has one class and i.i.d. token noise: averaging the logits over the prefix
    only removes noise, so β = 1 must win; with the class switching every token, β = 0 must."""
    betas = (0.0, 0.5, 0.9, 1.0)

    def stats(seed, switching):
        g = torch.Generator().manual_seed(seed)
        per = {}
        for j in range(2):
            labels = torch.full((400, 32), j)
            x = torch.randn(400, 32, 3, generator=g)
            if switching:  # class alternates along the sequence: label of token t is (j + t) % 2
                labels = (j + torch.arange(32)) % 2 * torch.ones(400, 1, dtype=torch.long)
            x[..., 0] += torch.where(labels == 0, 1.0, -1.0)
            real = torch.ones(400, 32, dtype=torch.bool)
            for beta in betas:
                sm, _ = causal_ema(x, beta, real)
                for k in range(2):
                    acc = GramAccumulator(1, 3)
                    acc.add(0, sm[labels == k])
                    per.setdefault(beta, {})[f"s{j}{k}"] = (k, acc.result())
        return per

    for switching, expected in ((False, 1.0), (True, 0.0)):
        held = stats(1, switching)
        fit = {n: v for n, v in stats(0, switching)[0.0].items()}
        sel = select_routing(fit, held, 2, solver="ridge", lam_grid=[1e-2])
        assert sel.smoothing == expected, (switching, sel.curves["ridge_loss"])


def test_estimated_error_matches_the_monte_carlo_error_rate():
    num_e = 3
    x_fit, y_fit = _explicit_problem(0, 3000, noise=1.0)
    routers_w = select_routing(
        _stats_of(x_fit, y_fit, num_e), {0.0: _stats_of(x_fit, y_fit, num_e)}, num_e,
        solver="lda", lam_grid=[1e-3],
    )  # fmt: skip
    from dume_dist.core.solve import lda_solve, normal_equations

    a, b = normal_equations(_stats_of(x_fit, y_fit, num_e), num_e)
    w_PE = lda_solve(a[0], b[0], 1e-3)
    x_held, y_held = _explicit_problem(1, 30000, noise=1.0)
    held = _stats_of(x_held, y_held, num_e)
    cls = torch.stack([held[f"c{j}"][1].gram_LPP[0] for j in range(num_e)])
    xt = torch.cat([x_held, torch.ones(len(x_held), 1, dtype=torch.float64)], 1)
    empirical = torch.stack(
        [((xt @ w_PE).argmax(1) != y_held)[y_held == j].double().mean() for j in range(num_e)]
    ).mean()
    assert 0.05 < float(empirical) < 0.6  # a problem where errors happen
    assert abs(estimated_error(w_PE, cls) - float(empirical)) < 0.03
    assert routers_w.lam == 1e-3 and routers_w.criterion == "error"


def test_lda_solver_equals_the_explicit_discriminant():
    num_e = 3
    x, y = _explicit_problem(3, 600, noise=1.0)
    routers = solve_routers(_stats_of(x, y, num_e), num_e, lam=0.2, solver="lda")
    means = torch.stack([x[y == j].mean(0) for j in range(num_e)])
    centred = x - means[y]
    cov = centred.T @ centred / len(x)
    shrunk = 0.8 * cov + 0.2 * cov.diagonal().mean() * torch.eye(5, dtype=torch.float64)
    w = torch.linalg.solve(shrunk, means.T)
    torch.testing.assert_close(routers[0].weight_EF, w.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        routers[0].bias_E, -0.5 * (means * w.T).sum(1), rtol=1e-8, atol=1e-10
    )


def test_routing_spec_presets_and_overrides():
    assert resolve_routing() == PRESETS[DEFAULT_PRESET]  # the one default (docs/routing.md)
    spec = resolve_routing("paper", lam=AUTO)
    assert spec.lam == AUTO and spec.holdout_fraction == 0.1 and spec.preset is None
    assert resolve_routing("paper", lam=1e-2, top_k=1).preset == "paper"
    assert resolve_routing("paper", solver="lda").lam == AUTO  # λ means shrinkage there
    assert PRESETS["context"].holdout_smoothings()[0] == 0.0
    with pytest.raises(ValueError, match="holdout_fraction"):
        RoutingSpec(lam=AUTO)
    with pytest.raises(ValueError, match="preset"):
        resolve_routing("fancy")
    from dume_dist.cli import build as cli_build
    from dume_dist.model import modeling_dume
    from dume_dist.model.routing import ROUTING_SOLVERS

    assert cli_build.ROUTING_PRESETS == tuple(PRESETS)
    assert cli_build.ROUTING_FEATURES == modeling_dume.ROUTING_FEATURES
    assert cli_build.ROUTING_SOLVERS == ROUTING_SOLVERS == modeling_dume.ROUTING_SOLVERS


# -- end to end on tiny experts: build, eval + heatmap, save -> load without dume_dist ----------


def tiny_build(root: Path, routing: str):
    """The tiny three-domain world and a build of it with ``routing``."""
    from tiny_world import make_world

    from dume_dist.model.build import build_dume

    world = make_world(root / "world", num_docs=20)
    result = build_dume(
        world["experts"], world["data"], root / "model", routing=routing,
        max_tokens_per_seq=48, batch_size=4, progress=False, save_stats=root / "kept",
    )  # fmt: skip
    return world, result


@pytest.fixture(scope="module")
def context_build(tmp_path_factory):
    return tiny_build(tmp_path_factory.mktemp("routing"), "context")


def test_context_build_records_routing_and_evaluates_with_heatmap(context_build, tmp_path):
    from dume_dist.model.evaluate import compare, write_heatmap

    world, result = context_build
    manifest = json.loads((result.out_dir / "dume_manifest.json").read_text())
    config = json.loads((result.out_dir / "config.json").read_text())
    routing = manifest["routing"]
    assert manifest["feature_map"] == "prefix_mean" and routing["solver"] == "lda"
    sel = routing["selection"]
    assert sel["criterion"] == "error" and routing["lam"] in sel["lam_grid"]
    assert len(sel["curves"]["error"]) == len(sel["smoothing_grid"])
    assert config["routing"]["features"] == "prefix_mean"
    assert config["routing"].get("smoothing", 0.0) == routing["smoothing"]
    assert all(s.feature_map == "prefix_mean" for s in result.stats.values())
    held_files = sorted((result.out_dir.parent / "kept").rglob("holdout-*.safetensors"))
    assert len(held_files) == 3 * len(PRESETS["context"].holdout_smoothings())
    table = compare(result.out_dir, world["data"], seq_len=24, batch_size=4, max_eval_tokens=400)
    acc = table.routing_accuracy["dume k=1"]
    assert set(acc) == set(world["experts"]) and all(len(a) == 2 for a in acc.values())
    assert min(sum(a) / len(a) for a in acc.values()) > 0.6  # chance: 1/3
    png = tmp_path / "heatmap.png"
    write_heatmap(table, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


LOAD_AND_GENERATE = textwrap.dedent(
    """
    import os, sys
    sys.modules["dume_dist"] = None  # any import of dume_dist now fails
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, inputs_path, out_path = sys.argv[1:]
    ids, mask = torch.load(inputs_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    cached = model.generate(ids, attention_mask=mask, use_cache=True, **kw)
    full = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    torch.save({"logits": logits, "cached": cached, "full": full,
                "module": type(model).__module__}, out_path)
    """
)


def check_loads_and_generates_without_dume_dist(model, model_dir, tmp_path) -> None:
    """In a fresh interpreter where importing dume_dist fails, the saved model loads through
    ``trust_remote_code``, gives ``model``'s logits, and generates the same with and without a
    KV cache."""
    ids_BT, mask_BT = _left_padded(batch=2, length=6)
    ids_BT = ids_BT.clamp(max=model.config.vocab_size - 1)
    torch.save((ids_BT, mask_BT), tmp_path / "in.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    env.pop("PYTHONPATH", None)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    args = [str(model_dir), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")]
    run = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert "dume_dist" not in out["module"]
    assert torch.equal(out["cached"], out["full"])
    with torch.no_grad():
        here = model(ids_BT, attention_mask=mask_BT).logits
    real = mask_BT.bool()
    torch.testing.assert_close(out["logits"][real], here[real], rtol=1e-5, atol=1e-5)
    assert Path(model_dir, "modeling_dume.py").is_file()


def test_context_model_loads_and_generates_without_dume_dist(context_build, tmp_path):
    _, result = context_build
    model = DumeForCausalLM.from_pretrained(result.out_dir).eval()
    assert model.moe_blocks()[0].features == "prefix_mean"
    check_loads_and_generates_without_dume_dist(model, result.out_dir, tmp_path)
