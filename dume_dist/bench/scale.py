"""`dume bench scale`: memory and time of a build, a solve and a publish at real sizes.

Random Llama experts of a given shape (default the 189M shape: hidden 1024, 16 layers,
intermediate 2816, 16 heads / 4 KV heads, the shipped tokenizer, bf16; ``1b``: TinyLlama's
shape) share a base; only their MLPs differ. For each N:

* ``dume build`` (paper routing, ``max_tokens`` statistics tokens per expert) in a child process:
  its seconds (statistics, solve, write) and **peak RSS** (``wait4``'s ``ru_maxrss``);
* the coordinator's solve + publish, in a child process, from the build's statistics over a fixed
  backbone (the base): found (N-1 experts), join (N), unlearn (the second expert): seconds,
  peak RSS, **bytes written to the store per version**, full version bytes; then store bytes
  against the pulled versions' bytes.

Every measured step runs in a fresh interpreter so that one step's peak does not hide another's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "189m": dict(hidden_size=1024, num_hidden_layers=16, intermediate_size=2816,
                 num_attention_heads=16, num_key_value_heads=4),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
               num_attention_heads=32, num_key_value_heads=4),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=1024,
                 num_attention_heads=4, num_key_value_heads=4),
}  # fmt: skip


def make_random_experts(root: Path, num: int, shape: dict, dtype: str = "bfloat16") -> dict:
    """``num`` random Llama experts sharing a random base (the shipped tokenizer), MLPs drawn
    per expert; ``{"base": dir, "experts": {name: dir}}``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dume_dist.demo import base_dir

    tok_src = base_dir()
    vocab = json.loads((tok_src / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=dtype, **shape)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    out = {"base": root / "base", "experts": {}}
    dirs = [("base", out["base"])] + [(f"e{i}", root / f"e{i}") for i in range(num)]
    for i, (name, path) in enumerate(dirs):
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if ".mlp." in pname:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            out["experts"][name] = path
        model.save_pretrained(path)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tok_src / f, path / f)
    return out


# -- children: each measured step in a fresh interpreter ---------------------------------------


def run_child(step: str, args: dict) -> dict:
    """Run ``step`` in a fresh interpreter; its JSON result plus ``peak_rss_bytes``."""
    with tempfile.TemporaryDirectory(prefix="dume-scale-") as tmp:
        out = Path(tmp) / "out.json"
        code = "import sys, json; from dume_dist.bench.scale import child_main; child_main()"
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(
                filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")])
            ),
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, step, json.dumps(args), str(out)], env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"bench step {step} failed with exit code {proc.returncode}")
        result = json.loads(out.read_text())
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux: kilobytes
    return result


def child_main() -> None:
    step, args, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    result = {"build": _build_step, "publish": _publish_step}[step](**args)
    Path(out).write_text(json.dumps(result))


def _build_step(
    experts: dict, data: str, out: str, max_tokens: int, backbone: str, threads: int | None = None
) -> dict:
    import torch

    from dume_dist.model.build import build_dume

    if threads:
        torch.set_num_threads(threads)
    t = time.perf_counter()
    result = build_dume(experts, {n: [data] for n in experts}, out, backbone=backbone, routing="paper",
                        max_tokens=max_tokens, max_tokens_per_seq=512, seq_len=512, batch_size=8,
                        progress=False, save_stats=str(Path(out).parent / "stats"))  # fmt: skip
    seconds = dict(result.seconds, total=time.perf_counter() - t)
    stats_s = sum(v for k, v in seconds.items() if k.startswith("stats:"))
    return {"seconds": {k: round(v, 3) for k, v in seconds.items()}, "stats_s": round(stats_s, 3)}


