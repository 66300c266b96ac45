"""Tests for dume_dist/model/export_mixtral.py (``--format mixtral``).

A tiny DUME checkpoint is built with the real pipeline (``build_dume``) from three random dense
experts; the export must load as a plain ``MixtralForCausalLM`` (no remote code) and equal our DUME
model with the same bias-free routers, logit for logit, in fp32.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)

from dume_dist.core.solve import solve_routers
from dume_dist.core.stats import load_stats
from dume_dist.model import export_mixtral as em
from dume_dist.model.build import build_dume

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = [f"w{i}" for i in range(60)]
VOCAB = len(SPECIALS) + len(WORDS)
NAMES = ("alpha", "beta", "gamma")
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def save_tokenizer(path: Path) -> None:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(str(path))


def tiny_config(family: str, tie: bool):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        return LlamaConfig(max_position_embeddings=128, rope_parameters=dict(LLAMA3_ROPE), **common)
    return MistralConfig(max_position_embeddings=128, sliding_window=8, **common)


def build_tiny_dume(root: Path, family: str = "llama", tie: bool = False) -> Path:
    """Three random dense experts of one family (different in every tensor), each with its own
    word distribution as domain data, MoErged by ``build_dume`` (lam 1e-2, k 1, T 1)."""
    config = tiny_config(family, tie)
    experts, data = {}, {}
    rng = random.Random(0)
    for i, name in enumerate(NAMES):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.2 * torch.randn_like(param))
        expert_dir = root / f"{family}-{name}"
        model.save_pretrained(str(expert_dir))
        save_tokenizer(expert_dir)
        words = WORDS[20 * i : 20 * i + 20]
        docs = [" ".join(rng.choice(words) for _ in range(24)) for _ in range(6)]
        (root / f"{family}-{name}.txt").write_text("\n\n".join(docs) + "\n")
        experts[name] = expert_dir
        data[name] = [root / f"{family}-{name}.txt"]
    out = root / f"dume-{family}"
    build_dume(experts, data, out, max_tokens_per_seq=32, batch_size=4, progress=False,
               save_stats=stats_of(out), routing="paper")  # fmt: skip
    return out


def stats_of(dume_dir: Path) -> Path:
    """Where ``build_tiny_dume`` keeps the statistics of ``dume_dir`` (never inside it)."""
    return Path(dume_dir).parent / f"{Path(dume_dir).name}-stats"


@pytest.fixture(scope="module")
def llama_dume(tmp_path_factory) -> Path:
    return build_tiny_dume(tmp_path_factory.mktemp("llama"), "llama", tie=False)


@pytest.fixture(scope="module")
def mistral_dume(tmp_path_factory) -> Path:
    return build_tiny_dume(tmp_path_factory.mktemp("mistral"), "mistral", tie=False)


@pytest.fixture(scope="module")
def tied_dume(mistral_dume, tmp_path_factory) -> Path:
    """The mistral checkpoint with tied embeddings: lm_head dropped, the embedding serving as both.
    (Derived by editing: ``build_dume`` cannot build tied experts yet.)"""
    dst = _edited_copy(
        mistral_dume, tmp_path_factory.mktemp("tied") / "dume", tie_word_embeddings=True
    )
    shutil.copytree(stats_of(mistral_dume), stats_of(dst))
    weights = load_file(str(dst / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def input_ids(batch: int = 2, length: int = 20) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(len(SPECIALS), VOCAB, (batch, length), generator=gen)


def load_mixtral(path: Path) -> MixtralForCausalLM:
    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), output_loading_info=True, dtype=torch.float32
    )
    assert type(model) is MixtralForCausalLM
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize(
    "family, top_k, temperature, layout, shard_bytes",
    [
        ("llama", 1, 1.0, "per_expert", None),
        ("llama", 2, 0.5, "per_expert", 40_000),
        ("llama", 2, 3.0, "fused", None),
        ("mistral", 2, 0.5, "per_expert", None),
        ("tied", 2, 0.5, "per_expert", None),
    ],
)
def test_export_equals_dume_with_bias_free_routers(
    request, tmp_path, family, top_k, temperature, layout, shard_bytes
):
    dume_dir = request.getfixturevalue(f"{family}_dume")
    kwargs = {"max_shard_bytes": shard_bytes} if shard_bytes else {}
    kwargs["verify"] = family != "tied"  # edited copy: its manifest checksums are stale
    out = em.export_mixtral(
        dume_dir,
        tmp_path / "mixtral",
        top_k=top_k,
        temperature=temperature,
        layout=layout,
        **kwargs,
        stats_dir=stats_of(dume_dir),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixtral"]  # no temporary left over
    if shard_bytes:
        assert (out / "model.safetensors.index.json").is_file()
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    mixtral = load_mixtral(out)
    assert mixtral.config.num_experts_per_tok == top_k
    assert mixtral.config.num_local_experts == len(NAMES)

    dume = load_dume_reference(dume_dir, top_k, temperature)
    dume.set_record_routing(True)
    ids = input_ids()
    with torch.no_grad():
        want = dume(ids).logits
        got = mixtral(ids).logits
    chosen = {int(e) for block in dume.moe_blocks() for e in block.last_topk_index.flatten()}
    assert len(chosen) >= 2, "routing must use several experts for the comparison to mean much"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def load_dume_reference(dume_dir: Path, top_k: int, temperature: float):
    dume = em.load_dume_with_bias_free_routers(
        dume_dir,
        top_k=top_k,
        temperature=temperature,
        dtype=torch.float32,
        stats_dir=stats_of(dume_dir),
    ).eval()
    for block in dume.moe_blocks():
        assert torch.count_nonzero(block.router.bias) == 0
        assert (block.top_k, block.temperature) == (top_k, temperature)
    return dume


def test_gate_is_the_bias_free_ridge_solution_over_t(llama_dume, tmp_path):
    manifest = json.loads((llama_dume / "dume_manifest.json").read_text())
    contributions = {
        name: (j, load_stats(stats_of(llama_dume) / name / "fit.safetensors"))
        for j, name in enumerate(NAMES)
    }
    want = solve_routers(contributions, len(NAMES), lam=manifest["lam"], bias=False)
    biased = solve_routers(contributions, len(NAMES), lam=manifest["lam"], bias=True)
    out = em.export_mixtral(
        llama_dume, tmp_path / "m", temperature=0.25, stats_dir=stats_of(llama_dume)
    )
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for layer, router in enumerate(want):
            gate = f.get_tensor(f"model.layers.{layer}.block_sparse_moe.gate.weight")
            torch.testing.assert_close(gate.double(), router.weight_EF / 0.25, rtol=1e-6, atol=0)
            # Not DUME's router with its bias dropped: the intercept-free problem differs.
            assert not torch.allclose(router.weight_EF, biased[layer].weight_EF, atol=1e-3)
    info = json.loads((out / em.EXPORT_INFO_NAME).read_text())
    assert (info["lam"], info["temperature"], info["top_k"]) == (manifest["lam"], 0.25, 1)
    # Another lam gives another router.
    other = em.bias_free_routers(llama_dume, lam=10.0, stats_dir=stats_of(llama_dume))
    assert not torch.allclose(other[0].weight_EF, want[0].weight_EF, atol=1e-3)


def test_config_carries_the_dense_settings_and_llama3_rope(llama_dume, tmp_path):
    out = em.export_mixtral(llama_dume, tmp_path / "m", stats_dir=stats_of(llama_dume))
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "mixtral" and raw["architectures"] == ["MixtralForCausalLM"]
    assert "auto_map" not in raw
    assert raw["rope_parameters"] == LLAMA3_ROPE
    dense = tiny_config("llama", tie=False)
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_act",
    ):
        assert raw[key] == getattr(dense, key), key
    assert raw["sliding_window"] is None
    assert raw["num_local_experts"] == 3 and raw["num_experts_per_tok"] == 1
    assert raw["router_jitter_noise"] == 0.0 and raw["output_router_logits"] is False
    assert raw["dtype"] == "float32"

    mixtral = load_mixtral(out)
    llama = LlamaForCausalLM(dense)
    assert mixtral.model.rotary_emb.rope_type == "llama3"
    torch.testing.assert_close(mixtral.model.rotary_emb.inv_freq, llama.model.rotary_emb.inv_freq)
    assert mixtral.model.rotary_emb.attention_scaling == llama.model.rotary_emb.attention_scaling
    # The scaling is not a no-op at this size: plain rope differs.
    plain_config = tiny_config("llama", tie=False)
    plain_config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    plain = LlamaForCausalLM(plain_config)
    assert not torch.allclose(mixtral.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)

    tok_in, tok_out = (
        AutoTokenizer.from_pretrained(str(llama_dume)),
        AutoTokenizer.from_pretrained(str(out)),
    )
    text = "w1 w5 w42 w7"
    assert tok_out(text)["input_ids"] == tok_in(text)["input_ids"]


def test_mistral_sliding_window_and_tied_embeddings(mistral_dume, tied_dume, tmp_path):
    out = em.export_mixtral(mistral_dume, tmp_path / "m", stats_dir=stats_of(mistral_dume))
    raw = json.loads((out / "config.json").read_text())
    assert raw["sliding_window"] == 8 and raw["tie_word_embeddings"] is False
    out = em.export_mixtral(
        tied_dume, tmp_path / "t", verify=False, stats_dir=stats_of(mistral_dume)
    )
    raw = json.loads((out / "config.json").read_text())
    assert raw["sliding_window"] == 8 and raw["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    mixtral = load_mixtral(out)
    assert mixtral.lm_head.weight.data_ptr() == mixtral.model.embed_tokens.weight.data_ptr()


def _edited_copy(src: Path, dst: Path, **base_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["base_config"].update(base_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "qwen2"}, "family 'qwen2' are not supported"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ],
)
def test_unrepresentable_models_are_refused_before_writing(llama_dume, tmp_path, changes, message):
    bad = _edited_copy(llama_dume, tmp_path / "src" / "bad", **changes)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ValueError, match=message) as err:
        em.export_mixtral(bad, work / "out", verify=False, stats_dir=stats_of(llama_dume))
    assert "\n" not in str(err.value)
    assert list(work.iterdir()) == []


def test_bad_inputs_are_refused(llama_dume, tmp_path):
    with pytest.raises(ValueError, match="not a DUME checkpoint"):
        em.export_mixtral(
            llama_dume.parent / "llama-alpha", tmp_path / "a", stats_dir=stats_of(llama_dume)
        )
    with pytest.raises(ValueError, match="top_k must be"):
        em.export_mixtral(llama_dume, tmp_path / "a", top_k=4, stats_dir=stats_of(llama_dume))
    with pytest.raises(ValueError, match="onto itself"):
        em.export_mixtral(llama_dume, llama_dume, overwrite=True, stats_dir=stats_of(llama_dume))
    with pytest.raises(ValueError, match="layout must be"):
        em.export_mixtral(
            llama_dume, tmp_path / "a", layout="w1w2w3", stats_dir=stats_of(llama_dume)
        )
    assert not (llama_dume / "stats").exists()  # statistics are kept outside the model
    with pytest.raises(ValueError, match="no statistics for expert 'alpha'"):
        em.export_mixtral(llama_dume, tmp_path / "a")
    nostats = tmp_path / "nostats"
    shutil.copytree(stats_of(llama_dume), nostats)
    shutil.rmtree(nostats / "beta")
    with pytest.raises(ValueError, match="no statistics for expert 'beta'"):
        em.export_mixtral(llama_dume, tmp_path / "a", stats_dir=nostats)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(llama_dume, corrupt)
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="corrupt"):
        em.export_mixtral(corrupt, tmp_path / "a", stats_dir=stats_of(llama_dume))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        em.export_mixtral(llama_dume, tmp_path / "full", stats_dir=stats_of(llama_dume))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt", "full", "nostats"]


def test_failure_while_writing_leaves_nothing(llama_dume, tmp_path, monkeypatch):
    calls = []

    def failing_add(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full")
        return original(self, name, tensor)

    original = em.ShardedWriter.add
    monkeypatch.setattr(em.ShardedWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        em.export_mixtral(
            llama_dume, tmp_path / "out", max_shard_bytes=1000, stats_dir=stats_of(llama_dume)
        )
    assert list(tmp_path.iterdir()) == []


def test_gate_follows_the_recorded_priors(llama_dume, tmp_path):
    """A checkpoint whose routing records equal priors gets the equal-priors bias-free gate."""
    copy = tmp_path / "dume"
    shutil.copytree(llama_dume, copy)
    config = json.loads((copy / "config.json").read_text())
    config["routing"]["priors"] = "equal"
    (copy / "config.json").write_text(json.dumps(config))
    contributions = {
        name: (j, load_stats(stats_of(llama_dume) / name / "fit.safetensors"))
        for j, name in enumerate(NAMES)
    }
    lam = json.loads((llama_dume / "dume_manifest.json").read_text())["lam"]
    equal = solve_routers(contributions, len(NAMES), lam=lam, bias=False, priors="equal")
    got = em.bias_free_routers(copy, stats_dir=stats_of(llama_dume))
    tokens = em.bias_free_routers(llama_dume, stats_dir=stats_of(llama_dume))
    for g, e, t in zip(got, equal, tokens):
        assert torch.equal(g.weight_EF, e.weight_EF)
        assert not torch.allclose(g.weight_EF, t.weight_EF, atol=1e-6)
