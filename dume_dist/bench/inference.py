"""`dume bench inference`: tokens/s of a dense expert vs the DUME MoE, and statistics
collection vs a plain forward pass, at the same dimensions.

(a) one dense expert; (b) DUME with N experts, k=1, sparse dispatch; (c) the same MoE
computing every expert on every token and weighting (the paper's reference code);
plus statistics collection (forward pre-hooks, fp64 Gram sums) against a plain forward
of the same dense model. Each figure is the median of ``repeats`` timed runs after a
warm-up, on one fixed batch.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dume_dist.model.modeling_dume import DumeConfig, DumeForCausalLM


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _dense_config(expert_dir: str | None, hidden_size: int, num_layers: int, intermediate: int):
    if expert_dir:
        return AutoConfig.from_pretrained(expert_dir)
    return AutoConfig.for_model(
        "llama", hidden_size=hidden_size, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=max(1, hidden_size // 32),
        num_key_value_heads=max(1, hidden_size // 32), vocab_size=4096,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip


def _routers_balanced(model: DumeForCausalLM, seed: int = 0) -> None:
    """Random unit-norm routers: tokens spread over the experts as a trained router would."""
    g = torch.Generator().manual_seed(seed)
    for block in model.moe_blocks():
        w = torch.randn(block.router.weight.shape, generator=g)
        block.router.weight.data = w / w.norm(dim=1, keepdim=True)
        if block.router.bias is not None:
            block.router.bias.data.zero_()


def run_inference_bench(
    *,
    expert_dir: str | None = None,
    num_experts: int = 4,
    batch_size: int = 8,
    seq_len: int = 256,
    repeats: int = 5,
    hidden_size: int = 128,
    num_layers: int = 4,
    intermediate_size: int = 512,
    threads: int | None = None,
    device: str | None = None,
) -> dict:
    from dume_dist.model.collect import collect_stats

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dense_cfg = _dense_config(expert_dir, hidden_size, num_layers, intermediate_size)
    dense = AutoModelForCausalLM.from_config(dense_cfg, dtype=torch.float32).to(device).eval()
    dume_cfg = DumeConfig(
        base_config=dense_cfg.to_dict(), num_experts=num_experts, num_experts_per_tok=1,
        expert_names=[f"e{j}" for j in range(num_experts)],
    )  # fmt: skip
    moe = DumeForCausalLM(dume_cfg).to(device=device, dtype=torch.float32).eval()
    _routers_balanced(moe)
    ids_BT = torch.randint(0, dense_cfg.vocab_size, (batch_size, seq_len), device=device)
    mask_BT = torch.ones_like(ids_BT)
    tokens = batch_size * seq_len

    def forward(model):
        with torch.inference_mode():
            model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
        if device == "cuda":
            torch.cuda.synchronize()

    def stats():
        collect_stats(dense, [(ids_BT, mask_BT)], max_tokens_per_seq=seq_len, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()

    t_dense = _median_seconds(lambda: forward(dense), repeats)
    moe.set_dispatch("sparse")
    t_sparse = _median_seconds(lambda: forward(moe), repeats)
    moe.set_dispatch("all")
    t_all = _median_seconds(lambda: forward(moe), repeats)
    t_stats = _median_seconds(stats, repeats)
    result = {
        "dense_tokens_per_s": tokens / t_dense,
        "dume_sparse_tokens_per_s": tokens / t_sparse,
        "dume_all_experts_tokens_per_s": tokens / t_all,
        "forward_tokens_per_s": tokens / t_dense,
        "stats_tokens_per_s": tokens / t_stats,
        "settings": {
            "device": device,
            "threads": torch.get_num_threads(),
            "num_experts": num_experts,
            "top_k": 1,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "repeats": repeats,
            "hidden_size": dense_cfg.hidden_size,
            "num_hidden_layers": dense_cfg.num_hidden_layers,
            "intermediate_size": dense_cfg.intermediate_size,
            "vocab_size": dense_cfg.vocab_size,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
        },
    }
    result["ratios"] = {
        "sparse_vs_dense": result["dume_sparse_tokens_per_s"] / result["dense_tokens_per_s"],
        "all_experts_vs_dense": result["dume_all_experts_tokens_per_s"]
        / result["dense_tokens_per_s"],
        "stats_vs_forward": result["stats_tokens_per_s"] / result["forward_tokens_per_s"],
    }
    return result


def markdown_table(result: dict) -> str:
    s = result["settings"]
    r = result["ratios"]
    rows = [
        ("dense expert", result["dense_tokens_per_s"], 1.0),
        (f"DUME N={s['num_experts']} k=1 sparse", result["dume_sparse_tokens_per_s"], r["sparse_vs_dense"]),
        (f"DUME N={s['num_experts']} all experts (paper code)", result["dume_all_experts_tokens_per_s"], r["all_experts_vs_dense"]),
        ("plain forward (dense)", result["forward_tokens_per_s"], 1.0),
        ("statistics collection", result["stats_tokens_per_s"], r["stats_vs_forward"]),
    ]  # fmt: skip
    lines = [
        f"Inference benchmark ({s['device']}, {s['threads']} threads, batch {s['batch_size']} x "
        f"{s['seq_len']} tokens, d={s['hidden_size']}, {s['num_hidden_layers']} layers, "
        f"I={s['intermediate_size']}, median of {s['repeats']})",
        "",
        "| path | tokens/s | vs reference |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {tps:,.0f} | {ratio:.2f}× |" for name, tps, ratio in rows]
    return "\n".join(lines) + "\n"
