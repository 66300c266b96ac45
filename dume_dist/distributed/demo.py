"""`dume demo`: the whole distributed story on one machine, on the embedded default.

1. a local Ray cluster: a head and one node per founding contributor (`LocalCluster`);
2. the coordinator (named, detached actor) on a ``file://`` store, founded on the ``average``
   backbone of the founding experts, publication held;
3. the operator registers five nodes; four founding node agents — each pinned to its own Ray
   node — compute their statistics in parallel and push them; the operator publishes **v1**;
4. a new machine joins the Ray cluster and its contributor joins: **v2**;
5. one founding contributor is unlearned (and its node leaves the cluster): **v3**, with the
   versions that contained it marked;
6. the cluster it started is shut down, then the versions table and the held-out perplexity
   of every version (and of each dense expert on its own domain) are printed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console

from dume_dist.distributed import cluster, genesis, tables
from dume_dist.distributed.calls import call
from dume_dist.store import ObjectStore, VersionStore, reader_layout

# The default routing (`routing_options.DEFAULT_PRESET`); `dume demo --routing` changes it.
SETTINGS = {"temperature": 1.0, "max_tokens_per_seq": 256}
NAMESPACE = "dume-demo"


def demo_inputs() -> dict:
    from dume_dist import demo

    domains = (*demo.FOUNDING_DOMAINS, demo.JOINING_DOMAIN)
    return {
        "founding": list(demo.FOUNDING_DOMAINS),
        "joining": demo.JOINING_DOMAIN,
        "experts": {d: str(demo.expert_dir(d)) for d in domains},
        "train": {d: str(demo.data_path(d, "train")) for d in domains},
        "valid": {d: str(demo.data_path(d, "valid")) for d in domains},
    }


def run_demo(
    store: str | None = None,
    max_tokens: int = 20000,
    eval_tokens: int = 8192,
    unlearn: str | None = None,
    json_out: str | None = None,
    inputs: dict | None = None,
    settings: dict | None = None,
    seq_len: int = 256,
    show_progress: bool = True,
) -> dict:
    """Run the story; returns ``{"versions": [...manifests], "ppl": {row: {domain: ppl}}}``."""
    inputs = inputs or demo_inputs()
    settings = {**SETTINGS, **(settings or {})}
    founding = inputs["founding"]
    unlearn = unlearn or founding[1]
    if unlearn not in founding:
        raise ValueError(
            f"--unlearn must be a founding domain ({', '.join(founding)}), got {unlearn!r}"
        )
    console = tables.console()
    work = Path(tempfile.mkdtemp(prefix="dume-demo-"))
    url = store or f"file://{work / 'store'}"
    t0 = time.perf_counter()
    try:
        join_opts = {
            "max_tokens": max_tokens,
            "seq_len": min(seq_len, settings["max_tokens_per_seq"]),
        }
        _story(console, url, work, inputs, settings, unlearn, join_opts, show_progress)
        console.print(
            f"[dim]distributed part took {time.perf_counter() - t0:.0f} s; evaluating…[/dim]"
        )
        result = _report_single_threaded(console, url, work, inputs, eval_tokens, seq_len)
        if json_out:
            Path(json_out).write_text(json.dumps(result, indent=2, default=str))
            console.print(f"wrote {json_out}")
        console.print(f"[dim]demo took {time.perf_counter() - t0:.0f} s[/dim]")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _step(console: Console, text: str) -> None:
    console.print(f"[bold cyan]▶[/bold cyan] {text}")


def _story(console, url, work, inputs, settings, unlearn, join_opts, show_progress) -> None:
    founding, joining = inputs["founding"], inputs["joining"]
    _step(
        console,
        f"local Ray cluster: a head and {len(founding)} nodes (one per founding contributor)",
    )
    with cluster.LocalCluster(len(founding), namespace=NAMESPACE) as lc:
        _step(
            console,
            f"coordinator (detached actor) on store {url}; backbone = average of {', '.join(founding)}",
        )
        coord = cluster.start_coordinator(url, name="dume-coordinator", namespace=NAMESPACE,
                                          work_dir=str(work / "coordinator"), resources={"dume_coordinator": 0.01})  # fmt: skip
        _, op = genesis.found(coord, ObjectStore(url), backbone="average",
                              founding={d: inputs["experts"][d] for d in founding},
                              settings=settings, hold=True)  # fmt: skip
        creds = _register(coord, op, [*founding, joining])
        console.print(f"  operator registered {len(creds)} nodes, each with its own credential")

        _step(
            console,
            "founding node agents compute statistics in parallel, each pinned to its own node",
        )
        jobs = {
            d: (_agent(coord, d, creds[d], node, work), _join_kwargs(inputs, d, join_opts))
            for d, node in zip(founding, lc.node_ids)
        }
        _print_joins(console, cluster.run_joins(jobs, show_progress), lc.node_ids)
        v1 = call(coord, "publish", op)["version"]
        call(coord, "set_hold", op, False)
        _step(
            console,
            f"operator published [bold]{v1}[/bold] and released the hold (each change now publishes)",
        )

        _step(console, f"a new machine joins the Ray cluster; contributor {joining!r} joins")
        node = lc.add_node()
        jobs = {
            joining: (
                _agent(coord, joining, creds[joining], node, work),
                _join_kwargs(inputs, joining, join_opts),
            )
        }
        result = cluster.run_joins(jobs, show_progress)
        _print_joins(console, result, [*lc.node_ids])
        console.print(f"  → [bold]{result[joining]['version']}[/bold]")

        _step(
            console, f"contributor {unlearn!r} departs: its node leaves, the operator unlearns it"
        )
        lc.remove_node(lc.node_ids[founding.index(unlearn)])
        out = call(coord, "unlearn", op, unlearn, "demo: contributor withdrew consent")
        console.print(
            f"  statistics and expert deleted from the store → [bold]{out['version']}[/bold]; "
            f"versions marked contains_unlearned: {', '.join(out['affected_versions'])}"
        )
        cluster.stop_coordinator("dume-coordinator", NAMESPACE)
        _step(console, "shutting down the local Ray cluster")


def _register(coord, op: str, names: list[str]) -> dict[str, str]:
    creds = {}
    for name in names:
        secret, hashed = genesis.issue_node_credential(name, name)
        call(coord, "add_node", op, name, name, hashed)
        creds[name] = secret
    return creds


def _agent(coord, name: str, secret: str, node_id: str, work: Path):
    return cluster.launch_agent(
        coord, name, name, secret, node_id=node_id, cache_dir=str(work / f"node-{node_id[:8]}")
    )


def _join_kwargs(inputs: dict, domain: str, opts: dict) -> dict:
    return {
        "expert_dir": inputs["experts"][domain],
        "data": [inputs["train"][domain]],
        "threads": 1,
        **opts,
    }


def _print_joins(console: Console, results: dict, node_ids: list[str]) -> None:
    for name, r in results.items():
        node = r["worker_nodes"][0][:8] if r.get("worker_nodes") else "?"
        console.print(
            f"  {name:<10} on node {node}: {r['status']}, pushed {r.get('stats_bytes', 0):,} B of statistics "
            f"+ {r['expert_bytes']:,} B of MLP weights"
        )


# -- report ---------------------------------------------------------------------------------------


def _report_single_threaded(*args) -> dict:
    # Tiny models on shared cores: one thread avoids spin-wait contention (measured 8x faster).
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _report(*args)
    finally:
        torch.set_num_threads(before)


def _report(
    console: Console, url: str, work: Path, inputs: dict, eval_tokens: int, seq_len: int
) -> dict:
    store = ObjectStore(url)
    versions = VersionStore(store, reader_layout(store).versions)
    manifests = [versions.get_manifest(v) for v in versions.list_versions()]
    console.print(tables.versions_table(manifests))
    domains = [*inputs["founding"], inputs["joining"]]
    ppl = {}
    for m in manifests:
        local = work / "pulled" / m["version"]
        versions.pull(m["version"], str(local))
        ppl[m["version"]] = evaluate_ppl(
            local, {d: inputs["valid"][d] for d in domains}, eval_tokens, seq_len
        )
    ppl["own dense expert"] = {
        d: evaluate_ppl(inputs["experts"][d], {d: inputs["valid"][d]}, eval_tokens, seq_len)[d]
        for d in domains
    }
    console.print(
        tables.ppl_table(
            ppl, domains, title=f"held-out perplexity (≤{eval_tokens:,} tokens per domain)"
        )
    )
    _explain(console, manifests)
    latest = manifests[-1]
    comparison = _compare_latest(
        console, work / "pulled" / latest["version"], latest, inputs, eval_tokens, seq_len
    )
    for m in manifests:
        m.pop("files", None)
    return {"versions": manifests, "ppl": ppl, "comparison": comparison}


def _compare_latest(console, model_dir, manifest, inputs, eval_tokens, seq_len) -> dict:
    """The latest version against every baseline: dense experts, weight averaging, random
    routers, oracle routing, k=1 and k=2 (the single-machine evaluation table)."""
    from dume_dist.model.evaluate import compare, print_table

    domains = [c["domain"] for c in manifest["contributors"]]
    console.print(f"[dim]comparing {manifest['version']} with its baselines…[/dim]")
    table = compare(
        model_dir,
        {d: [inputs["valid"][d]] for d in domains},
        experts={d: inputs["experts"][d] for d in domains},
        seq_len=seq_len,
        max_eval_tokens=eval_tokens,
        device="cpu",
    )
    print_table(table, console)
    return table.to_json()


def _explain(console: Console, manifests: list[dict]) -> None:
    """One line per version: which domains it gained or lost against its parent."""
    experts = {m["version"]: {c["domain"] for c in m["contributors"]} for m in manifests}
    for m in manifests:
        parent = m.get("parent")
        if parent in experts:
            gained = sorted(experts[m["version"]] - experts[parent])
            lost = sorted(experts[parent] - experts[m["version"]])
            change = ", ".join([f"+{d}" for d in gained] + [f"-{d}" for d in lost])
            console.print(
                f"  {m['version']} vs {parent}: {change or 'same experts'} ({m.get('trigger', '')})"
            )


def evaluate_ppl(
    model_dir, valid: dict[str, str], eval_tokens: int, seq_len: int
) -> dict[str, float]:
    """Held-out perplexity per domain with the model layer's evaluation (evenly spread windows)."""
    from transformers.utils import logging as hf_logging

    from dume_dist.model.data import eval_windows, load_domain_texts
    from dume_dist.model.evaluate import evaluate_batches, load_causal_lm
    from dume_dist.model.tokenizer import load_tokenizer

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # transformers' loading messages stay out of the demo's tables
    model = load_causal_lm(model_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=True)
    out = {}
    for domain, path in valid.items():
        batches = eval_windows(
            tokenizer, load_domain_texts(domain, [path]), seq_len, 8, eval_tokens
        )
        out[domain] = evaluate_batches(model, batches).ppl
    return out
