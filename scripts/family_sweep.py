"""Sweep of dense decoder families through the default build, as a user would run them.

For each ``model_type``: the two tiny random experts of ``tests/test_families.py`` (one base,
MLPs perturbed apart, saved with ``save_pretrained`` beside a word-level tokenizer), ``build_dume`` with the
default routing (the experts write their sample), the checkpoint loaded with
``AutoModelForCausalLM`` (remote code), a forward and greedy cached generation. Prints one
``OK`` / ``FAIL`` line per family (the error's first line). ``TIE=1`` ties the embeddings.

Run: python scripts/family_sweep.py [--out DIR] [FAMILY ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FAMILIES = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "olmo", "olmo2", "phi3",
    "stablelm", "cohere", "glm", "granite", "qwen3_moe", "starcoder2", "gpt_neox", "smollm3",
    "helium", "exaone4", "ernie4_5", "seed_oss", "arcee", "hunyuan_v1_dense", "apertus",
    "ministral",
]  # fmt: skip


def sweep_one(family: str, root: Path, tie: bool) -> str:
    from test_families import _family_world
    from transformers import AutoModelForCausalLM

    from dume_dist.model.build import build_dume

    experts, data = _family_world(root / family, family, tie=tie)
    result = build_dume(experts, data, root / family / "dume", progress=False, overwrite=True)
    dume = AutoModelForCausalLM.from_pretrained(root / family / "dume", trust_remote_code=True)
    ids = torch.randint(4, 244, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = dume.eval()(ids).logits
        out = dume.generate(ids[:, :4], max_new_tokens=7, do_sample=False)
    assert torch.isfinite(logits).all()
    return f"sampled {result.sampled_tokens}, generated {tuple(out.shape)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("families", nargs="*", default=FAMILIES)
    ap.add_argument("--out", type=Path, default=Path(".cache/family-sweep"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    tie = os.environ.get("TIE", "0") == "1"
    root = args.out / ("tied" if tie else "untied")
    for family in args.families:
        t0 = time.time()
        try:
            line = f"OK   {family}: {sweep_one(family, root, tie)}"
        except Exception as exc:  # one line per family, whatever it raised
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            line = f"FAIL {family}: {type(exc).__name__}: {first}"
        print(f"{line} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
