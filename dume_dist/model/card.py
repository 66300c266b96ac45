"""The model card (``README.md`` with Hugging Face metadata) of every written model: what the
model is made of (base, backbone, experts, domains, contributors), how it routes and how well
that measured on held-out statistics, and its lineage (parent version, marks)."""

from __future__ import annotations

import json
from pathlib import Path

CARD_NAME = "README.md"


def _front_matter(manifest: dict, base_model: str | None, fmt: str) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    tags = dict.fromkeys(("dume", "moe", "merge", "mixture-of-experts", fmt))
    lines += [f"- {t}" for t in tags]
    if base_model:
        lines.append(f"base_model: {json.dumps(str(base_model))}")
    lines.append("---")
    return "\n".join(lines)


def _experts_table(manifest: dict) -> list[str]:
    contributors = {c.get("name"): c for c in manifest.get("contributors") or []}
    rows = ["| index | expert | domain | contributor | tokens | expert fingerprint |",
            "|---:|---|---|---|---:|---|"]  # fmt: skip
    for e in manifest.get("experts") or []:
        c = contributors.get(e["name"], {})
        tokens = e.get("num_tokens", c.get("num_tokens"))
        rows.append(
            f"| {e['index']} | {e['name']} | {e.get('domain', '')} | "
            f"{c.get('name', 'local build')} | {'' if tokens is None else f'{tokens:,}'} | "
            f"`{e.get('expert_fingerprint', '')[:16]}` |"
        )
    return rows


def _routing_lines(manifest: dict) -> list[str]:
    routing = manifest.get("routing") or {}
    lines = [
        f"* features `{routing.get('features', manifest.get('feature_map'))}`, solver "
        f"`{routing.get('solver', 'ridge')}`, lam {manifest.get('lam', routing.get('lam'))}, "
        f"top-k {manifest.get('top_k')}, temperature {manifest.get('temperature')}"
    ]
    selection = routing.get("selection")
    if selection:
        curve = selection["curves"][selection["criterion"]]
        # the chosen point's score (a criterion may be minimised or maximised)
        row = selection["smoothing_grid"].index(selection["smoothing"])
        best = curve[row][selection["lam_grid"].index(selection["lam"])]
        lines.append(
            f"* chosen on {selection['num_holdout_tokens']:,} held-out tokens: "
            f"{selection['criterion']} = {best:.4g} (lam {selection['lam']:g}, "
            f"smoothing {selection['smoothing']:g})"
        )
    else:
        lines.append("* settings fixed (no held-out selection was run)")
    return lines


def card_text(manifest: dict, *, base_model: str | None = None, fmt: str = "dume") -> str:
    backbone = manifest.get("backbone") or {}
    parts = [
        _front_matter(manifest, base_model, fmt),
        "",
        f"# DUME mixture of {manifest.get('num_experts', len(manifest.get('experts') or []))} experts",
        "",
        "Built without training: each expert's MLPs are kept as they are, every other tensor "
        f"comes from one shared backbone (`{backbone.get('kind', '?')}`, fingerprint "
        f"`{str(backbone.get('fingerprint', ''))[:16]}`), and the routers are solved in closed "
        "form from statistics each contributor computed on its own data.",
        "",
        "## Experts",
        "",
        *_experts_table(manifest),
        "",
        "## Routing",
        "",
        *_routing_lines(manifest),
        "",
        "## Lineage",
        "",
        f"* parent version: {manifest.get('parent') or manifest.get('parent_version') or 'none'}",
        f"* trigger: {manifest.get('trigger', 'local build')}",
        f"* marks: {json.dumps(manifest.get('marks') or {}, sort_keys=True)} (later marks are "
        "recorded with the version in the store)",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)'
        if fmt == "dume"
        else 'model = AutoModelForCausalLM.from_pretrained("DIR")',
        # a DUME config names its classes in auto_map, which AutoTokenizer reads too: without the
        # flag it asks whether to run the code (interactive) and warns about the model type
        'tokenizer = AutoTokenizer.from_pretrained("DIR", trust_remote_code=True)'
        if fmt == "dume"
        else 'tokenizer = AutoTokenizer.from_pretrained("DIR")',
        "```",
        "",
    ]
    return "\n".join(parts)


def write_model_card(out_dir: Path, manifest: dict, **kwargs) -> Path:
    path = Path(out_dir) / CARD_NAME
    path.write_text(card_text(manifest, **kwargs))
    return path
