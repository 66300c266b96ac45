"""The sequence-level n-gram router (``routing.features == "ngram"``, solver ``nb``).

Pinned to references: explicit Python counting (the statistics), the explicit naive-Bayes sum
(the router's scores), a full forward without cache (generation with a cache must match it), a
build that never had a contributor (removal must give the same tables bit for bit), the explicit
held-out log-loss on raw tokens (the statistics-only criterion must equal it), and a fresh
interpreter without dume_dist (a saved n-gram model must load and generate there).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_modeling_dume import VOCAB, dense_experts, tiny_base_config
from test_routing import _left_padded, check_loads_and_generates_without_dume_dist, tiny_build

from dume_dist.core.ngram import NgramStats, ngram_tables
from dume_dist.model.kinds import stats_from_bytes, stats_to_bytes
from dume_dist.model.kinds.ngram import collect_ngram_stats, with_heldout_counts
from dume_dist.model.modeling_dume import DumeConfig, DumeForCausalLM, ngram_bucket
from dume_dist.model.ngram_select import (
    DEFAULT_MU_GRID,
    heldout_logloss,
    select_mu,
    select_mu_likelihood,
    with_heldout_curve,
)
from dume_dist.model.routing import AUTO, PRESETS, RoutingSpec, resolve_routing, solve_routing

torch.set_num_threads(1)
BUCKETS = 61


def _routing(mu=5.0, alpha=0.5, buckets=BUCKETS):
    return {
        "features": "ngram",
        "solver": "nb",
        "ngram": {"buckets": buckets, "mu": mu, "alpha": alpha},
    }


def _ngram_model(k=1, seed=0, num_experts=3):
    """`dume_from_dense` with n-gram routing: the experts' MLPs and random integer counts."""
    dense = dense_experts(tiny_base_config(), num_experts, seed=seed)
    config = DumeConfig(
        base_config=dense[0].config.to_dict(), num_experts=num_experts, routing=_routing(),
        num_experts_per_tok=k,
    )  # fmt: skip
    model = DumeForCausalLM(config).eval()
    state = {n: v for n, v in dense[0].state_dict().items() if ".mlp." not in n}
    for j, expert in enumerate(dense):
        for key, value in expert.state_dict().items():
            if ".mlp." in key:
                state[key.replace(".mlp.", f".mlp.experts.{j}.")] = value
    g = torch.Generator().manual_seed(seed)
    uni = torch.randint(0, 40, (num_experts, VOCAB), generator=g).float()
    state["ngram_router.unigram_counts"] = uni
    state["ngram_router.context_counts"] = (uni * 0.8).floor()
    state["ngram_router.bigram_counts"] = torch.randint(
        0, 30, (num_experts, BUCKETS), generator=g
    ).float()
    model.load_state_dict(state, strict=True)
    return model


# -- the model: KV cache, pieces, padding -------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_ngram_cached_generation_equals_full_forward(k):
    model = _ngram_model(k)
    ids_BT, mask_BT = _left_padded()
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(ids_BT, attention_mask=mask_BT, use_cache=True, **kw)
    full = model.generate(ids_BT, attention_mask=mask_BT, use_cache=False, **kw)
    assert torch.equal(cached, full)
    # Step by step with a cache: the logits of every step equal the full forward's.
    with torch.no_grad():
        whole = model(cached, attention_mask=torch.ones_like(cached).masked_fill(cached == 0, 0))
    mask = (cached != 0).long()
    mask[:, : mask_BT.shape[1]] = mask_BT
    with torch.no_grad():
        whole = model(cached, attention_mask=mask).logits
        out = model(cached[:, :4], attention_mask=mask[:, :4], use_cache=True)
        steps, cache = [out.logits], out.cache if hasattr(out, "cache") else out.past_key_values
        for t in range(4, cached.shape[1]):
            out = model(cached[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
            steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], whole[real], rtol=1e-5, atol=1e-5)


def test_ngram_scores_in_pieces_equal_whole_and_the_explicit_sum():
    router = _ngram_model().ngram_router
    ids_BT, mask_BT = _left_padded(batch=3, length=11, seed=3)
    mask_BT[2, 5] = 0  # a hole: padding never enters the sums, the bigram skips over it
    real = mask_BT.bool()
    whole, _ = router.scores(ids_BT, real)
    state, parts = None, []
    for a, b in ((0, 1), (1, 5), (5, 6), (6, 11)):
        part, state = router.scores(ids_BT[:, a:b], real[:, a:b], state)
        parts.append(part)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-10)
    uni = router.unigram_counts.double()
    ctx = router.context_counts.double()
    big = router.bigram_counts.double()
    q = (uni + router.alpha) / (uni.sum(1, keepdim=True) + router.alpha * VOCAB)
    for b in range(3):
        total, prev = torch.zeros(3, dtype=torch.float64), None
        for t in range(11):
            if real[b, t]:
                v = int(ids_BT[b, t])
                if prev is None:
                    p = q[:, v]
                else:
                    h = (prev * 1_000_003 + v) % BUCKETS
                    p = (big[:, h] + router.mu * q[:, v]) / (ctx[:, prev] + router.mu)
                total = total + p.log()
                prev = v
            torch.testing.assert_close(whole[b, t], total, rtol=0, atol=1e-9)


