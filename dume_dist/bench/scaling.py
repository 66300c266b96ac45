"""`dume bench scaling`: how the distributed flow scales with the number of contributors.

For each N in ``counts`` (default 2, 8, 32), on a local multi-node Ray cluster and a fresh
``file://`` store, with small random Llama experts (``hidden_size``, ``num_layers``,
``intermediate_size``) and ``tokens`` statistics tokens each:

* N-1 contributors join from the driver (their agents run in-process: the bench simulates them
  cheaply), publication held;
* the N-th joins for real: a node agent pinned to a Ray node, one statistics worker → **join_s**
  (launching the agent, backbone download, expert check and upload, statistics, submission);
* the operator publishes → **publish_s** (load N statistics blobs, sum, solve, write the
  checkpoint, upload the version);
* one contributor is unlearned → **unlearn_s** (delete its blobs, re-solve, publish N-1, mark);
* **bytes per node**: the statistics blob it pushes vs its expert's MLP weights vs the whole
  expert checkpoint.

`paper_figures` states the same sizes for Llama-3-8B-sized experts.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
NUM_WORDS = 512


def make_synthetic_experts(root: Path, num: int, hidden_size: int, num_layers: int, intermediate_size: int,
                           tokens: int, seed: int = 0) -> dict:  # fmt: skip
    """``num`` random Llama experts sharing a base, a WordLevel tokenizer, and a text each."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(NUM_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    heads = max(1, hidden_size // 16)
    config = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=len(vocab),
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    out = {"base": root / "base", "experts": {}}
    base.save_pretrained(out["base"])
    tokenizer.save_pretrained(out["base"])
    for i in range(num):
        name = f"c{i:03d}"
        g = torch.Generator().manual_seed(seed * 1000 + i + 1)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if ".mlp." in pname:
                    p.add_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        rng = random.Random(seed * 1000 + i)
        words = [f"w{j}" for j in rng.sample(range(NUM_WORDS), 64)]
        docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(tokens // 60 + 2)]
        (root / f"{name}.txt").write_text("\n\n".join(docs) + "\n")
        out["experts"][name] = {"expert": root / name, "data": root / f"{name}.txt"}
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _one_count(lc, n: int, work: Path, dims: dict, tokens: int) -> dict:
    from dume_dist.distributed import cluster, genesis
    from dume_dist.distributed.agent import NodeAgent
    from dume_dist.store import ObjectStore, VersionStore, reader_layout

    t = time.perf_counter()
    synth = make_synthetic_experts(work / "experts", n, tokens=tokens, **dims)
    make_s = time.perf_counter() - t
    url = f"file://{work / 'store'}"
    name = f"bench-{n}"
    coord = cluster.start_coordinator(url, name=name, namespace="dume-bench", work_dir=str(work / "coord"),
                                      resources={"dume_coordinator": 0.01})  # fmt: skip
    settings = {"max_tokens_per_seq": 128}
    _, op = genesis.found(coord, ObjectStore(url), backbone=f"base:{synth['base']}", founding={},
                          settings=settings, hold=True)  # fmt: skip
    names = sorted(synth["experts"])
    creds = {}
    for node in names:
        secret, hashed = genesis.issue_node_credential(node, node)
        cluster.get(coord.add_node.remote(op, node, node, hashed))
        creds[node] = secret
    join = {"max_tokens": tokens, "seq_len": 128, "batch_size": 8, "threads": 1}
    t = time.perf_counter()
    for node in names[:-1]:  # simulated contributors: agents in this process, same code path
        e = synth["experts"][node]
        NodeAgent(coord, node, node, creds[node], cache_dir=str(work / "cache")).join(
            str(e["expert"]), [str(e["data"])], **join
        )
    simulated_s = time.perf_counter() - t

    last = names[-1]
    e = synth["experts"][last]
    t = time.perf_counter()
    agent = cluster.launch_agent(coord, last, last, creds[last], node_id=lc.node_ids[0],
                                 cache_dir=str(work / "node-cache"))  # fmt: skip
    result = cluster.run_join(agent, {"expert_dir": str(e["expert"]), "data": [str(e["data"])], **join},
                              show_progress=False)  # fmt: skip
    join_s = time.perf_counter() - t
    import ray

    ray.kill(agent)

    t = time.perf_counter()
    version = cluster.get(coord.publish.remote(op))["version"]
    publish_s = time.perf_counter() - t
    cluster.get(coord.set_hold.remote(op, False))
    t = time.perf_counter()
    unlearned = cluster.get(coord.unlearn.remote(op, names[0], "bench"))
    unlearn_s = time.perf_counter() - t
    assert unlearned["version"] != version, "unlearning must publish a new version"
    store = ObjectStore(url)
    versions = VersionStore(store, reader_layout(store).versions)
    version_bytes = sum(
        f["size"] for f in versions.get_manifest(unlearned["version"])["files"].values()
    )
    cluster.stop_coordinator(name, "dume-bench")
    return {
        "contributors": n,
        "join_s": round(join_s, 3),
        "join_breakdown_s": {k: round(v, 3) for k, v in result["seconds"].items()},
        "publish_s": round(publish_s, 3),
        "unlearn_s": round(unlearn_s, 3),
        "versions": [version, unlearned["version"]],
        "stats_bytes_per_node": result["stats_bytes"],
        "expert_mlp_bytes": result["expert_bytes"],
        "expert_checkpoint_bytes": _dir_bytes(e["expert"]),
        "stats_over_mlp": round(result["stats_bytes"] / result["expert_bytes"], 4),
        "version_bytes": version_bytes,
        "simulated_joins_s": round(simulated_s, 3),
        "make_experts_s": round(make_s, 3),
    }


def run_scaling_bench(counts=(2, 8, 32), hidden_size: int = 64, num_layers: int = 2, intermediate_size: int = 128,
                      tokens: int = 2048, progress: bool = True) -> dict:  # fmt: skip
    """Run the bench on a fresh local Ray cluster (a head and two nodes); returns the results."""
    import torch

    from dume_dist.distributed.cluster import LocalCluster

    if not counts or min(counts) < 2:
        raise ValueError("contributor counts must be >= 2")
    dims = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "intermediate_size": intermediate_size,
    }
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    work_root = Path(tempfile.mkdtemp(prefix="dume-bench-"))
    try:
        with LocalCluster(2, namespace="dume-bench") as lc:
            for n in counts:
                if progress:
                    print(f"scaling bench: {n} contributors…", flush=True)
                rows.append(_one_count(lc, n, work_root / f"n{n}", dims, tokens))
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(work_root, ignore_errors=True)
    return {
        "settings": {**dims, "tokens_per_contributor": tokens, "max_tokens_per_seq": 128,
                     "cluster": "ray.cluster_utils.Cluster: head + 2 nodes on one machine", "store": "file://"},
        "results": rows,
        "paper_figures": paper_figures(),
    }  # fmt: skip