def _publish_step(
    build_dir: str, experts: dict, store: str, versions: list, threads: int | None = None
) -> dict:
    """The coordinator's work per version: streaming solve from the statistics, write, publish."""
    import torch

    from dume_dist.model.backbone import Backbone
    from dume_dist.model.experts import load_expert_specs
    from dume_dist.model.formats import CheckpointInput, Provenance
    from dume_dist.model.routing import resolve_routing, solve_routing
    from dume_dist.model.stats_files import StatsFiles, contributions
    from dume_dist.model.writer import write_dume_checkpoint
    from dume_dist.store import ObjectStore, VersionStore

    if threads:
        torch.set_num_threads(threads)
    vs = VersionStore(ObjectStore(store))
    rows = []
    for label, names in versions:
        t = time.perf_counter()
        before = _tree_bytes(Path(store))
        specs = load_expert_specs({n: experts[n] for n in names})
        files = StatsFiles(Path(build_dir).parent / "stats-view")
        for n in names:  # the build's --save-stats directory (model.stats_dir)
            files.add_file(n, Path(build_dir).parent / "stats" / n / "fit.safetensors")
        solved = solve_routing(
            resolve_routing("paper"),
            contributions(files, {n: j for j, n in enumerate(names)}),
            len(names),
        )
        solve_s = time.perf_counter() - t
        backbone = Backbone.load(Path(build_dir).parent / "backbone", verify=False)
        work = Path(tempfile.mkdtemp(prefix="dume-publish-"))
        try:
            inp = CheckpointInput(backbone=backbone, experts=specs, routing=solved,
                                  provenance=Provenance(extra_manifest={"trigger": label}))  # fmt: skip
            written = write_dume_checkpoint(work / "model", inp)
            full = sum(e["size"] for e in written["files"].values())
            vid = vs.publish(str(work / "model"), {"trigger": label})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append({"version": vid, "trigger": label, "experts": len(names), "solve_s": round(solve_s, 3),
                     "solve_publish_s": round(time.perf_counter() - t, 3), "full_version_bytes": full,
                     "bytes_written": _tree_bytes(Path(store)) - before})  # fmt: skip
    return {"versions": rows}


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


# -- the bench ---------------------------------------------------------------------------------


