"""Equal (class-balanced) priors of the linear routers: claimed volume buys no traffic.

Pinned to references: the solve as it was before priors existed (``tokens`` must reproduce it bit
for bit), explicit sample-weighted ridge regression and the explicit mean-of-class-covariances
discriminant (``equal``), and a solve that never had a contribution (removal must give its
routers bit for bit).
"""

from __future__ import annotations

import pytest
import torch

from dume_dist.core.private import lam_floor
from dume_dist.core.select import default_lam_grid, select_routing
from dume_dist.core.solve import (
    normal_equations,
    router_from_solution,
    solve_layer,
    solve_routers,
)
from dume_dist.core.stats import GramAccumulator, RouterStats, sum_stats
from dume_dist.model.routing import PRESETS, RoutingSpec, resolve_routing, solve_routing
from dume_dist.model.routing_dume import validate_routing
from dume_dist.model.stats_files import StatsFiles, contributions

torch.set_num_threads(1)
L, F = 2, 5
COUNTS = (40, 400, 120)  # unbalanced on purpose: tokens priors favour class 1


def _class_data(seed: int, label: int, n: int):
    g = torch.Generator().manual_seed(seed)
    centre = torch.zeros(F, dtype=torch.float64)
    centre[label] = 1.0
    return centre + torch.randn(n, F, generator=g, dtype=torch.float64) * (1 + 0.3 * label)


def _gram(x_NF: torch.Tensor) -> RouterStats:
    acc = GramAccumulator(L, F)
    for layer in range(L):
        acc.add(layer, x_NF * (1 + layer))
    return acc.result()


def _problem(seed: int = 0):
    data = [_class_data(seed + j, j, n) for j, n in enumerate(COUNTS)]
    return data, {f"c{j}": (j, _gram(x)) for j, x in enumerate(data)}


def _scaled(stats: RouterStats, factor: float) -> RouterStats:
    return stats.with_meta(gram_LPP=stats.gram_LPP * factor)


def _same(r0, r1) -> bool:
    return all(torch.equal(a.weight_EF, b.weight_EF) and torch.equal(a.bias_E, b.bias_E)
               for a, b in zip(r0, r1))  # fmt: skip


def _close(r0, r1, rtol=1e-10) -> None:
    for a, b in zip(r0, r1):
        torch.testing.assert_close(a.weight_EF, b.weight_EF, rtol=rtol, atol=1e-12)
        torch.testing.assert_close(a.bias_E, b.bias_E, rtol=rtol, atol=1e-12)


def test_tokens_priors_reproduce_the_solve_bit_for_bit():
    """The solve before priors: A = the canonical sum, B = per-expert last columns, summed in
    sorted-name order (written out here, independently of normal_equations)."""
    _, contribs = _problem()
    contribs["d"] = (1, _gram(_class_data(9, 1, 77)))  # two contributions for expert 1
    a_LPP = sum_stats({k: v[1] for k, v in contribs.items()}).gram_LPP
    b_LPE = torch.zeros(L, F + 1, 3, dtype=torch.float64)
    for name in sorted(contribs):
        j, st = contribs[name]
        b_LPE[:, :, j] += st.gram_LPP[:, :, -1]
    for solver, lam in (("ridge", 1e-2), ("lda", 0.1)):
        want = [router_from_solution(solve_layer(a, b, lam, solver), solver)
                for a, b in zip(a_LPP, b_LPE)]  # fmt: skip
        assert _same(solve_routers(contribs, 3, lam=lam, solver=solver), want)
        assert _same(solve_routers(contribs, 3, lam=lam, solver=solver, priors="tokens"), want)
    assert PRESETS["paper"].priors == "tokens"
    paper = solve_routing(PRESETS["paper"], contribs, 3)
    assert _same(paper.routers, solve_routers(contribs, 3, lam=1e-2))
    assert "priors" not in paper.config_routing()  # the paper's config is as it was
    assert paper.manifest_routing()["priors"] == "tokens"


