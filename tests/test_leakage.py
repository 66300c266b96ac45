"""The leakage bench's attacks against references: exact recovery where the statistics determine
the answer (n-gram unigrams and hashed bigrams without collisions; Grams of tokens whose features
are their templates), and the scores' definitions."""

from __future__ import annotations

import pytest
import torch

from dume_dist.bench.leakage import (
    GramAttack,
    bigram_precision,
    kl_divergence,
    recover_bigrams,
    topk_overlap,
    true_top_bigrams,
)
from dume_dist.core.stats import GramAccumulator
from dume_dist.model.kinds.ngram import collect_ngram_stats


def test_hashed_bigram_counts_give_the_frequent_bigrams_back():
    g = torch.Generator().manual_seed(0)
    vocab = 60
    ids = torch.randint(0, vocab, (4, 400), generator=g)
    ids[:, 1::2] = (ids[:, ::2] * 7 + 3) % vocab  # frequent, structured bigrams
    stats = collect_ngram_stats([(ids, torch.ones_like(ids))], vocab_size=vocab, buckets=1 << 16,
                                max_tokens_per_seq=400, pairs=True, progress=False)  # fmt: skip
    truth = true_top_bigrams(stats.pairs_K3, 20)
    assert bigram_precision(truth, recover_bigrams(stats, top=20)) >= 0.9


def test_gram_attack_recovers_a_bag_of_tokens_from_its_gram():
    g = torch.Generator().manual_seed(1)
    vocab, dim, layers = 40, 24, 2
    templates = [torch.randn(vocab, dim, generator=g, dtype=torch.float64) for _ in range(layers)]
    counts = torch.zeros(vocab, dtype=torch.float64)
    counts[:8] = torch.tensor([50, 30, 20, 10, 5, 3, 2, 1], dtype=torch.float64)
    acc = GramAccumulator(layers, dim)
    ids = torch.repeat_interleave(torch.arange(vocab), counts.long())
    for layer in range(layers):
        acc.add(layer, templates[layer][ids])
    guess = GramAttack(templates, steps=3000)(acc.result().gram_LPP, dim)
    assert topk_overlap(counts, guess, 5) == 1.0
    assert kl_divergence(counts, guess) < 0.05
    assert kl_divergence(counts, torch.ones(vocab)) > 1.0  # the uniform guess is far


def test_scores():
    p = torch.tensor([5.0, 3.0, 2.0, 0.0])
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-5)
    assert topk_overlap(p, torch.tensor([0.0, 1.0, 2.0, 3.0]), 2) == 0.0
