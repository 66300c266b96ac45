"""Shared pieces of the distributed tests: tiny random Llama experts on disk, their text, a
short Ray temp dir, and the one-call helpers that drive a coordinator and agents in-process.

Experts: hidden 32, 2 layers, a WordLevel tokenizer; each domain's text uses its own words.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch
from tiny_world import SPECIALS, make_config, make_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

WORDS_PER_DOMAIN = 40
DOMAINS = ("alpha", "beta", "gamma", "delta", "omega")


def _tokenizer(num_words: int):
    return make_tokenizer([f"w{i}" for i in range(num_words)])


def tiny_config(num_words: int) -> LlamaConfig:
    return make_config(vocab_size=len(SPECIALS) + num_words)


def make_experts(root: Path, domains=DOMAINS, seed: int = 0, docs: int = 12) -> dict:
    """{domain: {"expert": dir, "data": train.txt, "valid": valid.txt}} plus "base" dir."""
    root = Path(root)
    num_words = WORDS_PER_DOMAIN * len(DOMAINS)
    config = tiny_config(num_words)
    tokenizer = _tokenizer(num_words)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    out = {"base": root / "base"}
    for i, domain in enumerate(domains):
        g = torch.Generator().manual_seed(seed * 100 + i + 1)
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if ".mlp." in name else 0.01))
        model.save_pretrained(root / "experts" / domain)
        tokenizer.save_pretrained(root / "experts" / domain)
        k = DOMAINS.index(domain)
        words = [f"w{j}" for j in range(k * WORDS_PER_DOMAIN, (k + 1) * WORDS_PER_DOMAIN)]
        rng = random.Random(seed * 1000 + k)
        paths = {}
        for split, n in (("train", docs), ("valid", 4)):
            text = "\n\n".join(
                " ".join(rng.choice(words) for _ in range(rng.randint(10, 30))) for _ in range(n)
            )
            path = root / "data" / domain / f"{split}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
            paths[split] = path
        out[domain] = {
            "expert": root / "experts" / domain,
            "data": paths["train"],
            "valid": paths["valid"],
        }
    return out


def short_ray_tmpdir() -> str:
    """A short temp dir for Ray (socket paths are limited to 107 bytes); RAY_TMPDIR points at it
    so this cluster's address file does not land in the shared /tmp/ray."""
    d = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    os.makedirs(os.path.join(d, "ray"), exist_ok=True)
    return d
