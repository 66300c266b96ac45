"""Tests for dume_dist/model/modeling_dume.py.

Pinned to references: the dense Hugging Face models (one expert, or a forced expert, must be the
dense expert), a naive per-token MoE, the "all experts" dispatch, no-cache generation, and a fresh
interpreter that can load the saved directory without dume_dist.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dume_dist.model import modeling_dume
from dume_dist.model.modeling_dume import DumeConfig, DumeForCausalLM, DumeMoeBlock

VOCAB = 96
# Families whose causal LM does something after the decoder stack get values that make it show:
# soft-capping (gemma2), logit scaling (cohere, granite), an LM-head bias (phi); sliding windows
# shorter than the test sequences (gemma2, gemma3).
FAMILY_EXTRAS = {
    "gemma2": {"final_logit_softcapping": 1.5, "attn_logit_softcapping": 5.0, "sliding_window": 4},
    "gemma3_text": {"sliding_window": 4},
    "cohere": {"logit_scale": 0.25},
    "granite": {"logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5},
    "phi": {"partial_rotary_factor": 0.5},
}


def tiny_base_config(family: str = "llama", tie: bool = False):
    return AutoConfig.for_model(
        family,
        **FAMILY_EXTRAS.get(family, {}),
        head_dim=8,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def dense_experts(base_config, num: int, seed: int = 0) -> list[torch.nn.Module]:
    """`num` dense models that differ in every tensor (norms included)."""
    models = []
    for i in range(num):
        torch.manual_seed(seed + i)
        model = AutoModelForCausalLM.from_config(base_config).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.1 * torch.randn_like(param))
        models.append(model)
    return models


def dume_from_dense(dense, backbone: int = 0, seed: int = 0, **config_kwargs) -> DumeForCausalLM:
    """DUME with `dense[backbone]`'s non-MLP tensors, expert j = dense[j]'s MLPs, random routers."""
    config = DumeConfig(
        base_config=dense[0].config.to_dict(), num_experts=len(dense), **config_kwargs
    )
    model = DumeForCausalLM(config).eval()
    state = {k: v for k, v in dense[backbone].state_dict().items() if ".mlp." not in k}
    for j, expert in enumerate(dense):
        for key, value in expert.state_dict().items():
            if ".mlp." in key:
                state[key.replace(".mlp.", f".mlp.experts.{j}.")] = value
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".mlp.router." in name:
            state[name] = torch.randn(param.shape, generator=generator)
    model.load_state_dict(state, strict=True)
    return model


def random_ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


FAMILY_CASES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True)] + [
    (family, False)
    for family in (
        "mistral",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi",
        "phi3",
        "cohere",
        "granite",
        "olmo2",
    )
]


@pytest.mark.parametrize("family,tie", FAMILY_CASES)
def test_one_expert_is_the_dense_model(family, tie):
    dense = dense_experts(tiny_base_config(family, tie), 1)
    dume = dume_from_dense(dense, router_temperature=0.5)
    if tie:
        assert dume.lm_head.weight is dume.model.embed_tokens.weight
    ids = random_ids()
    torch.testing.assert_close(logits_of(dume, ids), logits_of(dense[0], ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family,tie", FAMILY_CASES)
def test_forced_expert_with_its_own_backbone_is_that_dense_expert(family, tie):
    dense = dense_experts(tiny_base_config(family, tie), 3)
    ids = random_ids()
    for j in range(3):
        dume = dume_from_dense(dense, backbone=j, num_experts_per_tok=2)
        dume.set_forced_expert(j)
        torch.testing.assert_close(
            logits_of(dume, ids), logits_of(dense[j], ids), rtol=1e-6, atol=1e-6
        )
        dume.set_forced_expert(None)
        assert not torch.allclose(logits_of(dume, ids), logits_of(dense[j], ids))


def test_per_sequence_forced_experts_match_row_by_row_forcing():
    dume = dume_from_dense(dense_experts(tiny_base_config(), 3))
    ids = random_ids(batch=3)
    dume.set_forced_expert(torch.tensor([2, 0, 2]))
    mixed = logits_of(dume, ids)
    for row, j in enumerate([2, 0, 2]):
        dume.set_forced_expert(j)
        torch.testing.assert_close(mixed[row], logits_of(dume, ids[row : row + 1])[0])


def test_per_token_forced_experts_follow_each_position():
    dume = dume_from_dense(dense_experts(tiny_base_config(), 3))
    ids = random_ids(batch=2)
    length = ids.shape[1]
    switch = length // 2
    per_token = torch.zeros(2, length, dtype=torch.long)
    per_token[:, switch:] = 2
    dume.set_forced_expert(per_token)
    mixed = logits_of(dume, ids)
    dume.set_forced_expert(0)  # causal: positions before the switch never see expert 2
    torch.testing.assert_close(mixed[:, :switch], logits_of(dume, ids)[:, :switch])
    dume.set_forced_expert(torch.full((2, length), 1))
    constant = logits_of(dume, ids)
    dume.set_forced_expert(1)
    torch.testing.assert_close(constant, logits_of(dume, ids))
    assert not torch.allclose(mixed[:, switch:], logits_of(dume, ids)[:, switch:])


def naive_moe(block: DumeMoeBlock, hidden_ND: torch.Tensor) -> torch.Tensor:
    """Token by token: logits = (W x + b) / T, top-k, softmax over the k, weighted expert sum."""
    out = []
    for x in hidden_ND:
        logits = block.router.weight @ x
        if block.router.bias is not None:
            logits = logits + block.router.bias
        logits = logits / block.temperature
        top = logits.argsort(descending=True)[: block.top_k]
        weights = logits[top].softmax(0)
        out.append(sum(w * block.experts[int(j)](x[None])[0] for w, j in zip(weights, top)))
    return torch.stack(out)


@pytest.mark.parametrize("k", [1, 2])
def test_sparse_dispatch_matches_naive_and_all_dispatch(k):
    dume = dume_from_dense(
        dense_experts(tiny_base_config(), 4), num_experts_per_tok=k, router_temperature=0.7
    )
    ids = random_ids(batch=3, length=11)
    dume.set_record_routing(True)
    sparse = logits_of(dume, ids)
    for block in dume.moe_blocks():
        assert block.last_topk_index.shape == (3, 11, k)
        assert block.last_topk_index.unique().numel() >= 2, "routing must spread for this test"
    dume.set_dispatch("all")
    torch.testing.assert_close(logits_of(dume, ids), sparse, rtol=1e-5, atol=1e-5)

    block = dume.moe_blocks()[0]
    hidden_ND = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = naive_moe(block, hidden_ND)
        for mode in ("sparse", "all"):
            dume.set_dispatch(mode)
            torch.testing.assert_close(block(hidden_ND[None])[0], reference, rtol=1e-5, atol=1e-5)


def test_low_precision_input_keeps_dtype():
    block = dume_from_dense(dense_experts(tiny_base_config(), 2), num_experts_per_tok=2)
    block = block.moe_blocks()[0].to(torch.bfloat16)
    hidden = torch.randn(2, 5, 32).to(torch.bfloat16)
    with torch.no_grad():
        assert block(hidden).dtype == torch.bfloat16


def test_routing_record_is_off_by_default():
    dume = dume_from_dense(dense_experts(tiny_base_config(), 2))
    logits_of(dume, random_ids())
    assert all(block.last_topk_index is None for block in dume.moe_blocks())


@pytest.mark.parametrize("router_bias", [True, False])
def test_state_dict_keys_follow_the_contract(router_bias):
    dense = dense_experts(tiny_base_config(), 1)[0]
    dume = DumeForCausalLM(
        DumeConfig(base_config=dense.config.to_dict(), num_experts=2, router_bias=router_bias)
    )
    expected = {k for k in dense.state_dict() if ".mlp." not in k}
    for key in dense.state_dict():
        if ".mlp." in key:
            expected |= {key.replace(".mlp.", f".mlp.experts.{j}.") for j in range(2)}
    for layer in range(2):
        expected.add(f"model.layers.{layer}.mlp.router.weight")
        if router_bias:
            expected.add(f"model.layers.{layer}.mlp.router.bias")
    assert set(dume.state_dict()) == expected
    assert dume.model.layers[0].mlp.router.weight.shape == (2, 32)


def test_loss_is_shifted_cross_entropy():
    dume = dume_from_dense(dense_experts(tiny_base_config(), 2))
    ids = random_ids()
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = dume(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    "k,family", [(1, "llama"), (2, "llama"), (2, "gemma2"), (2, "gemma3_text")]
)
def test_greedy_generation_with_and_without_cache(k, family):
    """Sliding-window layers (gemma2, gemma3) included: the cache is the family's own."""
    config = tiny_base_config(family)
    dume = dume_from_dense(dense_experts(config, 3), num_experts_per_tok=k)
    ids = random_ids(length=5)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    cached = dume.generate(ids, use_cache=True, **kwargs)
    uncached = dume.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)


