"""Tiny real experts on disk for tests: random Llama experts (hidden 32, 2 layers) sharing
a base, each with its own MLP perturbation, a WordLevel tokenizer, and per-domain text
drawn from its own part of the vocabulary. Saved with ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
NUM_WORDS = 240
DOMAINS = {"alpha": range(0, 80), "beta": range(80, 160), "gamma": range(160, 240)}


def make_tokenizer(words):
    vocab = {t: i for i, t in enumerate(SPECIALS + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def make_config(**overrides) -> LlamaConfig:
    kw = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(SPECIALS) + NUM_WORDS, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_expert(path, base_state, config, tokenizer, seed, mlp_scale=0.3, other_scale=0.01):
    g = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in base_state and base_state[name].shape == p.shape:
                p.copy_(base_state[name])
            scale = mlp_scale if ".mlp." in name else other_scale
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def domain_doc(words, i, n):
    return " ".join(f"w{words[(i * 7 + j * 3) % len(words)]}" for j in range(n))


def make_world(root: Path, domains=DOMAINS, num_docs: int = 12) -> dict:
    """Experts ``root/<domain>`` and text ``root/<domain>.txt`` for every domain."""
    root = Path(root)
    tokenizer = make_tokenizer([f"w{i}" for i in range(NUM_WORDS)])
    torch.manual_seed(0)
    base = LlamaForCausalLM(make_config())
    base.save_pretrained(root / "base")
    state = base.state_dict()
    experts, data = {}, {}
    for k, (name, word_range) in enumerate(domains.items()):
        save_expert(root / name, state, make_config(), tokenizer, seed=k + 1)
        experts[name] = root / name
        docs = [domain_doc(list(word_range), i, 5 + 3 * i) for i in range(num_docs)]
        (root / f"{name}.txt").write_text("\n\n".join(docs) + "\n")
        data[name] = [root / f"{name}.txt"]
    return {
        "root": root,
        "experts": experts,
        "data": data,
        "tokenizer": tokenizer,
        "base_state": state,
    }
