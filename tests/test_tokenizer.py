"""One tokenizer everywhere, and build defaults that adapt to the experts and their data.

Qwen2 experts whose ``tokenizer.json`` has a plain byte-level pre-tokenizer: ``AutoTokenizer``
loads them as ``Qwen2Tokenizer``, which re-derives Qwen's pre-tokenizer, so the file read as it is
tokenizes differently. The checkpoint must load (``AutoTokenizer``, remote code) to the experts'
tokenization, and the statistics must be counted with it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_world import DOMAINS, make_world
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from dume_dist.model.build import build_dume, chunk_documents, split_holdout
from dume_dist.model.data import load_texts, token_batches
from dume_dist.model.tokenizer import SAMPLE_TEXT, check_expert_tokenizer, load_tokenizer

TEXT = {
    "digits": [f"order {i * 7919} of {i * 104729} items, total {i * 31337}.\n" * 4 for i in range(30)],
    "prose": [f"It's the {i}th day; we'll see what they've done. Don't stop now.\n" * 4 for i in range(30)],
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _byte_level_bpe(texts) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 digit runs
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(texts + [SAMPLE_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def qwen_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    tokenizer = _byte_level_bpe([d for docs in TEXT.values() for d in docs])
    config = Qwen2Config(
        vocab_size=len(tokenizer) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, use_sliding_window=False,
    )  # fmt: skip
    experts, data = {}, {}
    for k, name in enumerate(TEXT):
        torch.manual_seed(k)
        Qwen2ForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        experts[name] = root / name
        (root / f"{name}.txt").write_text("\n\n".join(TEXT[name]) + "\n")
        data[name] = [root / f"{name}.txt"]
    return {"root": root, "experts": experts, "data": data}


def test_qwen2_fixture_is_the_case_of_the_bug(qwen_world):
    path = qwen_world["experts"]["digits"]
    auto = AutoTokenizer.from_pretrained(str(path))
    as_file = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    assert type(auto).__name__ == "Qwen2Tokenizer"
    assert auto(SAMPLE_TEXT)["input_ids"] != as_file(SAMPLE_TEXT)["input_ids"]


@pytest.fixture(scope="module")
def qwen_built(qwen_world):
    """``(checkpoint dir, build result)`` of the Qwen2 experts (n-gram routing, fixed μ)."""
    out = qwen_world["root"] / "built"
    result = build_dume(
        qwen_world["experts"], qwen_world["data"], out,
        routing={"features": "ngram", "solver": "nb", "lam": 100.0, "top_k": 1}, progress=False,
    )  # fmt: skip
    return out, result


def test_checkpoint_tokenizer_and_statistics_follow_the_experts_autotokenizer(
    qwen_world, qwen_built
):
    out, result = qwen_built
    expert_tok = AutoTokenizer.from_pretrained(str(qwen_world["experts"]["digits"]))
    users_tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert type(users_tok).__name__ == type(expert_tok).__name__ == "Qwen2Tokenizer"
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "Qwen2Tokenizer"
    )
    for text in [SAMPLE_TEXT, *TEXT["digits"][:3], *TEXT["prose"][:3]]:
        assert users_tok(text)["input_ids"] == expert_tok(text)["input_ids"]
    # the statistics counted the experts' tokenization: every token, windows of 64 (the limit)
    for name in TEXT:
        texts = load_texts(qwen_world["data"][name])
        counts = torch.zeros(result.stats[name].vocab_size, dtype=torch.float64)
        for ids_BT, mask_BT in token_batches(expert_tok, texts, 8, 64, 64):
            counts += torch.bincount(ids_BT[mask_BT.bool()], minlength=len(counts)).double()
        assert torch.equal(result.stats[name].unigram_V, counts)
    assert result.manifest["build"]["max_tokens_per_seq"] == 64  # the experts' position limit


def test_the_model_cards_use_block_loads_without_asking(qwen_world, qwen_built):
    """The card's "Use" lines, run as written in a fresh process with no terminal: the model and
    the experts' tokenization load, and ``AutoTokenizer`` neither asks to run the checkpoint's
    code nor falls back to a bare config (it reads the config's ``auto_map`` too)."""
    out, _ = qwen_built
    card = (out / "README.md").read_text()
    use = card.split("## Use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    expert_tok = AutoTokenizer.from_pretrained(str(qwen_world["experts"]["digits"]))
    script = use.replace('"DIR"', repr(str(out))) + (
        f"print(tokenizer({SAMPLE_TEXT!r})['input_ids'] == {expert_tok(SAMPLE_TEXT)['input_ids']!r},"
        " type(tokenizer).__name__, type(model).__name__)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, stdin=subprocess.DEVNULL,
        timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "Qwen2Tokenizer", "DumeForCausalLM"]
    assert "custom code" not in run.stderr and "model of type" not in run.stderr, run.stderr


def test_experts_whose_tokenizers_disagree_are_refused(tmp_path):
    world = make_world(tmp_path, num_docs=6)
    beta = world["experts"]["beta"] / "tokenizer.json"
    spec = json.loads(beta.read_text())
    spec["pre_tokenizer"] = {"type": "WhitespaceSplit"}  # same vocabulary, other splitting
    beta.write_text(json.dumps(spec))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="experts alpha and beta disagree") as info:
        build_dume(
            {n: world["experts"][n] for n in ("alpha", "beta")},
            {n: world["data"][n] for n in ("alpha", "beta")}, out, progress=False,
        )  # fmt: skip
    assert "\n" not in str(info.value)
    assert not out.exists()
    with pytest.raises(ValueError, match="disagree"):
        check_expert_tokenizer(world["experts"]["alpha"], world["experts"]["beta"])
    shutil.copy(world["experts"]["alpha"] / "tokenizer.json", beta)
    assert type(check_expert_tokenizer(world["experts"]["alpha"], world["experts"]["beta"]))


def test_a_tokenizer_that_autotokenizer_turns_into_no_tokens_is_refused(tmp_path):
    """A Qwen2 expert with a word-level ``tokenizer.json``: ``Qwen2Tokenizer`` (what users get)
    re-derives a byte-level BPE from it and gives no ids at all; refused in one line naming the
    class, before anything is collected (was: "no tokens to collect statistics from")."""
    from tiny_world import make_tokenizer

    tokenizer = make_tokenizer(["w1", "w2"])
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2,
    )  # fmt: skip
    for name in ("one", "two"):
        Qwen2ForCausalLM(config).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        (tmp_path / f"{name}.txt").write_text("w1 w2 w1 w2\n\nw2 w1 w2 w1\n")
    with pytest.raises(
        ValueError, match=r"expert one \(Qwen2Tokenizer\) turns .* no tokens"
    ) as info:
        build_dume(
            {n: tmp_path / n for n in ("one", "two")},
            {n: [tmp_path / f"{n}.txt"] for n in ("one", "two")}, tmp_path / "out",
            progress=False,
        )  # fmt: skip
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unreadable_tokenizer_is_a_one_line_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="cannot load the tokenizer") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


