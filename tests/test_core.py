"""Core math: statistics merge like values, the solve matches a least-squares reference."""

import subprocess
import sys

import pytest
import torch

from dume_dist.core.solve import normal_equations, ridge_solve, solve_routers
from dume_dist.core.stats import (
    GramAccumulator,
    load_stats,
    save_stats,
    sum_stats,
    unpack_symmetric,
    validate_gram,
)
from dume_dist.core.stats import gram_from_bytes as stats_from_bytes
from dume_dist.core.stats import gram_to_bytes as stats_to_bytes

L, F = 3, 8


def _stats(seed, n=200, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    acc = GramAccumulator(L, F)
    for layer in range(L):
        acc.add(layer, torch.randn(n, F, generator=g) + shift * (layer + 1))
    return acc.result()


def test_gram_matches_explicit_definition():
    x = torch.randn(50, F, dtype=torch.float64)
    acc = GramAccumulator(1, F)
    acc.add(0, x)
    xt = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(acc.result().gram_LPP[0], xt.T @ xt, rtol=1e-12, atol=1e-10)
    assert acc.result().num_tokens == 50


def test_shard_and_sum_equals_all_at_once():
    x = torch.randn(1000, F, generator=torch.Generator().manual_seed(0))
    whole = GramAccumulator(1, F)
    whole.add(0, x)
    shards = [GramAccumulator(1, F) for _ in range(4)]
    for i, chunk in enumerate(x.chunk(4)):
        for piece in chunk.chunk(3):
            shards[i].add(0, piece)
    summed = sum_stats({f"s{i}": s.result() for i, s in enumerate(shards)})
    # fp32 block products differ per batch; the fp64 sums agree to fp32 product rounding.
    torch.testing.assert_close(summed.gram_LPP, whole.result().gram_LPP, rtol=1e-5, atol=1e-4)
    # The count and the sums of x are exact.
    assert summed.num_tokens == 1000
    torch.testing.assert_close(
        summed.gram_LPP[0, -1, :-1], x.double().sum(0), rtol=1e-12, atol=1e-9
    )


def test_canonical_order_is_bit_identical():
    parts = {f"node{i}": _stats(i) for i in range(5)}
    a = sum_stats(parts)
    b = sum_stats(dict(reversed(list(parts.items()))))
    assert torch.equal(a.gram_LPP, b.gram_LPP)
    # A naive arrival-order sum generally differs in the last bits; canonical does not.
    without = {k: v for k, v in parts.items() if k != "node2"}
    assert torch.equal(
        sum_stats(without).gram_LPP, sum_stats(dict(sorted(without.items()))).gram_LPP
    )


def test_padding_has_no_effect():
    from dume_dist.core.stats import GramAccumulator as Acc

    x = torch.randn(2, 6, F)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    padded = x.clone()
    padded[~mask] = 1e6  # garbage in padded slots
    a, b = Acc(1, F), Acc(1, F)
    a.add(0, x[mask])
    b.add(0, padded[mask])
    assert torch.equal(a.result().gram_LPP, b.result().gram_LPP)


def test_add_then_subtract_returns_previous_routers():
    base = {"a": (0, _stats(1, shift=1.0)), "b": (1, _stats(2, shift=-1.0))}
    before = solve_routers(base, 2, lam=1e-2)
    extra = _stats(3, shift=0.5)
    a_stats = base["a"][1]
    grown = {"a": (0, (a_stats + extra)), "b": base["b"]}
    shrunk = {"a": (0, (a_stats + extra) - extra), "b": base["b"]}
    after_add = solve_routers(grown, 2, lam=1e-2)
    after_sub = solve_routers(shrunk, 2, lam=1e-2)
    assert not torch.allclose(after_add[0].weight_EF, before[0].weight_EF)
    for r0, r1 in zip(before, after_sub):
        torch.testing.assert_close(r1.weight_EF, r0.weight_EF, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r1.bias_E, r0.bias_E, rtol=1e-9, atol=1e-12)
    # Re-summing without the contribution (what the coordinator does) is bit-exact.
    three = {"a": base["a"], "b": base["b"], "c": (1, extra)}
    two_again = {k: v for k, v in three.items() if k != "c"}
    for r0, r1 in zip(solve_routers(base, 2), solve_routers(two_again, 2)):
        assert torch.equal(r0.weight_EF, r1.weight_EF) and torch.equal(r0.bias_E, r1.bias_E)


def test_solve_equals_lstsq_on_explicit_ridge_problem():
    torch.manual_seed(0)
    lam = 0.3
    xs = [torch.randn(40, F, dtype=torch.float64) + i for i in range(3)]
    contribs = {}
    for i, x in enumerate(xs):
        acc = GramAccumulator(1, F)
        acc.add(0, x)
        contribs[f"c{i}"] = (i, acc.result())
    # Explicit problem: rows [x, 1] -> one-hot label, plus sqrt(lam)*I rows -> 0.
    x_all = torch.cat([torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1) for x in xs])
    y_all = torch.cat(
        [torch.nn.functional.one_hot(torch.full((40,), i), 3).double() for i in range(3)]
    )
    x_aug = torch.cat([x_all, lam**0.5 * torch.eye(F + 1, dtype=torch.float64)])
    y_aug = torch.cat([y_all, torch.zeros(F + 1, 3, dtype=torch.float64)])
    w_ref = torch.linalg.lstsq(x_aug, y_aug).solution
    a, b = normal_equations(contribs, 3)
    torch.testing.assert_close(ridge_solve(a[0], b[0], lam), w_ref, rtol=1e-8, atol=1e-10)
    router = solve_routers(contribs, 3, lam=lam)[0]
    norm = w_ref[:-1].norm(dim=0)
    torch.testing.assert_close(router.weight_EF, (w_ref[:-1] / norm).T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(router.bias_E, w_ref[-1] / norm, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(router.weight_EF.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_solve_without_bias_matches_lstsq():
    lam = 0.1
    xs = [torch.randn(30, F, dtype=torch.float64) + i for i in range(2)]
    contribs = {}
    for i, x in enumerate(xs):
        acc = GramAccumulator(1, F)
        acc.add(0, x)
        contribs[f"c{i}"] = (i, acc.result())
    x_all = torch.cat(xs)
    y_all = torch.cat(
        [torch.nn.functional.one_hot(torch.full((30,), i), 2).double() for i in range(2)]
    )
    w_ref = torch.linalg.lstsq(
        torch.cat([x_all, lam**0.5 * torch.eye(F, dtype=torch.float64)]),
        torch.cat([y_all, torch.zeros(F, 2, dtype=torch.float64)]),
    ).solution
    router = solve_routers(contribs, 2, lam=lam, bias=False)[0]
    assert router.bias_E is None
    torch.testing.assert_close(
        router.weight_EF, (w_ref / w_ref.norm(dim=0)).T, rtol=1e-8, atol=1e-10
    )


def test_serialisation_round_trip(tmp_path):
    s = _stats(7).with_meta(
        backbone_fingerprint="bb", expert_fingerprint="ex", extra={"domain": "x"}
    )
    data = stats_to_bytes(s)
    assert len(data) < s.gram_LPP.numel() * 8  # packed upper triangle
    back = stats_from_bytes(data)
    assert torch.equal(back.gram_LPP, s.gram_LPP)
    assert (back.backbone_fingerprint, back.expert_fingerprint, back.extra) == (
        "bb",
        "ex",
        {"domain": "x"},
    )
    save_stats(s, tmp_path / "s.safetensors")
    assert torch.equal(load_stats(tmp_path / "s.safetensors").gram_LPP, s.gram_LPP)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda g: g.float(), "float64"),
        (lambda g: g.__setitem__((0, 1, 1), float("nan")), "NaN"),
        (lambda g: g.__setitem__((0, 1, 2), 123.0), "symmetric"),
        (lambda g: g.__setitem__((1, -1, -1), 7.5), "token count"),
        (lambda g: g[:, :-1, :-1], None),
    ],
)
def test_bad_statistics_are_refused(mutate, message):
    g = _stats(0).gram_LPP.clone()
    out = mutate(g)
    g = out if isinstance(out, torch.Tensor) else g
    with pytest.raises(ValueError) as err:
        validate_gram(g, num_layers=L, feature_dim=F)
    if message:
        assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_corrupt_blob_is_refused():
    data = bytearray(stats_to_bytes(_stats(0)))
    with pytest.raises(ValueError, match="safetensors|schema|statistics"):
        stats_from_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError):
        unpack_symmetric(torch.zeros(2, 7), 4)


def test_feature_maps_and_backbones_do_not_mix():
    a = _stats(0)
    with pytest.raises(ValueError, match="feature map"):
        _ = a + a.with_meta(feature_map="ctx")
    with pytest.raises(ValueError, match="backbones"):
        _ = a.with_meta(backbone_fingerprint="x") + a.with_meta(backbone_fingerprint="y")


def test_expert_without_data_is_refused():
    with pytest.raises(ValueError, match="no statistics"):
        solve_routers({"a": (0, _stats(0))}, 2)


def test_core_and_model_import_no_ray_or_fsspec():
    code = (
        "import sys, dume_dist.core.stats, dume_dist.core.solve\n"
        "import importlib, pkgutil, dume_dist.model as m\n"
        "for info in pkgutil.iter_modules(m.__path__):\n"
        "    importlib.import_module('dume_dist.model.' + info.name)\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('ray', 'fsspec', 's3fs')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