LOAD_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.modules["dume_dist"] = None  # any import of dume_dist now fails
    import torch
    from transformers import AutoModelForCausalLM

    ids_path, workdir, *model_dirs = sys.argv[1:]
    os.chdir(workdir)
    try:
        import dume_dist  # noqa: F401
        raise SystemExit("dume_dist is importable")
    except ImportError:
        pass
    for model_dir in model_dirs:
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.load(ids_path)).logits
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        result = {"logits": logits, "module": type(model).__module__, "tied": tied}
        torch.save(result, os.path.join(model_dir, "loaded.pt"))
    """
)

SAVE_CASES = [
    ("llama", True, dict(num_experts_per_tok=2, router_temperature=0.5)),
    ("qwen2", False, dict(router_bias=False)),
]


def test_saved_directory_loads_without_dume_dist(tmp_path):
    models, model_dirs = [], []
    for family, tie, config_kwargs in SAVE_CASES:
        dume = dume_from_dense(dense_experts(tiny_base_config(family, tie), 3), **config_kwargs)
        model_dir = tmp_path / family
        dume.save_pretrained(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        assert config["model_type"] == "dume"
        assert config["architectures"] == ["DumeForCausalLM"]
        assert config["auto_map"] == {
            "AutoConfig": "modeling_dume.DumeConfig",
            "AutoModelForCausalLM": "modeling_dume.DumeForCausalLM",
        }
        assert config["base_config"]["model_type"] == family
        assert config["num_experts"] == 3 and len(config["expert_names"]) == 3
        shipped = (model_dir / "modeling_dume.py").read_bytes()
        assert shipped == Path(modeling_dume.__file__).read_bytes()
        models.append(dume)
        model_dirs.append(model_dir)

    ids = random_ids()
    torch.save(ids, tmp_path / "ids.pt")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    env.pop("PYTHONPATH", None)
    # Same intra-op thread count as this process: reductions then round identically.
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    args = [tmp_path / "ids.pt", workdir, *model_dirs]
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, *map(str, args)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for dume, model_dir, (_, tie, _) in zip(models, model_dirs, SAVE_CASES):
        loaded = torch.load(model_dir / "loaded.pt")
        assert "dume_dist" not in loaded["module"]
        assert loaded["tied"] == tie
        torch.testing.assert_close(loaded["logits"], logits_of(dume, ids), rtol=0, atol=0)


def test_from_pretrained_in_bf16_keeps_routers_in_fp32(tmp_path):
    dume = dume_from_dense(dense_experts(tiny_base_config(), 2), num_experts_per_tok=2)
    dume.save_pretrained(tmp_path)
    loaded = DumeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    block = loaded.moe_blocks()[0]
    assert block.router.weight.dtype == torch.float32
    assert block.experts[0].gate_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(block.router.weight, dume.moe_blocks()[0].router.weight)
    assert logits_of(loaded, random_ids()).dtype == torch.bfloat16


def test_config_round_trips_through_json(tmp_path):
    base = tiny_base_config("qwen2").to_dict()
    config = DumeConfig(
        base_config=base,
        num_experts=2,
        num_experts_per_tok=2,
        router_temperature=0.1,
        expert_names=["math", "code"],
    )
    config.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_dume.py").exists()
    loaded = DumeConfig.from_pretrained(tmp_path)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert (loaded.hidden_size, loaded.vocab_size, loaded.num_hidden_layers) == (32, VOCAB, 2)
    assert loaded.expert_names == ["math", "code"] and loaded.routing == {"features": "token"}


BAD_CONFIGS = [
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(num_experts_per_tok=4), "num_experts_per_tok"),
    (dict(router_temperature=0.0), "router_temperature"),
    (dict(router_temperature=-1.0), "router_temperature"),
    (dict(router_bias="yes"), "router_bias"),
    (dict(router_temperature=True), "router_temperature"),
    (dict(num_experts=True), "num_experts"),
    (dict(expert_names=["a", "b"]), "expert_names"),
    (dict(routing={"features": "sequence"}), "routing.features"),
    (dict(routing={"window": 4}), "routing.window"),
    (dict(base_config={"hidden_size": 32}), "base_config"),
]


@pytest.mark.parametrize("bad,key", BAD_CONFIGS)
def test_bad_config_values_raise_naming_the_key(bad, key):
    kwargs = dict(base_config=tiny_base_config().to_dict(), num_experts=3) | bad
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DumeConfig(**kwargs)


def test_bad_runtime_settings_raise():
    dume = dume_from_dense(dense_experts(tiny_base_config(), 3))
    with pytest.raises(ValueError, match="forced expert"):
        dume.set_forced_expert(3)
    with pytest.raises(ValueError, match="forced expert"):
        dume.set_forced_expert(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="dispatch"):
        dume.set_dispatch("dense")
    dume.set_forced_expert(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="forced expert"):
        logits_of(dume, random_ids(batch=2))


def test_module_imports_only_stdlib_torch_and_transformers():
    """The remote code (modeling_dume.py and every file it imports relatively, which transformers
    copies along) imports only the standard library, torch, transformers and those files."""
    from transformers.dynamic_module_utils import get_relative_import_files

    shipped = [Path(modeling_dume.__file__)] + [
        Path(f) for f in get_relative_import_files(modeling_dume.__file__)
    ]
    assert {p.name for p in shipped} == {
        "modeling_dume.py", "configuration_dume.py", "routing_dume.py", "routing_options.py",
        "routing_switch.py",
    }  # fmt: skip
    for path in shipped:
        tree = ast.parse(path.read_text())
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level == 1 and (path.parent / f"{node.module}.py") in shipped
                    continue
                roots.add(node.module.split(".")[0])
        assert roots - {"torch", "transformers"} <= set(sys.stdlib_module_names), path.name


def test_attention_implementation_reaches_the_dense_stack(tmp_path):
    dume = dume_from_dense(dense_experts(tiny_base_config(), 2), num_experts_per_tok=2)
    dume.save_pretrained(tmp_path)
    eager = DumeForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.model.layers[0].self_attn.config._attn_implementation == "eager"
    ids = random_ids()
    torch.testing.assert_close(logits_of(eager, ids), logits_of(dume, ids), rtol=1e-5, atol=1e-5)
    eager.set_attn_implementation("sdpa")
    assert eager.model.layers[0].self_attn.config._attn_implementation == "sdpa"