def test_one_long_document_per_domain_and_fixed_settings_need_no_more(tmp_path):
    world = make_world(tmp_path, num_docs=20)
    for name in DOMAINS:  # one long document: the blank lines between documents removed
        path = world["data"][name][0]
        path.write_text(" ".join(load_texts(path)) + "\n")
    names = ("alpha", "beta")
    experts = {n: world["experts"][n] for n in names}
    data = {n: world["data"][n] for n in names}
    auto = build_dume(experts, data, tmp_path / "auto", routing="ngram", progress=False)
    assert auto.routing.selection is not None
    assert all(s.num_tokens > 0 for s in auto.holdout_stats[0.0].values())
    fixed = build_dume(
        experts, data, tmp_path / "fixed", routing="ngram", lam=100.0, progress=False
    )
    assert fixed.holdout_stats == {} and fixed.routing.lam == 100.0
    assert len(load_texts(data["alpha"])) == 1
    assert fixed.stats["alpha"].num_tokens > auto.stats["alpha"].num_tokens  # all of it: no split


def test_chunked_holdout_split_is_disjoint_covering_and_stable():
    doc = "\n".join(f"line {i} " + "word " * (i % 17) for i in range(400))
    chunks = chunk_documents([doc], 40)
    assert 35 <= len(chunks) <= 45
    assert " ".join(chunks).split() == doc.split()
    fit, held = split_holdout([doc], 0.1, "x")
    assert fit and held and not set(fit) & set(held)
    assert sorted(fit + held) == sorted(chunks)
    assert split_holdout([doc], 0.1, "x") == (fit, held)
    assert len(chunk_documents(["a " * 3000], 10)) == 10  # one line, cut at spaces
