"""The n-gram router with a switch rate (``routing.ngram.switch``, preset ``switch``).

Pinned to references: the forward filter of the switching chain computed position by position
(the scan must equal it, whole or in pieces, with padding), the cumulative naive Bayes (rate 0),
a full forward without cache (cached generation must match it), and a solve that never had a
contributor (removing one must give the same tables and the same chosen rate).
"""

from __future__ import annotations

import pytest
import torch
from test_ngram_routing import _ngram_model
from test_routing import _left_padded
from tiny_world import make_world

from dume_dist.core.ngram import NgramStats
from dume_dist.model.build import build_dume
from dume_dist.model.modeling_dume import fixed_share_posterior
from dume_dist.model.ngram_select import DEFAULT_SWITCH_GRID
from dume_dist.model.routing import PRESETS, RoutingSpec, resolve_routing, solve_routing

torch.set_num_threads(1)


def _filter_reference(logp_BTE, real_BT, rate):
    batch, length, num = logp_BTE.shape
    move = torch.full((num, num), rate / (num - 1), dtype=torch.float64)
    move.fill_diagonal_(1 - rate)
    post = torch.full((batch, num), 1 / num, dtype=torch.float64)
    out = []
    for t in range(length):
        new = logp_BTE[:, t].exp() * (post @ move)
        post = torch.where(real_BT[:, t, None], new / new.sum(-1, keepdim=True), post)
        out.append(post.log())
    return torch.stack(out, 1)


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.3])
def test_fixed_share_scan_equals_the_filter_whole_and_in_pieces(rate):
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(3, 45, 4, generator=g, dtype=torch.float64) * 3 - 5
    real = torch.ones(3, 45, dtype=torch.bool)
    real[1, 30:] = False
    real[2, 7] = False
    whole = fixed_share_posterior(logp, real, rate)
    torch.testing.assert_close(whole, _filter_reference(logp, real, rate), rtol=0, atol=1e-10)
    first = fixed_share_posterior(logp[:, :17], real[:, :17], rate)
    rest = fixed_share_posterior(logp[:, 17:], real[:, 17:], rate, first[:, -1])
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=0, atol=1e-10)
    if rate == 0:
        cumulative = (logp * real[..., None]).cumsum(1).log_softmax(-1)
        torch.testing.assert_close(whole, cumulative, rtol=0, atol=1e-10)


def _switch_model(rate=0.05, k=1, seed=0):
    model = _ngram_model(k, seed=seed)
    model.ngram_router.switch = rate
    model.config.routing["ngram"]["switch"] = rate
    return model


@pytest.mark.parametrize("k", [1, 2])
def test_switch_cached_generation_equals_full_forward(k):
    model = _switch_model(k=k)
    ids_BT, mask_BT = _left_padded()
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(ids_BT, attention_mask=mask_BT, use_cache=True, **kw)
    full = model.generate(ids_BT, attention_mask=mask_BT, use_cache=False, **kw)
    assert torch.equal(cached, full)
    mask = (cached != 0).long()
    mask[:, : mask_BT.shape[1]] = mask_BT
    with torch.no_grad():
        whole = model(cached, attention_mask=mask).logits
        out = model(cached[:, :4], attention_mask=mask[:, :4], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(4, cached.shape[1]):
            out = model(cached[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
            steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], whole[real], rtol=1e-5, atol=1e-5)


def test_switch_rate_is_refused_out_of_range_or_without_ngram():
    with pytest.raises(ValueError, match="switch"):
        RoutingSpec(features="ngram", solver="nb", switch=0.7)
    with pytest.raises(ValueError, match="needs ngram features"):
        RoutingSpec(switch=0.01)
    spec = resolve_routing("ngram", switch="auto")
    assert spec.needs_holdout and spec.holdout_fraction > 0
    with pytest.raises(ValueError, match=r"routing.ngram.switch"):
        model = _switch_model()
        model.config.routing["ngram"]["switch"] = 0.9
        type(model.config)(**model.config.to_dict())


@pytest.fixture(scope="module")
def world_stats(tmp_path_factory):
    root = tmp_path_factory.mktemp("switch")
    world = make_world(root, num_docs=30)
    result = build_dume(
        world["experts"], world["data"], root / "model", routing="switch", progress=False
    )
    return world, result


def test_switch_build_chooses_a_rate_and_records_it(world_stats):
    _, result = world_stats
    assert result.routing.switch in DEFAULT_SWITCH_GRID
    sel = result.routing.switch_selection
    curve = sel.curves["switch_logloss"][0]
    assert (
        len(curve) == len(DEFAULT_SWITCH_GRID) and min(curve) == curve[sel.lam_grid.index(sel.lam)]
    )
    # disjoint vocabularies: single bigrams tell the domains apart, switching pays
    assert result.routing.switch > 0
    config = result.out_dir / "config.json"
    assert f'"switch": {result.routing.switch!r}' in config.read_text().replace("\n", "")
    assert result.manifest["routing"]["switch_selection"]["criterion"] == "switch_logloss"


def test_removing_a_contributor_gives_the_solve_that_never_had_it(world_stats):
    _, result = world_stats
    spec = PRESETS["switch"]
    fit = {n: result.stats[n] for n in result.stats}
    held = {n: result.holdout_stats[0.0][n] for n in result.holdout_stats[0.0]}
    names = sorted(fit)
    extra_fit = fit[names[0]] + fit[names[1]]
    extra_held = held[names[0]] + held[names[1]]
    assert isinstance(extra_fit, NgramStats)
    index = {n: j for j, n in enumerate(names)}
    without = solve_routing(
        spec, {n: (index[n], fit[n]) for n in names[:2]}, 2,
        {0.0: {n: (index[n], held[n]) for n in names[:2]}},
    )  # fmt: skip
    joined = {**{n: (index[n], fit[n]) for n in names[:2]}, "x": (0, extra_fit)}
    joined_held = {**{n: (index[n], held[n]) for n in names[:2]}, "x": (0, extra_held)}
    removed_fit = {**joined, "x": (0, joined["x"][1] - extra_fit)}
    removed_held = {**joined_held, "x": (0, joined_held["x"][1] - extra_held)}
    after = solve_routing(spec, removed_fit, 2, {0.0: removed_held})
    assert after.switch == without.switch and after.lam == without.lam
    assert torch.equal(after.routers.bigram_EH, without.routers.bigram_EH)
