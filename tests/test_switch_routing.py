"""The n-gram router with a switch rate (``routing.ngram.switch``, preset ``switch``) and with a
mixture of switch rates (``routing.ngram.switch_rates``, preset ``follow``, the default).

Pinned to references: the forward filter of the switching chain computed position by position
(the scan must equal it, whole or in pieces, with padding), the cumulative naive Bayes (rate 0),
Bayesian model averaging of separate filters by their predictive likelihoods (the mixture's joint
scan must equal it), a full forward without cache (cached generation must match it), and a solve
that never had a contributor (removing one must give the same tables and the same chosen rate).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_ngram_routing import _ngram_model
from test_routing import _left_padded
from tiny_world import make_world

from dume_dist.core.ngram import NgramStats
from dume_dist.model.build import build_dume
from dume_dist.model.modeling_dume import fixed_share_posterior, switch_mixture_posterior
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


def _averaged_filters_reference(logp_BTE, real_BT, rates):
    """Each rate's filter on its own, with the log-likelihood of the tokens so far under it
    (sum of log predictive probabilities); the posterior over experts is their average weighted
    by prior x likelihood (uniform prior over rates)."""
    batch, length, num = logp_BTE.shape
    posts, loglik = [], []
    for rate in rates:
        move = torch.full((num, num), rate / (num - 1), dtype=torch.float64)
        move.fill_diagonal_(1 - rate)
        post = torch.full((batch, num), 1 / num, dtype=torch.float64)
        ll = torch.zeros(batch, dtype=torch.float64)
        row_post, row_ll = [], []
        for t in range(length):
            new = logp_BTE[:, t].exp() * (post @ move)
            real = real_BT[:, t]
            ll = torch.where(real, ll + new.sum(-1).log(), ll)
            post = torch.where(real[:, None], new / new.sum(-1, keepdim=True), post)
            row_post.append(post)
            row_ll.append(ll)
        posts.append(torch.stack(row_post, 1))
        loglik.append(torch.stack(row_ll, 1))
    weight_BTR = torch.stack(loglik, -1).softmax(-1)
    return (weight_BTR[..., None] * torch.stack(posts, 2)).sum(2).log()


@pytest.mark.parametrize("rates", [(0.0, 1e-4, 1e-3, 1e-2), (0.3,), (0.0, 0.2)])
def test_switch_mixture_equals_averaged_filters_whole_and_in_pieces(rates):
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(3, 45, 4, generator=g, dtype=torch.float64) * 3 - 5
    real = torch.ones(3, 45, dtype=torch.bool)
    real[1, 30:] = False
    real[2, 7] = False
    real[0, :3] = False  # left padding
    joint = switch_mixture_posterior(logp, real, rates)
    assert joint.shape == (3, 45, len(rates), 4)
    reference = _averaged_filters_reference(logp, real, rates)
    torch.testing.assert_close(joint.logsumexp(2), reference, rtol=0, atol=1e-9)
    pieces, state = [], None
    for lo, hi in ((0, 17), (17, 18), (18, 19), (19, 45)):  # one-token steps: the decode path
        part = switch_mixture_posterior(logp[:, lo:hi], real[:, lo:hi], rates, state)
        pieces.append(part)
        state = part[:, -1]
    torch.testing.assert_close(torch.cat(pieces, 1), joint, rtol=0, atol=1e-9)
    if len(rates) == 1:
        torch.testing.assert_close(joint[:, :, 0], fixed_share_posterior(logp, real, rates[0]))


@pytest.mark.parametrize("length", [1, 2, 63, 300, 1100])
def test_switch_mixture_scan_blocks_at_every_length(length):
    """The scan's block size grows with the length (4 to 16 positions): every size, with a last
    block cut short and padding inside blocks, equals the filters run position by position."""
    g = torch.Generator().manual_seed(length)
    rates = (0.0, 1e-3, 1e-1)
    logp = torch.randn(2, length, 3, generator=g, dtype=torch.float64) * 4
    real = torch.rand(2, length, generator=g) > 0.15
    joint = switch_mixture_posterior(logp, real, rates)
    reference = _averaged_filters_reference(logp, real, rates)
    torch.testing.assert_close(joint.logsumexp(2), reference, rtol=0, atol=1e-9)


def _switch_model(rate=0.05, k=1, seed=0, rates=None, scale=1.0):
    model = _ngram_model(k, seed=seed)
    ngram = model.config.routing["ngram"]
    if rates is None:
        model.ngram_router.switch = rate
        ngram["switch"] = rate
    else:
        model.ngram_router.switch_rates = tuple(rates)
        ngram["switch_rates"] = list(rates)
    if scale != 1.0:
        model.ngram_router.evidence_scale = scale
        ngram["evidence_scale"] = scale
    type(model.config)(**model.config.to_dict())  # the config is sound
    return model


@pytest.mark.parametrize(
    "k, mixture", [(1, False), (2, False), (1, True), (2, True)], ids=["1", "2", "1-mix", "2-mix"]
)
def test_switch_cached_generation_equals_full_forward(k, mixture):
    if mixture:
        model = _switch_model(k=k, rates=(0.0, 1e-3, 0.05), scale=0.5)
    else:
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


def test_evidence_scale_tempers_the_mixture_scores():
    ids_BT, mask_BT = _left_padded()
    plain = _switch_model(rates=(0.0, 0.01)).ngram_router.scores(ids_BT, mask_BT.bool())[0]
    half = _switch_model(rates=(0.0, 0.01), scale=0.5).ngram_router.scores(ids_BT, mask_BT.bool())
    router = _switch_model(rates=(0.0, 0.01)).ngram_router
    router.evidence_scale = 0.5
    torch.testing.assert_close(router.scores(ids_BT, mask_BT.bool())[0], half[0])
    assert not torch.allclose(plain, half[0])
    cumulative = _switch_model(rates=(0.0,), scale=0.5).ngram_router
    scores = cumulative.scores(ids_BT, mask_BT.bool())[0]
    base = _ngram_model(1).ngram_router.scores(ids_BT, mask_BT.bool())[0]
    torch.testing.assert_close(scores, (0.5 * base).log_softmax(-1), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "ngram, match",
    [({"switch_rates": [0.0, 0.6]}, r"routing.ngram.switch_rates must be in \[0.0, 0.5\)"),
     ({"switch_rates": [0.0] * 9}, "at most 8"),
     ({"switch_rates": []}, "must not be empty"),
     ({"switch_rates": "0,1e-3"}, "must be a list of numbers"),
     ({"switch_rates": [0.0, 1e-3], "switch": 0.01}, "give one of them, not both"),
     ({"evidence_scale": 0.0}, r"routing.ngram.evidence_scale: evidence_scale must be in"),
     ({"evidence_scale": 1.5}, "evidence_scale must be in"),
     ({"evidence_scale": "auto"}, "must be a number, got 'auto'")],
)  # fmt: skip
def test_a_bad_mixture_in_a_checkpoint_config_is_refused_naming_the_key(ngram, match):
    model = _ngram_model(1)
    config = model.config.to_dict()
    config["routing"]["ngram"].update(ngram)
    with pytest.raises(ValueError, match=match):
        type(model.config)(**config)


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


def test_the_default_build_follows_switches_with_fixed_rates(tmp_path):
    from dume_dist.model.routing_options import (
        FOLLOW_EVIDENCE_SCALE,
        FOLLOW_SAMPLE,
        FOLLOW_SWITCH_RATES,
    )

    assert PRESETS["follow"] == resolve_routing(None)
    world = make_world(tmp_path, num_docs=30)
    result = build_dume(world["experts"], world["data"], tmp_path / "model", progress=False)
    ngram = json.loads((result.out_dir / "config.json").read_text())["routing"]["ngram"]
    assert ngram["switch_rates"] == list(FOLLOW_SWITCH_RATES) and "switch" not in ngram
    assert ngram["evidence_scale"] == FOLLOW_EVIDENCE_SCALE
    routing = result.manifest["routing"]
    assert routing["ngram_sample"] == FOLLOW_SAMPLE > 0  # the experts' own text counted
    assert all(0 < n < result.num_tokens[e] for e, n in result.sampled_tokens.items())
    assert routing["switch_rates"] == list(FOLLOW_SWITCH_RATES)
    assert routing["switch_selection"] is None  # nothing chosen: the rates are fixed
    with pytest.raises(ValueError, match="give one of them, not both"):
        resolve_routing("follow", switch="auto")


@pytest.mark.parametrize("routing", [None, "context"], ids=["default", "context"])
def test_a_checkpoint_trains_with_and_without_gradient_checkpointing(tmp_path, routing):
    """A user's loss outside ``torch.no_grad()`` (or fine-tuning): the tables load as parameters
    that want grad, and the filter's blocked scan (64 positions) must not be traced by autograd;
    the experts get gradients, the count tables none; with gradient checkpointing, the same
    gradients (``context`` routing too, whose per-layer running state a replay must not read)."""
    from transformers import AutoModelForCausalLM

    world = make_world(tmp_path, num_docs=30)
    build_dume(world["experts"], world["data"], tmp_path / "model", progress=False, routing=routing)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True)
    model.train()
    ids = torch.randint(4, 200, (2, 64), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith("ngram_router."))
    mlp = [g for n, g in grads.items() if ".mlp." in n and "router" not in n]
    assert mlp and all(g is not None and torch.isfinite(g).all() for g in mlp)
    with torch.no_grad():  # the same scores either way
        torch.testing.assert_close(model(ids, labels=ids).loss, out.loss)

    # Gradient checkpointing: the backward recomputes each layer after forward has cleared its
    # routing context, and here after a second forward has set its own: the same gradients.
    other = torch.randint(4, 200, (3, 40), generator=torch.Generator().manual_seed(1))

    def grads_of(checkpointing: bool) -> dict:
        model.zero_grad()
        new = hasattr(model, "activation_checkpointing_enable")  # the name from transformers 5.x
        if checkpointing:
            (
                model.activation_checkpointing_enable
                if new
                else model.gradient_checkpointing_enable
            )()
        try:
            first, second = model(ids, labels=ids).loss, model(other, labels=other).loss
            (first + 2 * second).backward()
        finally:
            (
                model.activation_checkpointing_disable
                if new
                else model.gradient_checkpointing_disable
            )()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, replayed = grads_of(False), grads_of(True)
    assert plain.keys() == replayed.keys() and len(plain) > 10
    for name, grad in plain.items():
        torch.testing.assert_close(replayed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_statistics_that_serve_follow_alone_choose_a_rate_instead():
    # the routing bench collects once per identity for the widest spec: with `follow` the first
    # n-gram option it used to ask for switch "auto" beside fixed switch_rates and stop
    from dume_dist.bench.routing import _stats_key, _widest

    wide = _widest([PRESETS["paper"], PRESETS["follow"]], 0.1)
    ngram = wide[_stats_key(PRESETS["follow"])]
    assert ngram.switch == "auto" and ngram.switch_rates is None and ngram.needs_holdout
    assert ngram.feature_map == PRESETS["follow"].feature_map


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