def paper_figures(hidden: int = 4096, layers: int = 32, intermediate: int = 14336, vocab: int = 128256,
                  kv_heads: int = 8, heads: int = 32, bytes_per_weight: int = 2) -> dict:  # fmt: skip
    """Sizes for Llama-3-8B-sized experts (defaults), from the shapes alone."""
    p = hidden + 1
    stats = layers * p * (p + 1) // 2 * 8  # packed upper triangle, fp64
    mlp = layers * 3 * hidden * intermediate * bytes_per_weight
    head_dim = hidden // heads
    attn = layers * (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim) * bytes_per_weight
    norms = (2 * layers + 1) * hidden * bytes_per_weight
    embed = 2 * vocab * hidden * bytes_per_weight  # untied input and output embeddings
    expert = mlp + attn + norms + embed
    return {
        "model": f"Llama-3-8B shapes: d={hidden}, {layers} layers, intermediate {intermediate}, bf16",
        "stats_bytes_per_node": stats,
        "expert_mlp_bytes": mlp,
        "expert_checkpoint_bytes": expert,
        "stats_over_mlp": round(stats / mlp, 4),
        "stats_over_expert": round(stats / expert, 4),
        "backbone_bytes": expert - mlp,
    }


def markdown_table(result: dict) -> str:
    lines = [
        "| contributors | join (s) | publish (s) | unlearn (s) | stats pushed / node | expert MLPs | whole expert | stats / MLPs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['contributors']} | {r['join_s']:.2f} | {r['publish_s']:.2f} | {r['unlearn_s']:.2f} | "
            f"{r['stats_bytes_per_node']:,} B | {r['expert_mlp_bytes']:,} B | {r['expert_checkpoint_bytes']:,} B | "
            f"{r['stats_over_mlp']:.3f} |"
        )
    p = result["paper_figures"]
    lines.append(
        f"| {p['model']} (on paper) | | | | {p['stats_bytes_per_node'] / 1e9:.2f} GB | "
        f"{p['expert_mlp_bytes'] / 1e9:.2f} GB | {p['expert_checkpoint_bytes'] / 1e9:.2f} GB | {p['stats_over_mlp']:.3f} |"
    )
    return "\n".join(lines)