def run_scale_bench(counts=(2, 4), shape: str = "189m", max_tokens: int = 8192, threads: int | None = None,
                    work: str | None = None, progress: bool = True) -> dict:  # fmt: skip
    from dume_dist.demo import data_path

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    if not counts or min(counts) < 2:
        raise ValueError("expert counts must be >= 2")
    if len(set(counts)) != len(counts):
        raise ValueError(f"expert counts must differ, got {list(counts)}")
    if work is not None:  # before the experts are made: each count's directory is new
        if Path(work).exists() and not Path(work).is_dir():
            raise ValueError(f"--work {work} exists and is not a directory")
        taken = [f"n{n}" for n in counts if (Path(work) / f"n{n}").exists()]
        if taken:
            raise ValueError(f"--work {work} already holds {taken[0]} (from an earlier run)")
    root = Path(work or tempfile.mkdtemp(prefix="dume-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    synth = make_random_experts(root / "experts", max(counts), SHAPES[shape])
    make_s = time.perf_counter() - t
    data = str(data_path("python", "train"))
    rows = []
    try:
        for n in counts:
            if progress:
                print(f"scale bench: {n} experts of shape {shape}…", flush=True)
            rows.append(_one_count(root / f"n{n}", synth, n, data, max_tokens, threads))
    finally:
        if work is None:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "settings": {"shape": shape, **SHAPES[shape], "dtype": "bfloat16", "tokenizer": "shipped (4096 tokens)",
                     "routing": "paper", "max_tokens": max_tokens, "max_tokens_per_seq": 512,
                     "threads": threads, "cpus": os.cpu_count(), "device": "cpu"},
        "make_experts_s": round(make_s, 1),
        "results": rows,
    }  # fmt: skip


def _one_count(work: Path, synth: dict, n: int, data: str, max_tokens: int, threads) -> dict:
    from dume_dist.model.backbone import Backbone
    from dume_dist.model.experts import load_expert_specs
    from dume_dist.store import ObjectStore, VersionStore

    work.mkdir(parents=True)
    names = [f"e{i}" for i in range(n)]
    experts = {k: str(synth["experts"][k]) for k in names}
    build = run_child("build", dict(experts=experts, data=data, out=str(work / "build"), max_tokens=max_tokens,
                                    backbone=f"base:{synth['base']}", threads=threads))  # fmt: skip
    specs = load_expert_specs({names[0]: experts[names[0]]})
    Backbone.from_base(synth["base"], specs).save(work / "backbone")
    found = names[:-1]
    versions = [("found", found), ("join", names), ("unlearn", [x for x in names if x != names[1]])]
    store = work / "store"
    publish = run_child("publish", dict(build_dir=str(work / "build"), experts=experts, store=str(store),
                                        versions=versions, threads=threads))  # fmt: skip
    vs = VersionStore(ObjectStore(str(store)))
    pulled = 0
    for row in publish["versions"]:
        dest = work / f"pull-{row['version']}"
        vs.pull(row["version"], str(dest))
        pulled += _tree_bytes(dest)
        shutil.rmtree(dest)
    expert_bytes = sum(i.end - i.start for name, i in specs[0].index.items() if ".mlp." in name)
    return {
        "experts": n,
        "build": build,
        "publish": publish,
        "expert_mlp_bytes": expert_bytes,
        "store_bytes": _tree_bytes(store),
        "pulled_bytes": pulled,
        "store_over_pulled": round(_tree_bytes(store) / pulled, 4),
    }


def markdown_table(result: dict) -> str:
    lines = [
        "| experts | build s | stats s | build peak RSS | solve+publish s (found/join/unlearn) | publish peak RSS | written per version (found/join/unlearn) | expert MLP bytes | store / pulled |",
        "|---:|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in result["results"]:
        vs = r["publish"]["versions"]
        times = " / ".join(f"{v['solve_publish_s']:.1f}" for v in vs)
        written = " / ".join(
            f"{v['bytes_written'] / 1e6:.1f} MB of {v['full_version_bytes'] / 1e6:.0f}" for v in vs
        )
        build = r["build"]
        lines.append(
            f"| {r['experts']} | {build['seconds']['total']:.1f} | {build['stats_s']:.1f} | "
            f"{build['peak_rss_bytes'] / 1e9:.2f} GB | {times} | "
            f"{r['publish']['peak_rss_bytes'] / 1e9:.2f} GB | {written} | "
            f"{r['expert_mlp_bytes'] / 1e6:.1f} MB | {r['store_over_pulled']:.3f} |"
        )
    return "\n".join(lines)


def store_report(url: str) -> dict:
    """Bytes of a store by part (versions, statistics, the rest: registry, backbone, expert
    blobs) against the bytes of every complete version pulled: what sharing chunks saves."""
    from dume_dist.store import ObjectStore, VersionStore
    from dume_dist.store.layout import coordinator_layout

    store = ObjectStore(url)
    layout = coordinator_layout(store)
    root = Path(store.backend.root)
    total = _tree_bytes(root)
    stats = _tree_bytes(root / layout.blobs / "stats")
    versions = VersionStore(store, layout.versions)
    pulled = 0
    with tempfile.TemporaryDirectory(prefix="dume-store-report-") as tmp:
        for vid in versions.list_versions():
            dest = Path(tmp) / vid
            versions.pull(vid, str(dest))
            pulled += _tree_bytes(dest)
            shutil.rmtree(dest)
    return {
        "store_bytes": total,
        "statistics_bytes": stats,
        "versions_bytes": _tree_bytes(root / layout.versions),
        "store_without_statistics_bytes": total - stats,
        "pulled_versions_bytes": pulled,
        "versions": versions.list_versions(),
        "ratio_without_statistics": round((total - stats) / pulled, 4),
        "ratio_versions_only": round(_tree_bytes(root / layout.versions) / pulled, 4),
    }
