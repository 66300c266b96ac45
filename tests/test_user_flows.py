"""What a user does with a built checkpoint beyond a forward: resize its embeddings (new special
tokens, padding the vocabulary to a multiple) and keep training, saving and reloading; load it
with a device map that offloads weights (``accelerate``'s hooks load a module's weights only
while that module is called). Tiny experts of ``test_families._family_world``, loaded as a user
loads them (``AutoModelForCausalLM``, remote code).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_families import _family_world
from transformers import AutoModelForCausalLM

from dume_dist.model.build import build_dume

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 244  # _family_world's tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(routing, tied) -> a built checkpoint's directory: llama experts, untied and tied."""
    out = {}
    for tie in (False, True):
        root = tmp_path_factory.mktemp(f"tie{int(tie)}")
        experts, data = _family_world(root, "llama", tie=tie)
        for routing in (None, "paper"):
            out[routing, tie] = root / f"dume_{routing}"
            build_dume(experts, data, out[routing, tie], routing=routing, progress=False)
    return out


def _load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("routing,tie", [(None, False), (None, True), ("paper", False), ("paper", True)])  # fmt: skip
def test_resized_embeddings_reach_the_logits_the_loss_the_router_and_a_reload(
    built, tmp_path, routing, tie
):
    """``resize_token_embeddings`` (a new token, then padded to a multiple of 64): the logits
    cover the new vocabulary, a new token is read (the default routing's per-token tables grow
    with it), the loss is the cross-entropy of those logits, the output embeddings stay tied
    where they were, and the saved model reloads with the same logits."""
    model = _load(built[routing, tie])
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    model.resize_token_embeddings(VOCAB + 1, pad_to_multiple_of=64)
    vocab = VOCAB + 1 + (-(VOCAB + 1)) % 64
    assert model.get_input_embeddings().weight.shape[0] == vocab
    assert model.get_output_embeddings().weight.shape[0] == vocab
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == tie
    assert model.config.vocab_size == model.config.base_config["vocab_size"] == vocab
    new_ids = ids.clone()
    new_ids[0, 3] = VOCAB  # the new token, as input and as label
    with torch.no_grad():
        out = model(new_ids, labels=new_ids)
        old = model(ids).logits
    assert out.logits.shape[-1] == vocab
    logits = out.logits[:, :-1]
    manual = F.cross_entropy(logits.reshape(-1, vocab), new_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    if routing == "paper":  # routers on hidden states: the old tokens' logits are unchanged
        torch.testing.assert_close(old[..., :VOCAB], before, rtol=1e-5, atol=1e-5)
    model.generate(new_ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    model.save_pretrained(tmp_path / "resized")
    reloaded = _load(tmp_path / "resized")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(new_ids).logits, out.logits)


def _offloaded(module: torch.nn.Module) -> None:
    """Emulates a device map's offloading (what accelerate's hooks do): the module's weights hold
    their values only while the module itself is called (NaN otherwise)."""
    saved = {name: p.detach().clone() for name, p in module.named_parameters()}

    def load(mod, args, kwargs):
        with torch.no_grad():
            for name, p in mod.named_parameters():
                p.copy_(saved[name])

    def unload(mod, *_):
        with torch.no_grad():
            for p in mod.parameters():
                p.fill_(float("nan"))

    module.register_forward_pre_hook(load, with_kwargs=True)
    module.register_forward_hook(unload)
    unload(module)


@pytest.mark.parametrize("routing", [None, "paper"])
def test_routers_are_called_as_modules_so_offloading_hooks_load_them(built, routing):
    """The routers (the default routing's sequence-level n-gram router, the paper's per-layer
    linear routers) are called as modules: hooks that load weights on call see them."""
    model = _load(built[routing, False])
    ids = _ids(1)
    with torch.no_grad():
        reference = model(ids).logits
    reference_gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    routers = [m for name, m in model.named_modules() if name.endswith("router")]
    assert routers
    for router in routers:
        _offloaded(router)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference)
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, reference_gen)


@pytest.mark.parametrize("routing", [None, "paper"])
def test_a_device_map_that_offloads_to_disk_gives_the_same_logits(built, tmp_path, routing):
    """The same through accelerate itself, where it is installed: everything offloaded to disk."""
    pytest.importorskip("accelerate")
    ids = _ids(2)
    with torch.no_grad():
        reference = _load(built[routing, False])(ids).logits
        model = _load(
            built[routing, False], device_map="auto", max_memory={"cpu": "1KB"},
            offload_folder=str(tmp_path / "offload"),
        )  # fmt: skip
        torch.testing.assert_close(model(ids).logits, reference)
