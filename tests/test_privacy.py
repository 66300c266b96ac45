"""Differential privacy of contributors' statistics, and what a build keeps out of a model:
noise of the stated scale, clipping bounds, the accountant against the closed form, the guarantee
in manifest and registry, no statistics in a model directory by default, ``--save-stats`` reuse,
exact unlearning of private statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dist_helpers import make_experts
from scipy.optimize import brentq
from scipy.special import ndtr

from dume_dist.core import dp
from dume_dist.core.ngram import NgramStats
from dume_dist.core.private import privatize
from dume_dist.core.stats import GramAccumulator
from dume_dist.model.routing import resolve_routing

BUILD = dict(max_tokens_per_seq=16, seq_len=16, max_tokens=240, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return make_experts(tmp_path_factory.mktemp("experts"))


def _gram(num_layers=3, p=24, tokens=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = GramAccumulator(num_layers, p - 1)
    for layer in range(num_layers):
        acc.add(layer, torch.randn(tokens, p - 1, generator=g, dtype=torch.float64))
    return acc.result(feature_map="token")


# -- mechanism ---------------------------------------------------------------------------------


def test_gram_noise_has_the_stated_scale_and_is_symmetric():
    fit = _gram(tokens=5000)  # well conditioned: making the noisy Gram PSD changes nothing
    noisy, _, g = privatize(fit, {}, dp.DpSpec(1.0, 1e-5), tokens_per_unit=1, clip=0.5, seed=7)
    sens_gram, sens_count = dp.gram_sensitivity(0.5, 1)
    assert g.sensitivity == {"gram": sens_gram, "count": sens_count}
    assert g.sigma["gram"] == pytest.approx(g.noise_multiplier * sens_gram)
    assert g.num_releases == fit.num_layers + 1
    noise_LPP = noisy.gram_LPP - fit.gram_LPP
    assert torch.equal(noisy.gram_LPP, noisy.gram_LPP.transpose(1, 2))
    rows, cols = torch.triu_indices(24, 24, offset=1)
    off = noise_LPP[:, rows, cols].flatten()  # 828 independent draws
    assert off.std().item() == pytest.approx(g.sigma["gram"], rel=0.08)
    assert abs(off.mean().item()) < 4 * g.sigma["gram"] / math.sqrt(off.numel())
    noisy.validate()  # well-formed: integer count shared by the layers, symmetric
    # Noise that dwarfs the data still gives Gram matrices (post-processing keeps them PSD).
    small = _gram(tokens=30)
    loud, _, _ = privatize(small, {}, dp.DpSpec(0.5, 1e-5), tokens_per_unit=8, clip=3.0, seed=1)
    assert (torch.linalg.eigvalsh(loud.gram_LPP) > -1e-6 * loud.gram_LPP.abs().max()).all()
    assert loud.gram_LPP[0, -1, -1] == loud.gram_LPP[1, -1, -1] >= 1
    assert noisy.extra["dp"]["epsilon"] == 1.0


def test_count_noise_has_the_stated_scale():
    counts = torch.full((20000,), 1000.0, dtype=torch.float64)
    noisy = dp.noisy_counts(counts, 3.0, dp.generator(1))
    assert (noisy - counts).std().item() == pytest.approx(3.0, rel=0.05)
    zeros = dp.noisy_counts(torch.zeros(20000, dtype=torch.float64), 3.0, dp.generator(2))
    assert (zeros > 0).float().mean().item() < 0.01  # the 3σ threshold keeps empty bins empty


def test_private_ngram_counts_are_valid_counts():
    g = torch.Generator().manual_seed(0)
    uni = torch.randint(0, 400, (50,), generator=g).double()
    ctx = (uni * 0.9).floor()
    big = torch.zeros(64, dtype=torch.float64)
    big[:10] = ctx.sum() / 10
    stats = NgramStats(uni, ctx, big)
    noisy, _, g = privatize(stats, {}, dp.DpSpec(2.0, 1e-6), tokens_per_unit=16, seed=3)
    noisy.validate()
    assert g.sigma["counts"] == pytest.approx(g.noise_multiplier * math.sqrt(3 * 4 * 16))
    with pytest.raises(ValueError, match="held-out bigrams"):
        held = stats.with_meta(pairs_K3=torch.tensor([[1, 2, 3]]), feature_map="")
        privatize(stats, {0.0: held}, dp.DpSpec(2.0, 1e-6), tokens_per_unit=16)
    with pytest.raises(ValueError, match="held-out curve needs the held-out bigrams"):
        curve = torch.tensor([-5.0, -4.0], dtype=torch.float64)
        held = stats.with_meta(curve_M=curve, curve_mu_M=torch.tensor([1.0, 10.0]).double(),
                               feature_map="")  # fmt: skip
        privatize(stats, {0.0: held}, dp.DpSpec(2.0, 1e-6), tokens_per_unit=16)


def test_clipping_bounds_hold():
    x = torch.randn(500, 16, dtype=torch.float64) * 5
    clipped = dp.clip_rows(x, 3.0)
    assert (clipped.norm(dim=1) <= 3.0 + 1e-12).all()
    small = x.norm(dim=1) <= 3.0
    assert torch.equal(clipped[small], x[small])
    ids = torch.tensor([5, 5, 5, 5, 5, 5, 1, 5, 5])
    unit = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1])
    counts = torch.ones(8, dtype=torch.float64)
    dp.add_capped_counts(counts, ids, unit, 4)
    assert counts.tolist() == [1, 2, 1, 1, 1, 7, 1, 1]
    dp.add_capped_counts(counts, ids, unit, None)  # uncapped: every entry counts
    assert counts.tolist() == [1, 3, 1, 1, 1, 15, 1, 1]
    # a unit of T tokens with norms <= C moves a layer's Gram by at most the stated sensitivity
    feats = dp.clip_rows(torch.randn(4, 7, dtype=torch.float64) * 9, 2.0)
    acc = GramAccumulator(1, 7)
    acc.add(0, feats)
    g = acc.gram_LPP[0].clone()
    g[-1, -1] = 0
    assert g.norm() <= dp.gram_sensitivity(2.0, 4)[0] + 1e-9


def test_collection_clips_every_token(experts):
    from transformers import AutoTokenizer

    from dume_dist.model.backbone import Backbone
    from dume_dist.model.build import expert_statistics
    from dume_dist.model.data import load_texts
    from dume_dist.model.experts import load_expert_specs
    from dume_dist.model.routing import PRESETS

    specs = load_expert_specs({"alpha": experts["alpha"]["expert"]})
    bb = Backbone.from_spec(f"base:{experts['base']}", specs)
    tok = AutoTokenizer.from_pretrained(str(experts["base"]))
    texts = load_texts([experts["alpha"]["data"]])
    spec = dp.DpSpec(4.0, 1e-5, clip=0.5)
    kw = dict(batch_size=4, seq_len=16, max_tokens_per_seq=16, progress=False)
    fit, _ = expert_statistics(bb, specs[0], tok, texts, PRESETS["paper"], dp=spec, dp_seed=0, **kw)
    raw, _ = expert_statistics(bb, specs[0], tok, texts, PRESETS["paper"], **kw)
    n = raw.num_tokens
    trace_L = torch.diagonal(raw.gram_LPP[:, :-1, :-1], dim1=1, dim2=2).sum(1)
    assert (trace_L > n * 0.5**2).all()  # the clip binds on this data...
    noise = fit.extra["dp"]["sigma"]["gram"] * (fit.feature_dim + 1)
    clipped_trace = torch.diagonal(fit.gram_LPP[:, :-1, :-1], dim1=1, dim2=2).sum(1)
    assert (clipped_trace <= n * 0.5**2 + 6 * noise).all()  # ...and bounds the private Grams


# -- accounting --------------------------------------------------------------------------------


def _gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact ε of the Gaussian mechanism (Balle & Wang 2018, Theorem 8)."""

    def excess(eps):
        return ndtr(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * ndtr(
            -eps * sigma - 1 / (2 * sigma)
        ) - delta  # fmt: skip

    return brentq(excess, 1e-6, 200)


@pytest.mark.parametrize("z,count", [(4.0, 16), (2.0, 3), (10.0, 200)])
def test_accountant_matches_the_gaussian_mechanisms_closed_form(z, count):
    exact = _gaussian_epsilon(z / math.sqrt(count), 1e-5)
    assert dp.epsilon_of([(z, count)], 1e-5) == pytest.approx(exact, rel=2e-3)


def test_accountant_matches_the_library_composing_event_by_event():
    from dp_accounting import GaussianDpEvent
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant()
    acc.compose(GaussianDpEvent(3.0), 2)
    acc.compose(GaussianDpEvent(5.0), 1)
    assert dp.epsilon_of([(3.0, 2), (5.0, 1)], 1e-6) == pytest.approx(
        acc.get_epsilon(1e-6), rel=2e-3
    )


def test_calibration_inverts_the_accountant_and_repeats_spend_more():
    z = dp.calibrate(2.0, 1e-6, 5)
    assert dp.epsilon_of([(z, 5)], 1e-6) == pytest.approx(2.0, rel=1e-3)
    once = dp.Guarantee(2.0, 1e-6, "sequence", z, 5, {}, {})
    assert dp.total_epsilon([once, once]) > 2.0 * 1.2


# -- builds ------------------------------------------------------------------------------------


def _build(experts, out, names=("alpha", "beta"), **kw):
    from dume_dist.model.build import build_dume

    return build_dume(
        {n: str(experts[n]["expert"]) for n in names},
        {n: [str(experts[n]["data"])] for n in names},
        out, backbone=f"base:{experts['base']}", **{"routing": "paper", **BUILD, **kw},
    )  # fmt: skip


def test_default_build_writes_no_statistics(experts, tmp_path):
    from dume_dist.core.stats import _read_metadata

    result = _build(experts, tmp_path / "m", routing="context")
    files = list((tmp_path / "m").rglob("*"))
    assert not [f for f in files if f.is_dir() and f.name == "stats"]
    schemas = {
        _read_metadata(f.read_bytes()).get("schema") for f in files if f.suffix == ".safetensors"
    }
    assert schemas and not schemas & {"dume-stats/1", "dume-ngram-stats/1"}
    assert "privacy" not in result.manifest


def test_save_stats_round_trips_an_incremental_build(experts, tmp_path):
    from dume_dist.distributed.coordinator import routers_of

    with pytest.raises(ValueError, match="inside the model directory"):
        _build(experts, tmp_path / "m0", save_stats=tmp_path / "m0" / "stats")
    first = _build(experts, tmp_path / "m1", save_stats=tmp_path / "kept")
    assert first.reused_stats == [] and (tmp_path / "kept" / "alpha" / "fit.safetensors").is_file()
    again = _build(experts, tmp_path / "m2", names=("alpha", "beta", "gamma"),
                   save_stats=tmp_path / "kept")  # fmt: skip
    assert again.reused_stats == ["alpha", "beta"]
    _build(experts, tmp_path / "m3", names=("alpha", "beta", "gamma"))
    a, b = routers_of(tmp_path / "m2"), routers_of(tmp_path / "m3")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_private_build_records_the_guarantee_and_floors_lambda(experts, tmp_path):
    spec = dp.DpSpec(8.0, 1e-5, clip=1.0)
    result = _build(experts, tmp_path / "m", dp=spec, dp_seed=0)
    manifest = json.loads((tmp_path / "m" / "dume_manifest.json").read_text())
    for name in ("alpha", "beta"):
        g = manifest["privacy"][name]
        assert g["epsilon"] == 8.0 and g["delta"] == 1e-5 and g["unit"] == "sequence"
        assert g["clip"] == 1.0 and g["num_releases"] == 3  # 2 layers + the count
    sigma = manifest["privacy"]["alpha"]["sigma"]["gram"]
    p = result.stats["alpha"].feature_dim + 1
    assert result.routing.lam >= dp.min_ridge_lam([sigma, sigma], p) > 1e-2
    with pytest.raises(ValueError, match="--dp-unit token"):
        _build(experts, tmp_path / "t", dp=dp.DpSpec(8.0, 1e-5, unit="token"))
    with pytest.raises(ValueError, match="exact held-out bigrams"):
        _build(experts, tmp_path / "n", routing=resolve_routing("ngram", mu_criterion="bigrams"),
               dp=spec)  # fmt: skip
    # the switch rate is chosen on text simulated from the (private) held-out counts
    switched = _build(experts, tmp_path / "s", routing="switch",
                      dp=dp.DpSpec(8.0, 1e-5, unit="token"), dp_seed=3)  # fmt: skip
    assert switched.routing.switch_selection.criterion == "switch_logloss"
    assert switched.holdout_stats[0.0]["alpha"].pairs_K3 is None
    auto = _build(experts, tmp_path / "n1", routing="ngram", dp=dp.DpSpec(8.0, 1e-5, unit="token"),
                  dp_seed=2)  # fmt: skip
    g = auto.privacy["alpha"]
    assert g["num_releases"] == 3  # fit counts, held-out counts, held-out curve
    # 2 bigrams a token, 20 nats a bigram, √9 values, √2 with the count
    assert g["sensitivity"]["curve"] == pytest.approx(2 * 20.0 * 3.0 * math.sqrt(2))
    assert auto.routing.selection.criterion == "heldout_loglik"
    ngram = _build(experts, tmp_path / "n2", routing="ngram", lam=100.0,
                   dp=dp.DpSpec(8.0, 1e-5, unit="token"), dp_seed=1)  # fmt: skip
    assert ngram.privacy["alpha"]["sensitivity"]["counts"] == pytest.approx(math.sqrt(5))


def test_private_heldout_curve_is_the_clipped_curve_of_the_noisy_counts_plus_stated_noise():
    """The private curve is the held-out curve of the node's bigrams under the released (noisy)
    fit counts, each bigram clipped at -20 nats, plus Gaussian noise of the stated sigma
    (seeded: 100 draws of 9 values, std within 10%, mean within 4 standard errors); the bigrams
    are dropped and the result passes the coordinator's checks."""
    from dume_dist.core.ngram import CURVE_CLIP_NATS, check_count_values
    from dume_dist.model.kinds.ngram import collect_ngram_stats
    from dume_dist.model.ngram_select import DEFAULT_MU_GRID, heldout_curve, with_heldout_curve

    g = torch.Generator().manual_seed(0)
    fit_ids, held_ids = (
        torch.randint(0, 60, (40, 30), generator=g),
        torch.randint(0, 60, (20, 30), generator=g),
    )
    kw = dict(vocab_size=64, buckets=4099, max_tokens_per_seq=10**6, progress=False)
    fit = collect_ngram_stats([(fit_ids, torch.ones_like(fit_ids))], **kw)
    pairs = collect_ngram_stats([(held_ids, torch.ones_like(held_ids))], pairs=True, **kw)
    held = with_heldout_curve(pairs, fit, DEFAULT_MU_GRID, 0.1, keep_pairs=True)
    curve_fn = lambda f, p, grid, clip: heldout_curve(f, p, grid, 0.1, clip=clip)  # noqa: E731
    spec = dp.DpSpec(8.0, 1e-6, unit="token")
    residuals = []
    for seed in range(100):
        noisy_fit, noisy_held, guarantee = privatize(
            fit, {0.0: held}, spec, tokens_per_unit=30, seed=seed, heldout_curve=curve_fn
        )  # fmt: skip
        out = noisy_held[0.0]
        assert out.pairs_K3 is None and out.feature_map == "ngram:4099+curve"
        check_count_values(out, 10**9)
        clean = heldout_curve(
            noisy_fit, pairs.pairs_K3, list(DEFAULT_MU_GRID), 0.1, clip=CURVE_CLIP_NATS
        )
        residuals.append(out.curve_M - clean)
    sigma = guarantee.sigma["curve"]
    assert sigma == pytest.approx(
        guarantee.noise_multiplier * 2 * CURVE_CLIP_NATS * 3 * math.sqrt(2)
    )
    assert abs(float(out.curve_count_1) - pairs.num_bigrams) < 6 * sigma / (CURVE_CLIP_NATS * 3)
    r = torch.cat(residuals)
    assert float(r.std()) == pytest.approx(sigma, rel=0.1)
    assert abs(float(r.mean())) < 4 * sigma / math.sqrt(r.numel())
    assert guarantee.num_releases == 3
    with pytest.raises(ValueError, match="formula"):
        privatize(fit, {0.0: held}, spec, tokens_per_unit=30, seed=0)


# -- the distributed path ----------------------------------------------------------------------


def test_private_node_statistics_unlearn_exactly(experts, tmp_path, capsys):
    from dist_helpers import Flow, assert_same_routers

    private = {"dp": dp.DpSpec(4.0, 1e-5, clip=1.0).to_json()}
    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha", "beta", "gamma")
    flow.join("alpha", **private)
    v2 = flow.join("beta", **private)["version"]
    flow.join("gamma", **private)
    registry = flow.status()["registry"]
    (entry,) = registry["nodes"]["gamma"]["stats"]
    assert entry["dp"]["epsilon"] == 4.0 and entry["dp"]["clip"] == 1.0
    manifest = flow.versions().get_manifest("v3")
    rec = {c["name"]: c for c in manifest["contributors"]}["gamma"]
    assert rec["privacy"]["epsilon"] == pytest.approx(4.0, rel=1e-3)
    assert rec["stats"][0]["dp"]["noise_multiplier"] > 0
    from dume_dist.distributed.tables import print_status

    status = flow.status()
    assert len(status["shares"]["by_class"]) == 3 and status["shares"]["statistics"] == "fit"
    print_status(status)
    out = capsys.readouterr().out
    assert "routing shares" in out and "ε=4" in out
    flow.coord.unlearn(flow.op, "gamma", "request")
    assert_same_routers(flow.routers("v4"), flow.routers(v2))


def test_node_shows_what_leaves_and_dry_run_sends_nothing(experts, tmp_path):
    from dist_helpers import Flow

    flow = Flow(str(tmp_path / "store"), experts, tmp_path)
    flow.add("alpha")
    prepared = flow.join("alpha", dry_run=True)
    assert prepared["status"] == "dry-run"
    kinds = [o["what"] for o in prepared["outbound"]]
    assert kinds[0] == "expert MLP weights" and kinds[1] == "fit statistics"
    assert all(o["bytes"] > 0 for o in prepared["outbound"])
    assert flow.status()["registry"]["nodes"]["alpha"]["stats"] == []
    assert flow.status()["registry"]["nodes"]["alpha"].get("expert") is None


def test_default_ngram_join_sends_no_heldout_bigrams_and_exact_ones_need_the_flag(
    experts, tmp_path
):
    from dist_helpers import Flow

    from dume_dist.model.kinds import stats_from_bytes
    from dume_dist.store import CURRENT, BlobStore

    settings = {"routing": "ngram", "max_tokens_per_seq": 16, "ngram_buckets": 64}
    flow = Flow(str(tmp_path / "store"), experts, tmp_path / "a", settings=settings)
    flow.add("alpha")
    sent = flow.join("alpha", send_heldout_bigrams=False)  # mu auto: no flag needed
    assert sent["status"] == "accepted"
    (held,) = [o for o in sent["outbound"] if o["what"].startswith("held-out")]
    assert "log-likelihood curve (9 values of mu)" in held["what"] and "bigrams" not in held["what"]
    (entry,) = flow.status()["registry"]["nodes"]["alpha"]["stats"]
    blob = BlobStore(flow.store, CURRENT.blobs).get_blob(entry["holdout"][0]["blob"])
    stored = stats_from_bytes(blob)
    assert stored.pairs_K3 is None and stored.curve_M.shape == (9,)
    assert stored.feature_map == "ngram:64+curve"

    exact = Flow(str(tmp_path / "exact"), experts, tmp_path / "b",
                 settings={**settings, "mu_criterion": "bigrams"})  # fmt: skip
    exact.add("alpha")
    with pytest.raises(ValueError, match="--send-heldout-bigrams") as err:
        exact.join("alpha", send_heldout_bigrams=False)
    assert "\n" not in str(err.value)
    sent = exact.join("alpha", send_heldout_bigrams=True)
    assert any("exact held-out bigrams" in o["what"] for o in sent["outbound"])
    switch = Flow(str(tmp_path / "switch"), experts, tmp_path / "c",
                  settings={**settings, "routing": "switch"})  # fmt: skip
    switch.add("alpha")  # switch auto: chosen on text simulated from held-out counts
    sent = switch.join("alpha", send_heldout_bigrams=False)
    assert sent["status"] == "accepted"
    assert not any("bigrams" in o["what"] for o in sent["outbound"] if o["what"].startswith("held"))

    # differential privacy: the curve is released privately (one more Gaussian release), the
    # exact bigrams never (refused before any statistics are computed, nothing registered)
    flow.add("beta")
    private = {"dp": dp.DpSpec(8.0, 1e-5, unit="token").to_json()}
    sent = flow.join("beta", send_heldout_bigrams=False, **private)
    assert sent["status"] == "accepted"
    (entry,) = flow.status()["registry"]["nodes"]["beta"]["stats"]
    assert entry["dp"]["num_releases"] == 3 and "curve" in entry["dp"]["sigma"]
    blob = BlobStore(flow.store, CURRENT.blobs).get_blob(entry["holdout"][0]["blob"])
    assert stats_from_bytes(blob).pairs_K3 is None
    exact.add("beta")
    with pytest.raises(ValueError, match="exact held-out bigrams") as err:
        exact.join("beta", send_heldout_bigrams=True, **private)
    assert "\n" not in str(err.value) and exact.status()["registry"]["nodes"]["beta"]["stats"] == []


# -- poisoning: routing shares estimated from statistics -----------------------------------------


def _class_gram(mean, tokens=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = GramAccumulator(1, len(mean))
    acc.add(0, torch.randn(tokens, len(mean), generator=g, dtype=torch.float64) * 0.5
            + torch.tensor(mean, dtype=torch.float64))  # fmt: skip
    return acc.result(feature_map="token")


def test_routing_shares_flag_a_contributor_that_claims_others_data():
    from dume_dist.core.select import class_grams
    from dume_dist.core.shares import routing_shares
    from dume_dist.core.solve import solve_routers

    a, b = _class_gram([2, 0, 0, 0], seed=1), _class_gram([0, 2, 0, 0], seed=2)
    honest = {"a": (0, a), "b": (1, b)}
    shares = routing_shares(solve_routers(honest, 2), class_grams(honest, 2))
    assert shares["by_class"][0][0] > 0.9 and shares["by_class"][1][1] > 0.9
    assert shares["outliers"] == []
    assert sum(shares["by_class"][1]) == pytest.approx(1.0)
    mimic = {"a": (0, a + b), "b": (1, b)}  # a also submits b's statistics as its own
    forged = routing_shares(solve_routers(mimic, 2), class_grams(honest, 2))
    assert forged["by_class"][1][0] > 0.25 and forged["outliers"] == [0]
    assert shares["unrouted"] == [] and forged["unrouted"] == [1]  # b's tokens go to a


def test_routing_shares_flag_a_class_its_own_expert_rarely_wins():
    """Under equal priors a mimic takes no outlying share of the others' tokens, but its own
    claimed tokens are half the others': its own expert wins about half of them."""
    from dume_dist.core.select import class_grams
    from dume_dist.core.shares import routing_shares
    from dume_dist.core.solve import solve_routers

    a, b, c = (_class_gram(m, seed=s) for s, m in ((1, [2, 0, 0, 0]), (2, [0, 2, 0, 0]),
                                                    (3, [0, 0, 2, 0])))  # fmt: skip
    honest = {"a": (0, a), "b": (1, b), "c": (2, c)}
    shares = routing_shares(solve_routers(honest, 3, priors="equal"), class_grams(honest, 3))
    assert shares["unrouted"] == [] and "own expert" in shares["unrouted_rule"]
    mimic = {"a": (0, a + b + c), "b": (1, b), "c": (2, c)}  # a claims b's and c's text too
    routers = solve_routers(mimic, 3, priors="equal")
    forged = routing_shares(routers, class_grams(mimic, 3))
    assert forged["by_class"][0][0] < 0.6 and forged["unrouted"] == [0]


def test_build_manifest_records_routing_shares(experts, tmp_path):
    result = _build(experts, tmp_path / "m", routing="context")
    shares = result.manifest["routing"]["shares"]
    assert shares["statistics"] == "held-out" and len(shares["by_class"]) == 2
    assert all(sum(row) == pytest.approx(1.0) for row in shares["by_class"])
