"""Rebuild a third expert set: tiny Gemma experts on three code-like domains and one language.

Not shipped. A check that the default routing generalises beyond the two sets it was measured
on: another architecture family (``GemmaForCausalLM``: GeGLU MLPs, (1 + w) RMSNorm, scaled and
tied embeddings) and a harder mix of domains — three that share surface (``python`` code,
``go`` code, ``pydoc``: the Python documentation's reST, with code examples) beside ``french``
man pages. The text is the founders' ``python`` (shipped in ``dume_dist/demo/data``) and set 2's
``go``, ``pydoc`` and ``french`` (``scripts/second_set.py --stages data`` writes them); the
tokenizer (byte-level BPE, 4,096), training loop and schedule are set 2's, on these four domains.

Run:  python scripts/third_set.py --set2 .cache/set2 [--out .cache/set3]
          [--stages data tokenizer base experts eval] [--base-steps 300 --expert-steps 120]
Writes ``OUT/data/<domain>/{train,valid}.txt``, ``OUT/base``, ``OUT/experts/<domain>``,
``OUT/results.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import second_set as s2
import torch

from dume_dist.demo.recipe import make_data as md
from dume_dist.demo.recipe import train as tr

DOMAINS = ("python", "go", "pydoc", "french")
DEMO_DATA = Path(__file__).resolve().parents[1] / "dume_dist" / "demo" / "data"


def make_config(tok, args):
    from transformers import GemmaConfig

    return GemmaConfig(**s2.tiny_shape(tok), head_dim=32, tie_word_embeddings=True)


def make_data(out: Path, set2: Path) -> None:
    sums = []
    for domain in DOMAINS:
        src = (DEMO_DATA if domain == "python" else set2 / "data") / domain
        dst = out / "data" / domain
        dst.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid"):
            if not (src / f"{split}.txt").is_file():
                raise SystemExit(f"missing {src / split}.txt: run scripts/second_set.py first")
            shutil.copyfile(src / f"{split}.txt", dst / f"{split}.txt")
            sums.append(f"{md.sha256_file(dst / f'{split}.txt')}  {domain}/{split}.txt")
    (out / "data" / "SHA256SUMS").write_text("\n".join(sums) + "\n")


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".cache/set3"))
    ap.add_argument("--set2", type=Path, default=Path(".cache/set2"))
    stages = ["data", "tokenizer", "base", "experts", "eval"]
    ap.add_argument("--stages", nargs="+", default=stages, choices=stages)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--base-lr", type=float, default=3e-3)
    ap.add_argument("--expert-steps", type=int, default=120)
    ap.add_argument("--expert-lr", type=float, default=2e-3)
    ap.add_argument("--attn-scale", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s2.DOMAINS, s2.make_config = DOMAINS, make_config  # set 2's stages, on this set
    out = args.out.resolve()
    log_path = out / "train_log.json"
    trained = json.loads(log_path.read_text()) if log_path.exists() else {"experts": {}}
    if "data" in args.stages:
        make_data(out, args.set2.resolve())
    if "tokenizer" in args.stages:
        s2.tokenizer_stage(out, args)
    tok = s2.load_tokenizer(out)
    tr.log(f"tokenizer: {type(tok).__name__}, {len(tok)} tokens")
    if "base" in args.stages:
        trained["base"] = {"steps": args.base_steps, "seconds": s2.pretrain(tok, out, args)}
        log_path.write_text(json.dumps(trained, indent=1) + "\n")
    if "experts" in args.stages:
        for d in DOMAINS:
            secs = s2.finetune(tok, out, d, args)
            trained["experts"][d] = {"steps": args.expert_steps, "seconds": secs}
            log_path.write_text(json.dumps(trained, indent=1) + "\n")
    if "eval" in args.stages:
        res = s2.evaluate(tok, out, args) | {"trained": trained}
        (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res["oracle"], indent=1))


if __name__ == "__main__":
    sys.exit(main())