def test_beam_search_carries_the_ngram_state():
    model = _ngram_model(seed=1)
    ids_BT, mask_BT = _left_padded(batch=2, length=5, seed=2)
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    cached = model.generate(ids_BT, attention_mask=mask_BT, use_cache=True, **kw)
    full = model.generate(ids_BT, attention_mask=mask_BT, use_cache=False, **kw)
    assert torch.equal(cached, full)


def test_ngram_routing_needs_token_ids():
    model = _ngram_model()
    embeds = model.model.embed_tokens(torch.tensor([[3, 4, 5]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=embeds)


# -- statistics: counting, identity, add / remove -------------------------------------------------


def _explicit_counts(ids_BT, mask_BT, max_tokens_per_seq, vocab, buckets):
    uni, ctx, big, pairs = [0.0] * vocab, [0.0] * vocab, [0.0] * buckets, {}
    for row, mrow in zip(ids_BT.tolist(), mask_BT.tolist()):
        prev, seen = None, 0
        for v, m in zip(row, mrow):
            if not m:
                continue
            seen += 1
            if seen > max_tokens_per_seq:
                break
            uni[v] += 1
            if prev is not None:
                ctx[prev] += 1
                big[(prev * 1_000_003 + v) % buckets] += 1
                pairs[(prev, v)] = pairs.get((prev, v), 0) + 1
            prev = v
    return uni, ctx, big, pairs


@pytest.mark.parametrize("coalesce_every", [1, None], ids=["coalesce-often", "coalesce-once"])
def test_collected_counts_equal_explicit_counting(coalesce_every, monkeypatch):
    if coalesce_every is not None:
        monkeypatch.setattr("dume_dist.model.kinds.ngram._PAIRS_BEFORE_COALESCING", coalesce_every)
    batches = [_left_padded(3, 9, seed=s) for s in range(3)]
    batches.append((torch.tensor([[5, 6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]])))
    got = collect_ngram_stats(
        batches, vocab_size=VOCAB, buckets=BUCKETS, max_tokens_per_seq=6, pairs=True,
        progress=False,
    )  # fmt: skip
    uni, ctx, big, pairs = [0.0] * VOCAB, [0.0] * VOCAB, [0.0] * BUCKETS, {}
    for ids, mask in batches:
        u, c, b, p = _explicit_counts(ids, mask, 6, VOCAB, BUCKETS)
        uni = [x + y for x, y in zip(uni, u)]
        ctx = [x + y for x, y in zip(ctx, c)]
        big = [x + y for x, y in zip(big, b)]
        for key, n in p.items():
            pairs[key] = pairs.get(key, 0) + n
    assert got.unigram_V.tolist() == uni and got.context_V.tolist() == ctx
    assert got.bigram_H.tolist() == big
    assert [tuple(r[:2]) for r in got.pairs_K3.tolist()] == sorted(pairs)
    assert [r[2] for r in got.pairs_K3.tolist()] == [pairs[k] for k in sorted(pairs)]
    assert got.feature_map == f"ngram:{BUCKETS}+pairs"  # held-out, sent only when asked
    back = stats_from_bytes(stats_to_bytes(got))
    assert isinstance(back, NgramStats) and torch.equal(back.pairs_K3, got.pairs_K3)


def _synthetic_corpus(label: int, num_seqs: int, seed: int, length: int = 40):
    """Token sequences from a class-specific first-order Markov chain over VOCAB ids."""
    g = torch.Generator().manual_seed(1000 + label)
    trans = torch.softmax(torch.randn(VOCAB, VOCAB, generator=g) * 2.0, dim=1)
    g = torch.Generator().manual_seed(seed)
    seqs = torch.zeros(num_seqs, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, VOCAB, (num_seqs,), generator=g)
    for t in range(1, length):
        seqs[:, t] = torch.multinomial(trans[seqs[:, t - 1]], 1, generator=g)[:, 0]
    return seqs


def _counts(seqs, pairs=False, buckets=BUCKETS, **meta):
    mask = torch.ones_like(seqs)
    stats = collect_ngram_stats(
        [(seqs, mask)], vocab_size=VOCAB, buckets=buckets, max_tokens_per_seq=10**6,
        pairs=pairs, progress=False,
    )  # fmt: skip
    return stats.with_meta(**meta)


def _held(seqs, fit, criterion="likelihood", grid=DEFAULT_MU_GRID, alpha=0.1):
    """Held-out statistics as a node computes them for ``criterion``."""
    pairs = _counts(seqs, pairs=True, buckets=fit.buckets)
    if criterion == "bigrams":
        return pairs
    return with_heldout_curve(pairs, fit, grid, alpha)


@pytest.mark.parametrize("criterion", ["likelihood", "bigrams"])
def test_adding_then_removing_a_contributor_returns_identical_tables(criterion):
    spec = RoutingSpec(features="ngram", solver="nb", lam=AUTO, holdout_fraction=0.1,
                       ngram_buckets=BUCKETS, mu_criterion=criterion)  # fmt: skip
    members = [("a", 0), ("b", 1), ("c", 2), ("d", 0)]
    fit = {n: (j, _counts(_synthetic_corpus(j, 6, i))) for i, (n, j) in enumerate(members)}
    held = {
        n: (j, _held(_synthetic_corpus(j, 3, 50 + i), fit[n][1], criterion))
        for i, (n, j) in enumerate(members)
    }
    drop = lambda m: {k: v for k, v in m.items() if k != "d"}  # noqa: E731
    never = solve_routing(spec, drop(fit), 3, {0.0: drop(held)})
    grown = solve_routing(spec, fit, 3, {0.0: held})
    removed = solve_routing(spec, drop(dict(fit)), 3, {0.0: drop(dict(held))})
    assert not torch.equal(grown.routers.unigram_EV, never.routers.unigram_EV)
    assert removed.lam == never.lam
    for name in ("unigram_EV", "context_EV", "bigram_EH"):
        assert torch.equal(getattr(removed.routers, name), getattr(never.routers, name))
    # The tables count every contribution's fit and held-out tokens (mu chosen on the held-out
    # part first); subtracting a contribution's counts is exact (integer counts in fp64).
    both = with_heldout_counts(drop(fit), drop(held))
    assert not torch.equal(
        ngram_tables(drop(fit), 3, never.lam).unigram_EV, never.routers.unigram_EV
    )
    sub = {**both, "a": (0, (both["a"][1] + fit["d"][1]) - fit["d"][1])}
    tables = ngram_tables(sub, 3, never.lam)
    assert torch.equal(tables.unigram_EV, never.routers.unigram_EV)
    assert torch.equal(tables.bigram_EH, never.routers.bigram_EH)


def test_tables_count_held_out_parts_except_private_or_missing_ones():
    from dume_dist.core import dp

    fit = {n: (j, _counts(_synthetic_corpus(j, 4, 10 + j))) for j, n in enumerate("abc")}
    held = {n: (j, _held(_synthetic_corpus(j, 2, 20 + j), fit[n][1])) for j, n in enumerate("ab")}
    g = dp.Guarantee(epsilon=1.0, delta=1e-5, unit="token", noise_multiplier=1.0,
                     num_releases=2, sensitivity={"counts": 1.0}, sigma={"counts": 1.0})  # fmt: skip
    held["b"] = (1, dp.with_guarantee(held["b"][1], g))
    both = with_heldout_counts(fit, held)
    assert torch.equal(both["a"][1].unigram_V, fit["a"][1].unigram_V + held["a"][1].unigram_V)
    assert torch.equal(both["a"][1].bigram_H, fit["a"][1].bigram_H + held["a"][1].bigram_H)
    assert both["b"][1] is fit["b"][1] and both["c"][1] is fit["c"][1]  # private; none sent
    with pytest.raises(ValueError, match="held-out statistics of 'a' name expert 2"):
        with_heldout_counts(fit, {"a": (2, held["a"][1])})


def test_statistics_of_other_feature_maps_cannot_be_mixed():
    from test_routing import _synthetic_stats

    counts = _counts(_synthetic_corpus(0, 2, 0))
    other_buckets = collect_ngram_stats(
        [(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))], vocab_size=VOCAB,
        buckets=BUCKETS + 1, max_tokens_per_seq=10, progress=False,
    )  # fmt: skip
    gram = _synthetic_stats("token", 0, 0)[0.0]
    with pytest.raises(ValueError, match="feature map"):
        counts + other_buckets
    with pytest.raises(ValueError, match="feature map"):
        counts + gram
    with pytest.raises(ValueError, match="feature map"):
        gram + counts
    spec = RoutingSpec(features="ngram", solver="nb", lam=10.0, ngram_buckets=BUCKETS)
    with pytest.raises(ValueError, match=r"statistics of 'b' are of feature map 'token'"):
        solve_routing(spec, {"a": (0, counts), "b": (1, gram)}, 2)
    with pytest.raises(ValueError, match="feature map"):
        solve_routing(PRESETS["paper"], {"a": (0, counts), "b": (1, counts)}, 2)
    # Held-out statistics must carry their bigrams: fit counts are not held-out counts.
    auto = spec.replace(lam=AUTO, holdout_fraction=0.1)
    fit = {"a": (0, counts), "b": (1, _counts(_synthetic_corpus(1, 2, 1)))}
    with pytest.raises(ValueError, match=r"held-out statistics of 'a' are of feature map"):
        solve_routing(auto, fit, 2, {0.0: fit})
    with pytest.raises(ValueError, match="smoothing must be 0"):
        RoutingSpec(features="ngram", solver="nb", smoothing=0.5)
    with pytest.raises(ValueError, match="'nb' solver"):
        RoutingSpec(features="token", solver="nb")
    assert resolve_routing("paper", features="ngram").solver == "nb"


def test_corrupt_ngram_blob_is_refused_with_one_line():
    blob = stats_to_bytes(_counts(_synthetic_corpus(0, 2, 0)))
    bad = NgramStats(
        torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 0.0], dtype=torch.float64),
        torch.tensor([3.0], dtype=torch.float64),
    )  # fmt: skip
    with pytest.raises(ValueError, match="context more often"):
        stats_from_bytes(stats_to_bytes(bad))
    with pytest.raises(ValueError, match="not valid safetensors"):
        stats_from_bytes(blob[: len(blob) // 2])


def _blob_with(stats: NgramStats, **tensors) -> bytes:
    """The blob of ``stats`` with its bigram tensors replaced by ``tensors``."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from dume_dist.model.kinds import read_metadata

    blob = stats_to_bytes(stats)
    kept = {k: v for k, v in st_load(blob).items() if not k.startswith("bigram")}
    return st_save({**kept, **tensors}, metadata=read_metadata(blob))


def test_bigram_counts_travel_sparse_and_dense_blobs_still_read():
    from dume_dist.core.ngram import DEFAULT_BUCKETS

    stats = _counts(_synthetic_corpus(0, 2, 0), buckets=DEFAULT_BUCKETS)
    blob = stats_to_bytes(stats)
    filled = int((stats.bigram_H > 0).sum())
    assert len(blob) < 16 * filled + 16 * stats.vocab_size + 2048  # not the 32 MiB dense table
    back = stats_from_bytes(blob)
    assert torch.equal(back.bigram_H, stats.bigram_H) and back.feature_map == stats.feature_map
    dense = _blob_with(stats, bigram=stats.bigram_H)  # what earlier versions wrote
    assert torch.equal(stats_from_bytes(dense).bigram_H, stats.bigram_H)


def _f64(*values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("tensors,match", [
    ({"bigram_index": torch.tensor([5, 3]), "bigram_count": _f64(1, 1)}, "increasing"),
    ({"bigram_index": torch.tensor([3, 64]), "bigram_count": _f64(1, 1)}, r"in \[0, 64\)"),
    ({"bigram_index": torch.tensor([3]), "bigram_count": _f64(0)}, "count positive"),
    ({"bigram_index": torch.tensor([3])}, "needs either"),
    ({"bigram": torch.zeros(64, dtype=torch.float64), "bigram_index": torch.tensor([3]),
      "bigram_count": _f64(1)}, "needs either"),
    ({"bigram_index": torch.tensor([3]), "bigram_count": torch.tensor([1.0])}, "float64"),
    ({"bigram_index": torch.arange(65), "bigram_count": torch.ones(65, dtype=torch.float64)},
     "one length <= 64"),
])  # fmt: skip
def test_hostile_sparse_bigram_counts_are_refused_with_one_line(tensors, match):
    stats = _counts(_synthetic_corpus(0, 2, 0), buckets=64)
    with pytest.raises(ValueError, match=match) as err:
        stats_from_bytes(_blob_with(stats, **tensors))
    assert "\n" not in str(err.value)
    huge = _blob_with(stats.with_meta(feature_map="ngram:99999999999"),
                      bigram_index=torch.tensor([0]), bigram_count=_f64(1))  # fmt: skip
    with pytest.raises(ValueError, match="buckets, at most"):
        stats_from_bytes(huge)  # refused before allocating the table it claims


def test_default_buckets_agree_and_full_tables_are_named_with_a_bucket_count():
    from dume_dist.core.ngram import DEFAULT_BUCKETS, MAX_BUCKETS, fill_warnings
    from dume_dist.model.routing_options import NGRAM_OPTIONS

    (option,) = [o for o in NGRAM_OPTIONS if o.name == "ngram_buckets"]
    assert option.default == DEFAULT_BUCKETS == 1 << 22 and option.high == MAX_BUCKETS
    (line,) = fill_warnings([0.05, 0.5], ["ok", "full"], 1 << 16)
    # fill 0.5 of 2^16: about 45,426 distinct bigrams; 4x that is 181,704 -> 2^18
    assert line.startswith("expert full fills 50% of its 65536") and line.endswith("262144")
    assert fill_warnings([0.99999], ["x"], MAX_BUCKETS)[0].endswith(str(MAX_BUCKETS))


# -- mu from held-out statistics ------------------------------------------------------------------


def test_heldout_mu_is_the_minimiser_of_the_explicit_heldout_logloss():
    """Two classes of Markov-chain text, little fit data: the statistics-only criterion equals
    the per-bigram posterior log-loss computed token by token on the raw held-out sequences, and
    the chosen mu is its argmin, inside the grid."""
    fit = {f"c{j}": (j, _counts(_synthetic_corpus(j, 3, j))) for j in range(2)}
    held_seqs = {j: _synthetic_corpus(j, 40, 100 + j) for j in range(2)}
    held = {f"c{j}": (j, _counts(s, pairs=True)) for j, s in held_seqs.items()}
    grid = [10.0 ** (k / 2) for k in range(-4, 9)]
    sel = select_mu(fit, held, 2, grid, alpha=0.5)
    tables = ngram_tables(fit, 2, grid[0], alpha=0.5)
    uni, ctx, big = tables.unigram_EV, tables.context_EV, tables.bigram_EH
    q = (uni + 0.5) / (uni.sum(1, keepdim=True) + 0.5 * VOCAB)
    explicit = []
    for mu in grid:
        per_class = []
        for j, seqs in held_seqs.items():
            total, n = 0.0, 0
            for row in seqs.tolist():
                for prev, v in zip(row[:-1], row[1:]):
                    h = (prev * 1_000_003 + v) % BUCKETS
                    logp = ((big[:, h] + mu * q[:, v]) / (ctx[:, prev] + mu)).log()
                    total -= float(torch.log_softmax(logp, 0)[j])
                    n += 1
            per_class.append(total / n)
        explicit.append(sum(per_class) / 2)
    torch.testing.assert_close(
        torch.tensor(sel.curves["nb_logloss"][0]), torch.tensor(explicit), rtol=1e-9, atol=1e-12
    )
    best = min(range(len(grid)), key=explicit.__getitem__)
    assert sel.lam == grid[best] and 0 < best < len(grid) - 1
    assert heldout_logloss(tables, held, grid[best]) == pytest.approx(explicit[best])


def test_heldout_curve_equals_token_by_token_likelihood_and_mu_is_its_argmax():
    """The held-out curve a node sends equals the log-likelihood of its raw held-out sequences
    computed token by token under its own fit counts; the chosen mu maximises the mean over
    experts of the per-bigram log-likelihood (two contributors of expert 0 summed)."""
    grid, buckets = [10.0 ** (k / 2) for k in range(-4, 9)], 4099  # few collisions: they
    members = {"a": 0, "b": 1, "c": 0}  # inflate p at small mu (see heldout_curve)
    fit = {n: (j, _counts(_synthetic_corpus(j, 2, i), buckets=buckets))
           for i, (n, j) in enumerate(members.items())}  # fmt: skip
    seqs = {n: _synthetic_corpus(j, 20, 100 + i) for i, (n, j) in enumerate(members.items())}
    held = {n: (j, _held(seqs[n], fit[n][1], grid=grid, alpha=0.5)) for n, j in members.items()}
    explicit = {}
    for n, (_j, counts) in fit.items():
        uni, ctx, big = counts.unigram_V, counts.context_V, counts.bigram_H
        q = (uni + 0.5) / (uni.sum() + 0.5 * VOCAB)
        rows = []
        for mu in grid:
            total = 0.0
            for row in seqs[n].tolist():
                for prev, v in zip(row[:-1], row[1:]):
                    h = (prev * 1_000_003 + v) % buckets
                    total += math.log((float(big[h]) + mu * float(q[v])) / (float(ctx[prev]) + mu))
            rows.append(total)
        explicit[n] = rows
        torch.testing.assert_close(held[n][1].curve_M, torch.tensor(rows, dtype=torch.float64),
                                   rtol=1e-11, atol=1e-9)  # fmt: skip
        assert held[n][1].num_bigrams == seqs[n].shape[0] * (seqs[n].shape[1] - 1)
        assert held[n][1].pairs_K3 is None and held[n][1].feature_map == f"ngram:{buckets}+curve"
    per_token = lambda names: [  # noqa: E731
        sum(explicit[n][m] for n in names) / sum(held[n][1].num_bigrams for n in names)
        for m in range(len(grid))
    ]
    mean = [(x + y) / 2 for x, y in zip(per_token(["a", "c"]), per_token(["b"]))]
    sel = select_mu_likelihood(held, 2, grid)
    torch.testing.assert_close(torch.tensor(sel.curves["heldout_loglik"][0]), torch.tensor(mean))
    best = max(range(len(grid)), key=mean.__getitem__)
    assert sel.lam == grid[best] and 0 < best < len(grid) - 1
    back = stats_from_bytes(stats_to_bytes(held["a"][1]))
    assert torch.equal(back.curve_M, held["a"][1].curve_M) and back.pairs_K3 is None


def test_hostile_heldout_curves_are_refused_with_one_line():
    from dume_dist.core.ngram import check_count_values

    fit = _counts(_synthetic_corpus(0, 3, 0))
    good = _held(_synthetic_corpus(0, 5, 1), fit)
    check_count_values(good, 10**9)
    n = good.num_bigrams
    cases = {
        "finite": good.with_meta(curve_M=good.curve_M.clone().fill_(float("nan"))),
        "same length": good.with_meta(curve_M=good.curve_M[:-1]),
        "increasing": good.with_meta(
            curve_mu_M=good.curve_mu_M.flip(0), curve_M=good.curve_M.flip(0)
        ),  # fmt: skip
        "float64": good.with_meta(curve_M=good.curve_M.float()),
        "log-probabilities": good.with_meta(curve_M=good.curve_M.abs()),
    }
    for match, bad in cases.items():
        with pytest.raises(ValueError, match=match) as err:
            stats_from_bytes(stats_to_bytes(bad)) if match != "log-probabilities" else None
            check_count_values(stats_from_bytes(stats_to_bytes(bad)), 10**9)
        assert "\n" not in str(err.value)
    # far below what n bigrams can score (each >= log(mu alpha / ((N + mu)(N + alpha V))))
    low = good.with_meta(curve_M=torch.full_like(good.curve_M, -1000.0 * n))
    with pytest.raises(ValueError, match="log-probabilities"):
        check_count_values(low, 10**6)
    # a curve over another grid than the coordinator's
    spec = RoutingSpec(features="ngram", solver="nb", lam=AUTO, holdout_fraction=0.1,
                       ngram_buckets=BUCKETS, mu_grid=(1.0, 10.0))  # fmt: skip
    from dume_dist.model.kinds import BackboneShape

    with pytest.raises(ValueError, match="grid"):
        spec.router_kind.validate(good, spec, BackboneShape(1, 4, VOCAB))


def test_ngram_shares_flag_a_contributor_that_claims_others_data():
    """Shares estimated on sequences simulated from each expert's held-out counts: an honest
    build has no outlier; an expert whose counts add another class's (``mimic``, fit and
    held-out alike) wins that class's simulated text and is flagged; ten times the counts
    (claimed volume) buys nothing."""
    spec = RoutingSpec(features="ngram", solver="nb", lam=AUTO, holdout_fraction=0.1,
                       ngram_buckets=4099)  # fmt: skip
    fit = {f"c{j}": (j, _counts(_synthetic_corpus(j, 30, j), buckets=4099)) for j in range(3)}
    held = {n: (j, _held(_synthetic_corpus(j, 10, 50 + j), fit[n][1])) for n, (j, _) in fit.items()}
    honest = solve_routing(spec, fit, 3, {0.0: held}).extras["shares"]
    assert honest["outliers"] == [] and honest["statistics"] == "held-out"
    assert min(honest["by_class"][j][j] for j in range(3)) > 0.8
    assert sum(honest["overall"]) == pytest.approx(1.0)
    assert solve_routing(spec, fit, 3, {0.0: held}).extras["shares"] == honest  # seeded
    plus = lambda m: {**m, "c0": (0, m["c0"][1] + m["c1"][1])}  # noqa: E731
    forged = solve_routing(spec, plus(fit), 3, {0.0: plus(held)}).extras["shares"]
    assert forged["outliers"] == [0] and forged["by_class"][1][0] > 0.25
    c0 = fit["c0"][1]
    x10 = {**fit, "c0": (0, c0.with_meta(unigram_V=c0.unigram_V * 10, context_V=c0.context_V * 10,
                                         bigram_H=c0.bigram_H * 10))}  # fmt: skip
    fixed = spec.replace(lam=20.0, holdout_fraction=0.0)
    assert solve_routing(fixed, x10, 3).extras["shares"]["outliers"] == []
    assert solve_routing(fixed, fit, 3).extras["shares"]["statistics"] == "fit"


@pytest.mark.parametrize(
    "routing", [{}, {"switch": 0.01}, {"switch_rates": (0.0, 1e-3, 1e-2), "evidence_scale": 0.5}]
)
def test_shares_route_simulated_text_as_the_router_does(routing):
    """The shares' top-1 expert of every simulated position is the router module's own."""
    from dume_dist.model.modeling_dume import DumeNgramRouter
    from dume_dist.model.ngram_shares import simulate, top1_shares

    fit = {f"c{j}": (j, _counts(_synthetic_corpus(j, 8, j), buckets=4099)) for j in range(3)}
    tables = ngram_tables(fit, 3, 20.0, alpha=0.5)
    router = DumeNgramRouter(3, VOCAB, 4099, 20.0, 0.5, **routing)
    for name, t in (("unigram", tables.unigram_EV), ("context", tables.context_EV),
                    ("bigram", tables.bigram_EH)):  # fmt: skip
        getattr(router, f"{name}_counts").data = t.float()
    ids_BT = simulate(fit["c1"][1], 20.0, 0.5, torch.Generator().manual_seed(1))
    scores, _ = router.scores(ids_BT, torch.ones_like(ids_BT, dtype=torch.bool))
    want = torch.bincount(scores.argmax(-1).flatten(), minlength=3).double() / ids_BT.numel()
    assert torch.equal(top1_shares(tables, ids_BT, **routing), want)
    assert float(want[1]) > 0.8  # text drawn from c1's counts goes to c1


def test_router_tables_follow_a_changed_mu():
    """The router's cached smoothing tables are remade when mu changes, not only the counts."""
    from dume_dist.model.modeling_dume import DumeNgramRouter

    fit = {f"c{j}": (j, _counts(_synthetic_corpus(j, 8, j), buckets=4099)) for j in range(3)}
    tables = ngram_tables(fit, 3, 20.0, alpha=0.5)

    def router(mu):
        r = DumeNgramRouter(3, VOCAB, 4099, mu, 0.5)
        for name, t in (("unigram", tables.unigram_EV), ("context", tables.context_EV),
                        ("bigram", tables.bigram_EH)):  # fmt: skip
            getattr(r, f"{name}_counts").data = t.float()
        return r

    ids_BT = torch.arange(40).reshape(2, 20) % VOCAB
    real_BT = torch.ones_like(ids_BT, dtype=torch.bool)
    changed = router(20.0)
    before = changed.scores(ids_BT, real_BT)[0]
    changed.mu = 200.0
    after = changed.scores(ids_BT, real_BT)[0]
    assert not torch.equal(before, after)
    assert torch.equal(after, router(200.0).scores(ids_BT, real_BT)[0])


# -- end to end: build, eval, save -> load without dume_dist ------------------------------------


@pytest.fixture(scope="module")
def ngram_build(tmp_path_factory):
    return tiny_build(tmp_path_factory.mktemp("ngram"), "ngram")


def test_ngram_build_records_routing_and_routes_well(ngram_build, tmp_path):
    from dume_dist.model.evaluate import compare, write_heatmap

    world, result = ngram_build
    manifest = json.loads((result.out_dir / "dume_manifest.json").read_text())
    config = json.loads((result.out_dir / "config.json").read_text())
    routing = manifest["routing"]
    assert manifest["feature_map"] == "ngram" and routing["solver"] == "nb"
    assert routing["lam"] in routing["selection"]["lam_grid"]
    assert config["routing"]["ngram"] == {
        "buckets": PRESETS["ngram"].ngram_buckets, "mu": routing["lam"], "alpha": 0.1,
    }  # fmt: skip
    assert config["num_experts_per_tok"] == 2 and config["routing"]["min_weight"] == 0.05
    assert all(s.feature_map.startswith("ngram:") for s in result.stats.values())
    held = sorted((result.out_dir.parent / "kept").rglob("holdout-*.safetensors"))
    assert len(held) == 3
    held = [stats_from_bytes(p.read_bytes()) for p in held]
    assert all(h.feature_map.endswith("+curve") and h.pairs_K3 is None for h in held)
    assert routing["selection"]["criterion"] == "heldout_loglik"
    sel = routing["selection"]
    chosen = sel["curves"]["heldout_loglik"][0][sel["lam_grid"].index(sel["lam"])]
    assert chosen == max(sel["curves"]["heldout_loglik"][0])  # the argmax, and the card says so
    assert f"heldout_loglik = {chosen:.4g}" in (result.out_dir / "README.md").read_text()
    shares = routing["shares"]
    assert shares["statistics"] == "held-out" and len(shares["by_class"]) == 3
    assert shares["outliers"] == [] and sum(shares["overall"]) == pytest.approx(1.0)
    table = compare(
        result.out_dir, world["data"], experts=world["experts"], seq_len=24, batch_size=4,
        max_eval_tokens=400,
    )  # fmt: skip
    acc = table.routing_accuracy["dume k=2"]
    assert min(sum(a) / len(a) for a in acc.values()) > 0.9  # chance: 1/3
    assert {"dume k=1", "oracle", "random routers"} <= set(table.ppl)
    worst = max(table.ppl["dume k=2"][d] / table.ppl["oracle"][d] for d in world["experts"])
    assert worst < 1.02  # within 2% of oracle routing on every domain
    write_heatmap(table, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_saved_statistics_follow_the_mu_criterion(ngram_build, tmp_path):
    """A saved statistics directory reuses held-out statistics only for the criterion (and grid)
    they were computed for: the exact bigrams' criterion recomputes them, then reuses its own."""
    from dume_dist.model.build import build_dume

    world, result = ngram_build
    kept = shutil.copytree(result.out_dir.parent / "kept", tmp_path / "kept")
    kw = dict(max_tokens_per_seq=48, batch_size=4, progress=False, save_stats=kept)
    exact = PRESETS["ngram"].replace(mu_criterion="bigrams")
    first = build_dume(world["experts"], world["data"], tmp_path / "a", routing=exact, **kw)
    assert first.reused_stats == [] and first.routing.selection.criterion == "nb_logloss"
    again = build_dume(world["experts"], world["data"], tmp_path / "b", routing=exact, **kw)
    assert sorted(again.reused_stats) == sorted(world["experts"])
    grid = PRESETS["ngram"].replace(mu_grid=(3.0, 30.0, 300.0))
    other = build_dume(world["experts"], world["data"], tmp_path / "c", routing=grid, **kw)
    assert other.reused_stats == [] and other.routing.lam in (3.0, 30.0, 300.0)


def test_a_registry_founded_when_mu_auto_meant_exact_bigrams_keeps_that_criterion():
    from dume_dist.distributed.artifacts import routing_of

    stored = PRESETS["ngram"].to_json()
    assert routing_of({"routing": stored}).mu_criterion == "likelihood"
    older = {k: v for k, v in stored.items() if k != "mu_criterion"}
    assert routing_of({"routing": older}).mu_criterion == "bigrams"
    fixed = {**older, "mu": 100.0, "lam": 100.0, "holdout_fraction": 0.0}
    assert routing_of({"routing": fixed}).mu_criterion == "likelihood"  # nothing held out


def test_ngram_model_loads_and_generates_without_dume_dist(ngram_build, tmp_path):
    _, result = ngram_build
    model = DumeForCausalLM.from_pretrained(result.out_dir).eval()
    assert model.ngram_router is not None and model.moe_blocks()[0].router is None
    check_loads_and_generates_without_dume_dist(model, result.out_dir, tmp_path)
    loaded = DumeForCausalLM.from_pretrained(result.out_dir, dtype=torch.bfloat16)
    assert loaded.ngram_router.bigram_counts.dtype == torch.float32


def test_ngram_bucket_is_stable():
    # The hash is part of the statistics' identity: changing it silently would mix statistics.
    got = ngram_bucket(
        torch.tensor([0, 1, 50_000, 128_000]), torch.tensor([0, 7, 3, 127_999]), 1 << 18
    )
    assert got.tolist() == [(p * 1_000_003 + c) % (1 << 18) for p, c in
                            [(0, 0), (1, 7), (50_000, 3), (128_000, 127_999)]]  # fmt: skip


@pytest.mark.parametrize("min_weight", [0.0, 0.2, 0.45])
def test_min_weight_drops_small_weights_and_their_expert_calls(min_weight):
    model = _ngram_model(k=2, seed=4)
    ids_BT, mask_BT = _left_padded(batch=3, length=9, seed=5)
    for block in model.moe_blocks():
        block.min_weight = min_weight
    rows = []
    hooks = [
        expert.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
        for expert in model.moe_blocks()[0].experts
    ]
    with torch.no_grad():
        sparse = model(ids_BT, attention_mask=mask_BT).logits
    for h in hooks:
        h.remove()
    scores, _ = model.ngram_router.scores(ids_BT, mask_BT.bool())
    weight_BT2 = scores.topk(2, dim=-1).values.softmax(dim=-1)
    expected = ids_BT.numel() + int((weight_BT2[..., 1] >= min_weight).sum())
    assert sum(rows) == expected  # one expert per token, plus the second where it is kept
    model.set_dispatch("all")
    with torch.no_grad():
        dense = model(ids_BT, attention_mask=mask_BT).logits
    real = mask_BT.bool()
    torch.testing.assert_close(sparse[real], dense[real], rtol=1e-5, atol=1e-5)
    if min_weight == 0.45:  # nearly always one expert: equals k = 1 where the second is dropped
        for block in model.moe_blocks():
            block.top_k, block.min_weight = 1, 0.0
        model.set_dispatch("sparse")
        with torch.no_grad():
            one = model(ids_BT, attention_mask=mask_BT).logits
        single_BT = (weight_BT2[..., 1] < 0.45) & real
        first = single_BT.cumprod(dim=1).bool()  # positions before any two-expert position
        torch.testing.assert_close(one[first], sparse[first], rtol=1e-5, atol=1e-5)


def test_min_weight_above_one_over_k_keeps_the_top_expert():
    # k = 3: the top weight is only >= 1/3, so min_weight 0.45 may exceed it; it still runs
    # (alone, weight 1) instead of every weight being dropped (0/0).
    model = _ngram_model(k=3, seed=4)
    block = model.moe_blocks()[0]
    block.min_weight = 0.45
    weight_N3 = torch.tensor([[0.4, 0.35, 0.25], [0.5, 0.3, 0.2], [0.45, 0.45, 0.1]])
    got = block._pruned(weight_N3)
    assert torch.equal(got, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))
    ids_BT, mask_BT = _left_padded(batch=2, length=7, seed=5)
    for b in model.moe_blocks():
        b.temperature = 50.0  # nearly equal weights: the top one below 0.45 everywhere
    with torch.no_grad():
        logits = model(ids_BT, attention_mask=mask_BT).logits
    assert torch.isfinite(logits[mask_BT.bool()]).all()


def test_bad_min_weight_is_refused():
    with pytest.raises(ValueError, match="min_weight"):
        DumeConfig(base_config=tiny_base_config().to_dict(), routing={"min_weight": 0.5})
    with pytest.raises(ValueError, match="min_weight"):
        RoutingSpec(min_weight=-0.1)


def test_bench_option_selection_keeps_the_paper_once_as_speed_reference():
    from dume_dist.bench.routing import DEFAULT_OPTIONS, select_options

    assert select_options(None) == list(DEFAULT_OPTIONS)
    chosen = select_options(["paper (token", "ngram ("])
    labels = [label for label, _ in chosen]
    assert (
        labels[0].startswith("paper (token") and sum(lab.startswith("paper") for lab in labels) == 1
    )
    assert any(lab.startswith("ngram (") for lab in labels)
    only_ngram = select_options(["ngram ("])
    assert only_ngram[0] is DEFAULT_OPTIONS[0] and len(only_ngram) == 2
    with pytest.raises(ValueError, match="no routing option"):
        select_options(["nothing like it"])
