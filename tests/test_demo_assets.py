"""Checks of the shipped demo assets (data checksums, expert dirs, domain specialisation)."""

from __future__ import annotations

import contextlib
import hashlib
import json

import pytest
import torch

from dume_dist.demo import (
    DEMO_DIR,
    DOMAINS,
    FOUNDING_DOMAINS,
    JOINING_DOMAIN,
    base_dir,
    data_path,
    expert_dir,
)

SEQ = 128
N_SEQ = 4
MODEL_DIRS = {"base": base_dir(), **{d: expert_dir(d) for d in DOMAINS}}


def test_layout_helpers():
    assert JOINING_DOMAIN not in FOUNDING_DOMAINS
    assert len(FOUNDING_DOMAINS) == 4
    assert data_path("python", "valid") == DEMO_DIR / "data" / "python" / "valid.txt"
    with pytest.raises(ValueError):
        expert_dir("klingon")
    with pytest.raises(ValueError):
        data_path("python", "test")


def test_sha256sums_match_text_files():
    data = DEMO_DIR / "data"
    listed = {}
    for line in (data / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    on_disk = {p.relative_to(data).as_posix() for p in data.rglob("*.txt")}
    assert set(listed) == on_disk
    assert on_disk == {f"{d}/{s}.txt" for d in DOMAINS for s in ("train", "valid")}
    for name, digest in listed.items():
        assert hashlib.sha256((data / name).read_bytes()).hexdigest() == digest, name


def test_data_documents_are_blank_line_separated_and_not_tiny():
    sources = json.loads((DEMO_DIR / "data" / "SOURCES.json").read_text())
    for d in DOMAINS:
        assert sources["domains"][d]["valid_documents"] >= 10
        for split in ("train", "valid"):
            text = data_path(d, split).read_text(encoding="utf-8")
            docs = text.split("\n\n")
            assert len(docs) >= 20
            assert min(len(doc.strip()) for doc in docs) >= 500, (d, split)
            assert max(len(doc) for doc in docs) <= 8000, (d, split)
        train = set(data_path(d, "train").read_text(encoding="utf-8").split("\n\n"))
        valid = set(data_path(d, "valid").read_text(encoding="utf-8").split("\n\n"))
        assert not train & valid


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models, toks = {}, {}
    for name, path in MODEL_DIRS.items():
        toks[name] = AutoTokenizer.from_pretrained(path)
        models[name] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return models, toks


def test_dirs_share_architecture_and_tokenizer(loaded):
    models, toks = loaded
    ref_cfg = models["base"].config
    ref_vocab = toks["base"].get_vocab()
    ref_shapes = {k: v.shape for k, v in models["base"].state_dict().items()}
    assert ref_cfg.model_type == "llama"
    assert not ref_cfg.tie_word_embeddings
    for name, m in models.items():
        tok = toks[name]
        assert m.config.to_dict()["hidden_size"] == ref_cfg.hidden_size
        assert {k: v.shape for k, v in m.state_dict().items()} == ref_shapes, name
        assert tok.get_vocab() == ref_vocab, name
        assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
        assert tok.bos_token_id is not None
        assert m.config.vocab_size == len(tok)
        # frozen during fine-tuning: embeddings and lm_head are the base's, bit for bit
        sd, base_sd = m.state_dict(), models["base"].state_dict()
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(sd[k], base_sd[k]), (name, k)


@contextlib.contextmanager
def _one_thread():
    """Tiny forwards on a shared CPU: one thread is several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _valid_batch(tok, domain: str) -> torch.Tensor:
    """N_SEQ windows of SEQ tokens spread over the domain's valid.txt documents."""
    docs = data_path(domain, "valid").read_text(encoding="utf-8").split("\n\n")
    rows = []
    step = len(docs) // N_SEQ
    for i in range(N_SEQ):
        ids = []
        for doc in docs[i * step :]:
            ids += tok(doc[:800])["input_ids"]  # 800 chars > SEQ tokens, < model_max_length
            if len(ids) >= SEQ:
                break
        rows.append(ids[:SEQ])
    return torch.tensor(rows)


@torch.no_grad()
@_one_thread()
def test_each_founding_expert_is_best_on_its_own_domain(loaded):
    models, toks = loaded
    names = [*FOUNDING_DOMAINS, "base"]
    loss = {}
    for d in FOUNDING_DOMAINS:
        x = _valid_batch(toks["base"], d)
        for name in names:
            loss[name, d] = models[name](input_ids=x, labels=x).loss.item()
    for d in FOUNDING_DOMAINS:
        others = {n: loss[n, d] for n in names if n != d}
        assert loss[d, d] < min(others.values()), (d, loss[d, d], others)


@torch.no_grad()
@_one_thread()
def test_joining_expert_is_best_on_its_domain(loaded):
    models, toks = loaded
    x = _valid_batch(toks["base"], JOINING_DOMAIN)
    own = models[JOINING_DOMAIN](input_ids=x, labels=x).loss.item()
    for name in ("base", *FOUNDING_DOMAINS):
        assert own < models[name](input_ids=x, labels=x).loss.item(), name
