"""Dense families beyond Llama, end to end: experts of each family saved with ``save_pretrained``
(with a tokenizer), ``dume build`` with the default routing, the checkpoint loaded as a user
loads it (``AutoModelForCausalLM``, remote code). Pinned to the dense experts themselves: where
the experts share every tensor outside their MLPs, the averaged backbone is that tensor, so DUME
forced to expert j must give expert j's logits — including what the family's causal LM does
after the decoder stack (Gemma 2's soft-capping, Granite's logit scaling, Phi's LM-head bias).
A family whose causal LM holds weights DUME would not carry is refused naming them.
"""

from __future__ import annotations

import pytest
import torch
from tiny_world import DOMAINS, domain_doc, make_tokenizer
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)

from dume_dist.model.build import build_dume
from dume_dist.model.experts import load_expert_spec
from dume_dist.model.modeling_dume import DumeConfig, DumeForCausalLM

torch.set_num_threads(1)

FAMILY_SETTINGS = {
    "gemma2": {"final_logit_softcapping": 1.5},
    "granite": {"logits_scaling": 4.0, "embedding_multiplier": 2.0},
    "phi": {"partial_rotary_factor": 0.5},
}


def _family_world(root, family: str, tie: bool = False) -> tuple[dict, dict]:
    """Two experts of ``family`` that differ only in their MLPs, and each one's text (also
    ``scripts/family_sweep.py``'s; ``tie``: tied embeddings)."""
    tokenizer = make_tokenizer([f"w{i}" for i in range(240)])
    config = AutoConfig.for_model(
        family, **FAMILY_SETTINGS.get(family, {}),
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # no tensor left at its initial value (biases start at zero)
        for param in base.parameters():
            param.add_(torch.randn(param.shape) * 0.05)
    experts, data = {}, {}
    for k, (name, words) in enumerate(list(DOMAINS.items())[:2]):
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if ".mlp." in key:
                    param.add_(torch.randn(param.shape, generator=g) * 0.3)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        experts[name] = root / name
        docs = [domain_doc(list(words), i, 5 + 3 * i) for i in range(12)]
        (root / f"{name}.txt").write_text("\n\n".join(docs) + "\n")
        data[name] = [root / f"{name}.txt"]
    return experts, data


@pytest.mark.parametrize(
    "family,routing", [("gemma2", None), ("gemma2", "paper"), ("granite", None), ("phi", "context")]
)
def test_forced_expert_of_a_built_checkpoint_is_the_dense_expert(tmp_path, family, routing):
    """The default routing (token ids) and the linear kinds (hidden states at each MLP's input,
    collected on the family's own dense model)."""
    experts, data = _family_world(tmp_path, family)
    build_dume(experts, data, tmp_path / "dume", routing=routing, progress=False)
    dume = AutoModelForCausalLM.from_pretrained(tmp_path / "dume", trust_remote_code=True).eval()
    assert dume.config.base_config["model_type"] == family
    ids = torch.randint(4, 244, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for j, name in enumerate(dume.config.expert_names):
            dense = AutoModelForCausalLM.from_pretrained(experts[name]).eval()
            dume.set_forced_expert(j)
            torch.testing.assert_close(dume(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        dume.set_forced_expert(None)
        routed = dume(ids, labels=ids)
    assert torch.isfinite(routed.loss)
    if family == "gemma2":  # soft-capped at 1.5 as the family does
        assert float(routed.logits.abs().max()) <= 1.5


class _ExtraConfig(LlamaConfig):
    model_type = "dume_test_extra_head"


class _ExtraModel(LlamaModel):
    config_class = _ExtraConfig


class _ExtraForCausalLM(LlamaForCausalLM):
    """A family whose causal LM holds a weight of its own after the stack."""

    config_class = _ExtraConfig

    def __init__(self, config):
        super().__init__(config)
        self.value_head = torch.nn.Linear(config.hidden_size, 1)


def test_a_family_whose_causal_lm_holds_more_weights_is_refused():
    AutoConfig.register(_ExtraConfig.model_type, _ExtraConfig, exist_ok=True)
    AutoModel.register(_ExtraConfig, _ExtraModel, exist_ok=True)
    AutoModelForCausalLM.register(_ExtraConfig, _ExtraForCausalLM, exist_ok=True)
    base = _ExtraConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="value_head"):
        DumeForCausalLM(DumeConfig(base_config=base.to_dict(), num_experts=2))


def _refused_before_collecting(tmp_path, make_model, tokenizer, match: str) -> None:
    """Two experts ``make_model()`` saved with ``tokenizer``: ``build_dume`` refuses them
    (ValueError matching ``match``) and writes nothing."""
    for name in ("one", "two"):
        make_model().save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        (tmp_path / f"{name}.txt").write_text("a b a b\n\nb a b a\n")
    with pytest.raises(ValueError, match=match):
        build_dume(
            {n: tmp_path / n for n in ("one", "two")},
            {n: [tmp_path / f"{n}.txt"] for n in ("one", "two")},
            tmp_path / "out",
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_build_refuses_such_a_family_before_collecting(tmp_path):
    AutoConfig.register(_ExtraConfig.model_type, _ExtraConfig, exist_ok=True)
    AutoModel.register(_ExtraConfig, _ExtraModel, exist_ok=True)
    AutoModelForCausalLM.register(_ExtraConfig, _ExtraForCausalLM, exist_ok=True)
    tokenizer = make_tokenizer(["a", "b"])
    config = _ExtraConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    _refused_before_collecting(
        tmp_path, lambda: _ExtraForCausalLM(config), tokenizer, r"^expert one: .*value_head"
    )


def test_a_family_with_linear_attention_layers_is_refused(tmp_path):
    tokenizer = make_tokenizer(["a", "b"])
    config = AutoConfig.for_model(
        "qwen3_next", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hybrid")
    tokenizer.save_pretrained(tmp_path / "hybrid")
    with pytest.raises(ValueError, match=r"^expert hybrid: layers of type \['linear_attention'\]"):
        load_expert_spec("hybrid", tmp_path / "hybrid")


def test_an_expert_that_is_itself_a_mixture_of_experts_is_refused_before_collecting(tmp_path):
    """Its MLPs are a router and per-expert weights: built as if dense, the load dropped them
    (random MLPs, no error); refused naming the layer's MLP class."""
    tokenizer = make_tokenizer(["a", "b"])
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    _refused_before_collecting(
        tmp_path, lambda: AutoModelForCausalLM.from_config(config), tokenizer,
        r"^expert one: layer 0's MLP is Qwen3MoeSparseMoeBlock",
    )  # fmt: skip
