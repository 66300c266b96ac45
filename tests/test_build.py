"""The single-machine MoErge: statistics, backbone, checkpoint writing, and bad input.

Tiny random Llama experts (hidden 32, 2 layers) with a WordLevel tokenizer are built on disk by a
module fixture; each domain's text uses its own part of the vocabulary.
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from tiny_world import (
    DOMAINS,
    NUM_WORDS,
    domain_doc,
    make_config,
    make_tokenizer,
    save_expert,
)
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
)

from dume_dist.core.solve import solve_routers
from dume_dist.core.stats import GramAccumulator, load_stats
from dume_dist.model import writer as writer_mod
from dume_dist.model.backbone import Backbone
from dume_dist.model.build import build_dume
from dume_dist.model.collect import collect_stats, dense_model_for
from dume_dist.model.data import eval_windows, load_domain_texts, shard, token_batches
from dume_dist.model.experts import expert_fingerprint, is_mlp_key, load_expert_specs
from dume_dist.model.formats import BuildStats, CheckpointInput, WriteOptions
from dume_dist.model.writer import verify_checkpoint, write_dume_checkpoint

MAX_TOK = 12  # max_tokens_per_seq in these tests


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dume")
    words = [f"w{i}" for i in range(NUM_WORDS)]
    tokenizer = make_tokenizer(words)
    torch.manual_seed(0)
    base = LlamaForCausalLM(make_config())
    base.save_pretrained(root / "base")  # no tokenizer: a base may come without one
    state = base.state_dict()
    experts = {}
    for k, name in enumerate(DOMAINS):
        save_expert(root / name, state, make_config(), tokenizer, seed=k + 1)
        experts[name] = root / name
    save_expert(root / "wide", state, make_config(intermediate_size=48), tokenizer, seed=9)
    save_expert(root / "othertok", state, make_config(), make_tokenizer(words[::-1]), seed=10)
    data = {}
    for name, words_range in DOMAINS.items():
        docs = [domain_doc(list(words_range), i, 5 + 3 * i) for i in range(12)]
        (root / f"{name}.txt").write_text("\n\n".join(docs) + "\n")
        data[name] = [root / f"{name}.txt"]
    (root / "empty.txt").write_text("\n\n  \n")
    return {"root": root, "experts": experts, "data": data, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def built(world):
    names = ["alpha", "beta"]
    out = world["root"] / "built"
    result = build_dume(
        {n: world["experts"][n] for n in names}, {n: world["data"][n] for n in names}, out,
        max_tokens_per_seq=MAX_TOK, seq_len=16, batch_size=4, progress=False, routing="paper",
        save_stats=world["root"] / "built-stats",
    )  # fmt: skip
    return out, result


def _batches(world, name, batch_size=4):
    texts = load_domain_texts(name, world["data"][name])
    return list(token_batches(world["tokenizer"], texts, batch_size, 16, MAX_TOK))


def _assert_same_stats(a, b):
    # fp32 forwards of different batch shapes round differently: compare relative to the
    # largest Gram entry (a leaked pad token would change entries by O(1) and the count).
    scale = b.gram_LPP.abs().max().item()
    torch.testing.assert_close(a.gram_LPP, b.gram_LPP, rtol=1e-5, atol=1e-6 * scale)


def _collect(model, batches, max_tok=MAX_TOK):
    return collect_stats(model, batches, max_tokens_per_seq=max_tok, device="cpu", progress=False)


def _reference_stats(dense, batches):
    """post_attention_layernorm outputs of a full CausalLM forward, one unpadded sequence at a
    time (first MAX_TOK tokens), Gram in fp64."""
    ref = GramAccumulator(2, 32)
    captured = {}

    def keep(i):
        return lambda module, args, output: captured.__setitem__(i, output)

    layers = dense.model.layers
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(keep(i))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for ids_BT, mask_BT in batches:
            for ids, mask in zip(ids_BT, mask_BT):
                dense(input_ids=ids[mask.bool()][None, :MAX_TOK])
                for i in range(len(layers)):
                    ref.add(i, captured[i][0].double())
    for h in hooks:
        h.remove()
    return ref.result()


# -- statistics ----------------------------------------------------------------------------------


def test_stats_equal_reference_and_forced_dume(world, built):
    out, result = built
    specs = load_expert_specs({n: world["experts"][n] for n in ("alpha", "beta")})
    backbone = Backbone.average(specs)
    assert result.backbone_fingerprint == backbone.fingerprint
    dume = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    for j, spec in enumerate(specs):
        batches = _batches(world, spec.name)
        dense = dense_model_for(backbone, spec)
        stats = _collect(dense, batches)
        # The build recorded exactly these statistics and their provenance.
        assert torch.equal(stats.gram_LPP, result.stats[spec.name].gram_LPP)
        assert result.stats[spec.name].expert_fingerprint == expert_fingerprint(spec)
        assert result.stats[spec.name].backbone_fingerprint == backbone.fingerprint

        _assert_same_stats(stats, _reference_stats(dense, batches))

        dume.set_forced_expert(j)
        forced = _collect(dume, batches)
        _assert_same_stats(forced, stats)
    dume.set_forced_expert(None)
    with pytest.raises(ValueError, match="need an expert forced"):
        _collect(dume, batches)


def test_padding_has_no_effect(world):
    specs = load_expert_specs({"alpha": world["experts"]["alpha"]})
    model = dense_model_for(Backbone.average(specs), specs[0])
    unpadded = _batches(world, "alpha", batch_size=1)
    seqs = [ids[0] for ids, _ in unpadded]
    assert len({len(s) for s in seqs}) > 1  # the batches below really are padded
    # The same sequences, right-padded to 20 with a real word (id 7) as the "pad" id.
    ids = torch.full((len(seqs), 20), 7, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    a = _collect(model, unpadded)
    b = _collect(model, _batches(world, "alpha", batch_size=4))
    c = _collect(model, [(ids[:5], mask[:5]), (ids[5:], mask[5:])])
    num_real = sum(len(s) for s in seqs)
    assert a.num_tokens == b.num_tokens == c.num_tokens == num_real
    _assert_same_stats(b, a)
    _assert_same_stats(c, a)
    # max_tokens_per_seq cuts each sequence: equal to collecting the truncated sequences.
    d = _collect(model, [(ids, mask)], max_tok=3)
    e = _collect(model, [(ids[:, :3], mask[:, :3])], max_tok=100)
    assert d.num_tokens == sum(min(len(s), 3) for s in seqs)
    _assert_same_stats(d, e)


# -- backbone ------------------------------------------------------------------------------------


def test_single_expert_backbone_is_the_expert(world, tmp_path):
    specs = load_expert_specs({"alpha": world["experts"]["alpha"]})
    backbone = Backbone.average(specs)
    assert backbone.names() == specs[0].non_mlp_names() and backbone.names()
    for name in backbone.names():
        assert torch.equal(backbone.tensor(name), specs[0].tensor(name)), name
    # Dense model of backbone + own expert == the expert itself, bit for bit.
    ids = torch.tensor([[1, 5, 9, 30, 44, 61]])
    expert = LlamaForCausalLM.from_pretrained(world["experts"]["alpha"], dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(dense_model_for(backbone, specs[0])(ids).logits, expert(ids).logits)
    # Built checkpoint: backbone tensors unchanged.
    result = build_dume(
        {"alpha": world["experts"]["alpha"]}, {"alpha": world["data"]["alpha"]}, tmp_path / "one",
        max_tokens_per_seq=MAX_TOK, progress=False, routing="paper",
    )  # fmt: skip
    with safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as f:
        for name in backbone.names():
            assert torch.equal(f.get_tensor(name), specs[0].tensor(name)), name
    assert result.backbone_fingerprint == backbone.fingerprint
    # Save / load keeps the fingerprint; averaging two experts is the element-wise mean.
    backbone.save(tmp_path / "bb")
    assert Backbone.load(tmp_path / "bb").fingerprint == backbone.fingerprint
    two = load_expert_specs({n: world["experts"][n] for n in ("alpha", "beta")})
    avg = Backbone.average(two)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(avg.tensor(name), (two[0].tensor(name) + two[1].tensor(name)) / 2)
    assert avg.fingerprint != backbone.fingerprint
    based = Backbone.from_spec(f"base:{world['root'] / 'base'}", two)
    base = LlamaForCausalLM.from_pretrained(world["root"] / "base").state_dict()
    assert torch.equal(based.tensor(name), base[name])


# -- checkpoint ----------------------------------------------------------------------------------


def test_checkpoint_loads_and_routers_match_saved_stats(world, built):
    out, result = built
    manifest = verify_checkpoint(out)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.config.expert_names == ["alpha", "beta"]
    kept = out.parent / "built-stats"
    stats = {n: load_stats(kept / n / "fit.safetensors") for n in ("alpha", "beta")}
    routers = solve_routers({"alpha": (0, stats["alpha"]), "beta": (1, stats["beta"])}, 2, lam=1e-2)
    for layer, router in enumerate(routers):
        block = model.model.layers[layer].mlp
        assert block.router.weight.dtype == torch.float32
        assert torch.equal(block.router.weight, router.weight_EF.float())
        assert torch.equal(block.router.bias, router.bias_E.float())
    beta = load_expert_specs({"beta": world["experts"]["beta"]})[0]
    for name in beta.mlp_names_of_layer(1):
        param = name.removeprefix("model.layers.1.mlp.")
        key = f"model.layers.1.mlp.experts.1.{param}"
        assert torch.equal(model.state_dict()[key], beta.tensor(name))
    entries = {e["name"]: e for e in manifest["experts"]}
    assert not (out / "stats").exists()  # statistics stay out of the model directory
    assert entries["beta"]["num_tokens"] == result.num_tokens["beta"] > 0
    assert manifest["backbone"]["fingerprint"] == result.backbone_fingerprint
    assert manifest["parent_version"] is None and manifest["top_k"] == 1
    # The routers send most of a domain's tokens to its expert (random 32-d features of 160 words
    # are not linearly separable, so not all of them).
    model.set_record_routing(True)
    for j, name in enumerate(("alpha", "beta")):
        ids_BT, mask_BT = _batches(world, name)[0]
        with torch.no_grad():
            model(input_ids=ids_BT, attention_mask=mask_BT)
        chosen = model.model.layers[0].mlp.last_topk_index[..., 0][mask_BT.bool()]
        assert (chosen == j).float().mean() > 0.6


def test_sharded_checkpoint_equals_single_file(world, built, tmp_path):
    out, result = built
    specs = load_expert_specs({n: world["experts"][n] for n in ("alpha", "beta")})
    inp = CheckpointInput(
        backbone=Backbone.average(specs), experts=specs, routing=result.routing,
        stats=BuildStats(fit=result.stats),
    )  # fmt: skip
    write_dume_checkpoint(tmp_path / "sharded", inp, WriteOptions(max_shard_bytes=20_000))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    verify_checkpoint(tmp_path / "sharded")
    ids = torch.tensor([[1, 5, 90, 30, 120, 61]])
    a = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_verify_detects_corruption(built, tmp_path):
    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    verify_checkpoint(copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        verify_checkpoint(copy)
    shutil.copyfile(out / "model.safetensors", weights)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        verify_checkpoint(copy)
    shutil.copyfile(out / "tokenizer.json", copy / "tokenizer.json")
    (copy / "extra.py").write_text("print('hi')\n")
    with pytest.raises(ValueError, match="extra.py is not in the manifest"):
        verify_checkpoint(copy)


# -- bad input -----------------------------------------------------------------------------------


BAD_INPUTS = {
    "different shapes": (["alpha", "wide"], {}, "differ in config intermediate_size"),
    "different tokenizers": (["alpha", "othertok"], {}, "different tokenizers"),
    "missing expert dir": (["alpha", "nowhere"], {}, "nowhere does not exist"),
    "empty data": (["alpha", "beta"], {"beta": ["empty.txt"]}, "domain beta has no text"),
    "missing data file": (["alpha", "beta"], {"beta": ["nofile.txt"]}, "nofile.txt does not exist"),
    "unknown expert in data": (
        ["alpha", "beta"],
        {"delta": ["alpha.txt"]},
        "unknown expert 'delta'",
    ),
    "expert without data": (["alpha", "beta"], {"beta": []}, "expert beta has no data"),
    "bad backbone": (["alpha", "beta"], {"backbone": "mean"}, "backbone must be"),
    "base of other shape": (["alpha", "beta"], {"backbone": "base:wide"}, "intermediate_size"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error_and_writes_nothing(world, tmp_path, case):
    names, overrides, message = BAD_INPUTS[case]
    root = world["root"]
    experts = {n: root / n for n in names}
    data = {n: [root / f"{n}.txt"] for n in names}
    overrides = dict(overrides)
    backbone = overrides.pop("backbone", "average")
    if backbone.startswith("base:"):
        backbone = f"base:{root / backbone[5:]}"
    data.update({n: [root / p for p in paths] for n, paths in overrides.items()})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message) as err:
        build_dume(
            experts, data, out, backbone=backbone, max_tokens_per_seq=MAX_TOK, progress=False
        )
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no output, no temp dir


def test_write_is_atomic_and_refuses_overwrite(world, built, tmp_path, monkeypatch):
    _, result = built
    experts = {n: world["experts"][n] for n in ("alpha", "beta")}
    data = {n: world["data"][n] for n in ("alpha", "beta")}
    kw = dict(max_tokens_per_seq=MAX_TOK, seq_len=16, batch_size=4, progress=False, routing="paper")

    def fail(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer_mod.ShardedWriter, "close", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        build_dume(experts, data, tmp_path / "out", **kw)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        build_dume(experts, data, tmp_path / "out", **kw)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    again = build_dume(experts, data, tmp_path / "out", overwrite=True, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    verify_checkpoint(tmp_path / "out")
    # Deterministic: same inputs, same statistics and weights.
    assert (
        again.manifest["files"]["model.safetensors"]
        == result.manifest["files"]["model.safetensors"]
    )


# -- data and keys -------------------------------------------------------------------------------


def _check_data_directories_and_encodings(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("second\n\nthird\n")
    (folder / "a.jsonl").write_text('{"text": "first"}\n')
    (folder / "notes.md").write_text("not read")
    assert load_domain_texts("d", [folder]) == ["first", "second", "third"]
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="data directory .*none has no .txt or .jsonl file"):
        load_domain_texts("d", [tmp_path / "none"])
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"latin.txt is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        load_domain_texts("d", [tmp_path / "latin.txt"])
    with pytest.raises(ValueError, match=r"notes.md must be .txt or .jsonl"):
        load_domain_texts("d", [folder / "notes.md"])


def test_data_batches_windows_and_shards(world, tmp_path):
    tok = world["tokenizer"]
    (tmp_path / "d.jsonl").write_text('{"text": "w1 w2 w3"}\n\n{"text": "w4 w5"}\n')
    assert load_domain_texts("d", [tmp_path / "d.jsonl"]) == ["w1 w2 w3", "w4 w5"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1 has no string 'text'"):
        load_domain_texts("d", [tmp_path / "bad.jsonl"])
    texts = [" ".join(f"w{i}" for i in range(n)) for n in (10, 3, 7)]
    batches = list(token_batches(tok, texts, 2, seq_len=4, max_tokens_per_seq=3))
    _check_data_directories_and_encodings(tmp_path)
    # windows of 4 → [3 kept] per window: doc 10 → 3 windows, doc 3 → 1, doc 7 → 2.
    seqs = [ids[m.bool()].tolist() for ids_BT, m_BT in batches for ids, m in zip(ids_BT, m_BT)]
    w = tok.convert_tokens_to_ids
    assert seqs[0] == [w("w0"), w("w1"), w("w2")] and seqs[1] == [w("w4"), w("w5"), w("w6")]
    assert [len(s) for s in seqs] == [3, 3, 2, 3, 3, 3]
    ids_BT, mask_BT = batches[1]
    assert mask_BT.tolist() == [[1, 1, 0], [1, 1, 1]] and ids_BT[0, 2] == tok.pad_token_id
    capped = list(token_batches(tok, texts, 2, 4, 3, max_tokens=7))
    assert sum(int(m.sum()) for _, m in capped) == 7
    assert shard(list(range(7)), 1, 3) == [1, 4] and sorted(
        x for r in range(3) for x in shard(list(range(7)), r, 3)
    ) == list(range(7))
    # 20 tokens → windows of 6: 6, 6, 6, 2 (the last one padded); max_tokens picks evenly.
    windows = list(eval_windows(tok, texts, seq_len=6, batch_size=3))
    assert [tuple(ids.shape) for ids, _ in windows] == [(3, 6), (1, 2)]
    assert windows[0][0][1, 0] == w("w6") and windows[1][1].tolist() == [[1, 1]]
    ((ids_BT, mask_BT),) = eval_windows(tok, texts, seq_len=6, batch_size=8, max_tokens=12)
    assert ids_BT[:, 0].tolist() == [w("w0"), w("w5")]  # windows 0 and 3 (the short tail)
    assert is_mlp_key("model.layers.3.mlp.down_proj.weight", "qwen3")
    assert not is_mlp_key("model.layers.3.post_attention_layernorm.weight", "llama")
    tokenizer = AutoTokenizer.from_pretrained(world["experts"]["alpha"])
    assert tokenizer.pad_token_id == 0
