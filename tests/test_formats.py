"""Output formats as back ends (``dume_dist/model/formats``): each says whether it can hold a
build, with the reason when not, and writes it directly (Mixtral without a DUME directory)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_world import make_world

from dume_dist.model.backbone import Backbone
from dume_dist.model.build import build_dume
from dume_dist.model.experts import load_expert_specs, read_weight_index
from dume_dist.model.export_mixtral import export_mixtral
from dume_dist.model.formats import FORMATS, BuildStats, CheckpointInput, get_format, unsupported
from dume_dist.model.routing import RoutingSpec, SolvedRouting

KW = dict(max_tokens_per_seq=16, seq_len=16, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("formats"), num_docs=6)


def _tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for name, info in read_weight_index(model_dir).items():
        out[name] = load_file(str(info.file))[name]
    return out


def _preview(world, routing: RoutingSpec) -> CheckpointInput:
    specs = load_expert_specs(world["experts"])
    return CheckpointInput(
        backbone=Backbone.average(specs),
        experts=specs,
        routing=SolvedRouting([], routing, 1.0, 0.0, None),
        stats=BuildStats(fit={s.name: None for s in specs}),
    )


def test_every_format_says_whether_it_holds_a_build(world):
    assert set(FORMATS) == {"dume", "mixtral"}
    paper, ngram = _preview(world, RoutingSpec()), _preview(world, RoutingSpec("ngram", "nb"))
    assert unsupported("dume", paper) is None and unsupported("dume", ngram) is None
    assert unsupported("mixtral", paper) is None
    reason = unsupported("mixtral", ngram)
    assert "'ngram'" in reason and "\n" not in reason
    lda = _preview(world, RoutingSpec("prefix_mean", "lda"))
    assert "prefix_mean" in unsupported("mixtral", lda)
    no_stats = CheckpointInput(paper.backbone, paper.experts, paper.routing)
    assert "statistics" in unsupported("mixtral", no_stats)
    with pytest.raises(ValueError, match="format must be one of"):
        get_format("gguf")


def test_direct_mixtral_build_equals_the_export_of_a_dume_build(world, tmp_path):
    experts = dict(world["experts"])
    data = dict(world["data"])
    kept = tmp_path / "kept"
    build_dume(experts, data, tmp_path / "dume", routing="paper", top_k=2, save_stats=kept, **KW)
    export_mixtral(tmp_path / "dume", tmp_path / "exported", stats_dir=kept)
    result = build_dume(
        experts, data, tmp_path / "direct", routing="paper", top_k=2, output_format="mixtral", **KW
    )
    assert not (tmp_path / "direct" / "dume_manifest.json").exists()  # no DUME directory involved
    assert (tmp_path / "direct" / "README.md").is_file()
    want, got = _tensors(tmp_path / "exported"), _tensors(tmp_path / "direct")
    assert set(got) == set(want) and any(".block_sparse_moe.gate." in n for n in got)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert result.routing.spec.features == "token"


def test_unsupported_build_is_refused_before_statistics(world, tmp_path, monkeypatch):
    import dume_dist.model.build as build_mod

    def no_statistics(*args, **kwargs):
        raise AssertionError("statistics were computed for a build the format cannot hold")

    monkeypatch.setattr(build_mod, "expert_statistics", no_statistics)
    with pytest.raises(ValueError, match="cannot write format 'mixtral': routing features"):
        build_dume(
            world["experts"], world["data"], tmp_path / "m", routing="ngram",
            output_format="mixtral", **KW,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []
