"""The per-token bound on the router features' norm, from the backbone's weights: the norm that
feeds each MLP is found for families the table does not name, and the bound holds on real
forwards with random weights (random norm scales and biases, so it is not trivially met)."""

from __future__ import annotations

import pytest
import torch
import transformers

from dume_dist.model.collect import mlp_inputs
from dume_dist.model.feature_bounds import (
    MLP_INPUT_NORMS,
    discover_mlp_input_norm,
    mlp_input_norm_sq_bound,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=97)  # fmt: skip


def _config(model_type: str):
    return transformers.CONFIG_MAPPING[model_type](**SMALL)


class StateDictBackbone:
    """What the bound reads of a backbone (config, tensor names, tensors), over a model."""

    def __init__(self, model):
        self.config, self.state = model.config, model.state_dict()

    def names(self):
        return sorted(self.state)

    def tensor(self, name):
        return self.state[name]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gemma", "gemma2"])
def test_discovery_finds_what_the_table_says(model_type):
    assert discover_mlp_input_norm(_config(model_type)) == MLP_INPUT_NORMS[model_type]


@pytest.mark.parametrize(
    "model_type,norm",
    [("granite", "post_attention_layernorm"), ("stablelm", "post_attention_layernorm"),
     ("cohere", "input_layernorm"), ("gpt_neox", "post_attention_layernorm"),
     ("olmo", "post_attention_layernorm"), ("gemma2", "pre_feedforward_layernorm")],
)  # fmt: skip
def test_the_bound_holds_on_families_the_table_does_not_name(model_type, norm):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(model_type)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norm scales and biases far from their init
                p.copy_(torch.randn(p.shape) * 2)
    assert discover_mlp_input_norm(model.config)[0] == norm
    bound = mlp_input_norm_sq_bound(StateDictBackbone(model))
    assert bound is not None and bound.shape == (SMALL["num_hidden_layers"],)
    seen = torch.zeros(SMALL["num_hidden_layers"], dtype=torch.float64)

    def largest(i, x):
        seen[i] = max(float(seen[i]), float(x.double().pow(2).sum(-1).max()))

    ids = torch.randint(0, SMALL["vocab_size"], (4, 24), generator=torch.Generator().manual_seed(1))
    with mlp_inputs(model, largest), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert (seen > 0).all() and (seen <= bound * (1 + 1e-6)).all()
    assert (seen >= bound * 1e-3).all()  # and it is not vacuous


def test_post_norm_families_get_no_bound():
    """OLMo 2 normalises after the MLP: its MLP input is no norm's output."""
    assert discover_mlp_input_norm(_config("olmo2")) is None
    model = transformers.AutoModelForCausalLM.from_config(_config("olmo2"))
    assert mlp_input_norm_sq_bound(StateDictBackbone(model)) is None