@pytest.mark.parametrize("solver,lam", [("ridge", 1e-2), ("lda", 0.1)])
def test_claimed_volume_buys_nothing_under_equal_priors(solver, lam):
    _, contribs = _problem()
    honest_eq = solve_routers(contribs, 3, lam=lam, solver=solver, priors="equal")
    honest_tok = solve_routers(contribs, 3, lam=lam, solver=solver)
    for factor in (8.0, 10.0):
        forged = {**contribs, "c0": (0, _scaled(contribs["c0"][1], factor))}
        eq = solve_routers(forged, 3, lam=lam, solver=solver, priors="equal")
        if factor == 8.0:  # a power of two scales and divides exactly
            assert _same(eq, honest_eq)
        else:
            _close(eq, honest_eq)
        tok = solve_routers(forged, 3, lam=lam, solver=solver)
        assert not torch.allclose(tok[0].bias_E, honest_tok[0].bias_E, rtol=1e-3)


def test_equal_ridge_is_sample_weighted_least_squares():
    """``(A' + λI)⁻¹ B'`` minimises ``Σ_t |x̃_t W − y_t|² / n_{class(t)} + λ|W|²``."""
    data, contribs = _problem(3)
    lam = 0.05
    xt = torch.cat([torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1) for x in data])
    y = torch.cat([torch.full((len(x),), j) for j, x in enumerate(data)])
    w_N = torch.cat([torch.full((len(x),), 1.0 / len(x), dtype=torch.float64) for x in data])
    onehot = torch.nn.functional.one_hot(y, 3).double()
    a = xt.T @ (w_N[:, None] * xt) + lam * torch.eye(F + 1, dtype=torch.float64)
    want_PE = torch.linalg.solve(a, xt.T @ (w_N[:, None] * onehot))
    a_LPP, b_LPE = normal_equations(contribs, 3, priors="equal")
    torch.testing.assert_close(solve_layer(a_LPP[0], b_LPE[0], lam), want_PE, rtol=1e-9, atol=1e-12)
    assert torch.equal(b_LPE[:, -1], torch.ones(L, 3, dtype=torch.float64))


def test_equal_lda_pools_the_class_covariances_equally():
    data, contribs = _problem(5)
    shrink = 0.2
    means = torch.stack([x.mean(0) for x in data])
    cov = sum((x - x.mean(0)).T @ (x - x.mean(0)) / len(x) for x in data) / 3
    shrunk = (1 - shrink) * cov + shrink * cov.diagonal().mean() * torch.eye(F, dtype=torch.float64)
    w = torch.linalg.solve(shrunk, means.T)
    (router, _) = solve_routers(contribs, 3, lam=shrink, solver="lda", priors="equal")
    torch.testing.assert_close(router.weight_EF, w.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(router.bias_E, -0.5 * (means * w.T).sum(1), rtol=1e-8, atol=1e-10)


def test_an_experts_contributions_are_summed_before_normalising():
    data, contribs = _problem(7)
    x1 = data[1]
    split = {**contribs, "c1": (1, _gram(x1[:100])), "c1b": (1, _gram(x1[100:]))}
    _close(solve_routers(split, 3, priors="equal"), solve_routers(contribs, 3, priors="equal"),
           rtol=1e-9)  # fmt: skip
    # Per contribution normalisation would weigh expert 1 twice: it is not what is solved.
    halves = {**contribs, "c1": (1, _gram(x1[:200])), "c1b": (1, _gram(x1[200:]))}
    a_eq, _ = normal_equations(halves, 3, priors="equal")
    assert float(a_eq[0, -1, -1]) == 3.0


def test_unlearning_is_exact_under_equal_priors_with_lazy_statistics(tmp_path):
    _, contribs = _problem(11)
    contribs["c1b"] = (1, _gram(_class_data(12, 1, 60)))
    files = StatsFiles(tmp_path / "stats")
    for name, (_, st) in sorted(contribs.items()):
        files.put(name, st)
    index = {n: j for n, (j, _) in contribs.items()}
    lazy = contributions(files, index)
    assert lazy.expert_of("c1b") == 1
    for solver, lam in (("ridge", 1e-2), ("lda", 0.1)):
        grown = solve_routers(lazy, 3, lam=lam, solver=solver, priors="equal")
        assert _same(grown, solve_routers(contribs, 3, lam=lam, solver=solver, priors="equal"))
        kept = {n: v for n, v in contribs.items() if n != "c1b"}
        files_kept = StatsFiles(tmp_path / f"kept-{solver}")
        for name, (_, st) in sorted(kept.items()):
            files_kept.put(name, st)
        never = solve_routers(kept, 3, lam=lam, solver=solver, priors="equal")
        removed = solve_routers(contributions(files_kept, index), 3, lam=lam, solver=solver,
                                priors="equal")  # fmt: skip
        assert _same(never, removed) and not _same(never, grown)


def test_auto_lambda_under_equal_priors_is_invariant_to_claimed_volume():
    _, fit = _problem(13)
    _, held = _problem(17)
    sel = select_routing(fit, {0.0: held}, 3, solver="ridge", priors="equal")
    assert sel.lam_grid == list(default_lam_grid("ridge", "equal"))
    assert sel.num_holdout_tokens == sum(COUNTS)
    # A λ inside the grid wins: the held-out loss is not flat and not monotone here.
    curve = sel.curves["ridge_loss"][0]
    assert min(curve) < curve[0] and min(curve) < curve[-1]
    forged_fit = {**fit, "c0": (0, _scaled(fit["c0"][1], 8.0))}
    forged_held = {**held, "c0": (0, _scaled(held["c0"][1], 8.0))}
    again = select_routing(forged_fit, {0.0: forged_held}, 3, solver="ridge", priors="equal")
    assert again.lam == sel.lam and again.curves == sel.curves
    tokens = select_routing(forged_fit, {0.0: forged_held}, 3, solver="ridge")
    assert tokens.curves != select_routing(fit, {0.0: held}, 3, solver="ridge").curves


def test_private_lambda_floor_follows_the_normalised_noise():
    from dume_dist.core.dp import min_ridge_lam

    _, contribs = _problem()
    sigma = 3.0
    private = {
        n: (j, st.with_meta(extra={"dp": _guarantee(sigma)})) for n, (j, st) in contribs.items()
    }
    want = min_ridge_lam([sigma / n for n in COUNTS], F + 1)
    assert lam_floor(private, 3, "ridge", "equal") == pytest.approx(want, rel=1e-12)
    assert lam_floor(private, 3, "ridge") == pytest.approx(min_ridge_lam([sigma] * 3, F + 1))


def _guarantee(sigma: float) -> dict:
    from dume_dist.core import dp

    return dp.Guarantee(
        epsilon=8.0, delta=1e-6, unit="sequence", noise_multiplier=1.0, num_releases=3,
        sensitivity={"gram": 1.0, "count": 1.0}, sigma={"gram": sigma, "count": sigma},
        clip=1.0, count_cap=None,
    ).to_json()  # fmt: skip


def test_priors_option_is_checked_everywhere_with_one_line_errors():
    assert RoutingSpec(priors="equal").priors == "equal"
    assert resolve_routing("paper", priors="equal").priors == "equal"
    assert resolve_routing("paper", priors="equal").replace(priors="tokens") == PRESETS[
        "paper"
    ].replace(preset=None)
    bad = [
        (lambda: RoutingSpec(priors="volume"), "priors must be one of"),
        (lambda: resolve_routing("ngram", priors="equal"), "linear"),
        (lambda: normal_equations({"a": (0, _gram(_class_data(0, 0, 9)))}, 1, "x"), "priors"),
        (lambda: validate_routing({"features": "token", "priors": "flat"}), "routing.priors"),
    ]
    for call, words in bad:
        with pytest.raises(ValueError, match=words) as err:
            call()
        assert "\n" not in str(err.value)
    validate_routing({"kind": "linear", "features": "token", "priors": "equal"})


def test_priors_flag_reaches_the_build_spec():
    import argparse

    from dume_dist.cli.build import add_routing_flags, routing_settings, routing_spec

    p = argparse.ArgumentParser()
    add_routing_flags(p, holdout_owner="contributor")
    args = p.parse_args(["--routing", "paper", "--priors", "equal"])
    assert routing_settings(args)["priors"] == "equal"
    assert routing_spec(args).priors == "equal"
    with pytest.raises(SystemExit):
        p.parse_args(["--priors", "volume"])


def test_coordinator_settings_carry_the_priors():
    from dume_dist.distributed.artifacts import routing_of
    from dume_dist.distributed.validation import check_settings

    stored = check_settings({"routing": "paper", "priors": "equal"})
    assert stored["routing"]["priors"] == "equal" and stored["feature_map"] == "token"
    assert routing_of(stored).priors == "equal"
    # A registry founded before priors existed keeps the paper's (its stored routing has none).
    older = check_settings({"routing": "context"})
    older["routing"].pop("priors")
    assert routing_of(older).priors == "tokens"
    for bad in ({"routing": "paper", "priors": "many"}, {"routing": "ngram", "priors": "equal"}):
        with pytest.raises(ValueError, match="priors") as err:
            check_settings(bad)
        assert "\n" not in str(err.value)
