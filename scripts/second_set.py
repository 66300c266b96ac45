"""Rebuild the second expert set: tiny Qwen2 experts on four other Debian text domains.

Not shipped (too large for the package); this script rebuilds it deterministically with the
demo recipe's code (``dume_dist/demo/recipe``): same normalisation, chunking, document split,
training loop and schedule, with another architecture family and other domains:

| domain  | Debian package (bookworm)      | documents                                     |
|---------|--------------------------------|-----------------------------------------------|
| go      | golang-1.19-src 1.19.8-2       | one per ``.go`` file of the Go source tree    |
| pydoc   | python3.11-doc 3.11.2-6+deb12u8| one per reST source of the Python docs        |
| french  | manpages-fr 4.18.1-1           | one per rendered French man page              |
| gcide   | dict-gcide 0.48.5+nmu2         | one per 60 consecutive dictionary entries     |

``go`` beside ``pydoc`` (code beside code documentation) is the case where domains share
surface. The experts are ``Qwen2ForCausalLM``; the tokenizer is the recipe's byte-level BPE
saved with them, and they are trained with the tokenization ``AutoTokenizer`` resolves for a
``qwen2`` directory (``Qwen2Tokenizer``, which re-derives Qwen's pre-tokenizer).

Run:  python scripts/second_set.py [--out .cache/set2] [--stages data tokenizer base experts eval]
Writes ``OUT/data/<domain>/{train,valid}.txt``, ``OUT/base``, ``OUT/experts/<domain>``,
``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from pathlib import Path

import torch

from dume_dist.demo.recipe import make_data as md
from dume_dist.demo.recipe import train as tr

PACKAGES = {
    "golang-1.19-src": "1.19.8-2",
    "python3.11-doc": "3.11.2-6+deb12u8",
    "manpages-fr": "4.18.1-1",
    "dict-gcide": "0.48.5+nmu2",
}
DOMAIN_PACKAGE = {
    "go": "golang-1.19-src",
    "pydoc": "python3.11-doc",
    "french": "manpages-fr",
    "gcide": "dict-gcide",
}
DOMAINS = tuple(DOMAIN_PACKAGE)
GCIDE_ENTRIES_PER_DOC = 60


def fetch(cache: Path) -> dict[str, Path]:
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    roots = {}
    for pkg, version in PACKAGES.items():
        found = [d for d in debs.glob(f"{pkg}_*.deb") if md._deb_field(d, "Version") == version]
        if not found:
            md._run(["apt-get", "download", f"{pkg}={version}"], cwd=debs)
            found = [d for d in debs.glob(f"{pkg}_*.deb") if md._deb_field(d, "Version") == version]
        root = cache / "x" / found[0].stem
        if not (root / ".unpacked").exists():
            root.mkdir(parents=True, exist_ok=True)
            md._run(["dpkg-deb", "-x", str(found[0]), str(root)])
            (root / ".unpacked").touch()
        roots[pkg] = root
    return roots


def _files(base: Path, pattern: str, skip=lambda rel: False) -> list[md.Doc]:
    files = sorted(p for p in base.rglob(pattern) if p.is_file() and not p.is_symlink())
    return [
        (str(p.relative_to(base)), lambda p=p: md.normalise(p.read_text("utf-8", errors="replace")))
        for p in files
        if not skip(p.relative_to(base))
    ]


def docs_go(root: Path) -> list[md.Doc]:
    return _files(root / "usr/share/go-1.19/src", "*.go", lambda rel: "testdata" in rel.parts)


def docs_pydoc(root: Path) -> list[md.Doc]:
    return _files(root / "usr/share/doc/python3.11/html/_sources", "*.rst.txt")


def docs_french(root: Path) -> list[md.Doc]:
    base = root / "usr/share/man/fr"
    files = sorted(p for p in base.rglob("*.gz") if p.is_file() and not p.is_symlink())
    return [(str(p.relative_to(base)), lambda p=p: md._render_man(p, "TRADUCTION")) for p in files]


def docs_gcide(root: Path) -> list[md.Doc]:
    raw = gzip.decompress((root / "usr/share/dictd/gcide.dict.dz").read_bytes())
    text = raw.decode("utf-8", errors="replace")
    # entries start at column 0 after a blank line; group a fixed number into one document
    entries = [e for e in text.split("\n\n") if e.strip()]
    entries = [e for e in entries if not e.startswith("00-")]
    n = GCIDE_ENTRIES_PER_DOC
    groups = ["\n".join(entries[i : i + n]) for i in range(0, len(entries), n)]
    return [(f"{i:05d}", lambda g=g: md.normalise(g)) for i, g in enumerate(groups)]


EXTRACTORS = {"go": docs_go, "pydoc": docs_pydoc, "french": docs_french, "gcide": docs_gcide}


def make_data(out: Path, cache: Path) -> None:
    roots = fetch(cache)
    sums = []
    for domain in DOMAINS:
        docs = EXTRACTORS[domain](roots[DOMAIN_PACKAGE[domain]])
        sp = md.split_domain(docs, md.SEED, domain)
        ddir = out / "data" / domain
        ddir.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid"):
            path = ddir / f"{split}.txt"
            path.write_text("\n\n".join(getattr(sp, split)) + "\n", encoding="utf-8")
            sums.append(f"{md.sha256_file(path)}  {domain}/{split}.txt")
        tr.log(
            f"{domain}: {len(docs)} docs, train {len(sp.train_docs)}, valid {len(sp.valid_docs)}"
        )
    (out / "data" / "SHA256SUMS").write_text("\n".join(sums) + "\n")


def read_docs(out: Path, domain: str, split: str) -> list[str]:
    text = (out / "data" / domain / f"{split}.txt").read_text(encoding="utf-8")
    return [d for d in text.split("\n\n") if d.strip()]


def token_stream(tok, out: Path, domain: str, split: str) -> torch.Tensor:
    ids: list[int] = []
    for e in tok(read_docs(out, domain, split), add_special_tokens=False)["input_ids"]:
        ids += [tok.bos_token_id, *e, tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def tiny_shape(tok) -> dict:
    """The experts' size (hidden 128, 4 layers, 2 KV heads, 512 positions) and special tokens."""
    return dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip


def make_config(tok, args):
    from transformers import Qwen2Config

    return Qwen2Config(**tiny_shape(tok), tie_word_embeddings=False, use_sliding_window=False)


def tokenizer_stage(out: Path, args) -> None:
    from transformers import PreTrainedTokenizerFast

    docs = [d for dom in DOMAINS for d in read_docs(out, dom, "train")]
    # the recipe's trainer reads the demo domains; train the same BPE on ours
    saved = tr.read_docs
    tr.read_docs = lambda dom, split: docs if dom == tr.FOUNDING_DOMAINS[0] else []
    try:
        hf = tr.train_tokenizer(args.vocab_size, out / "base")
    finally:
        tr.read_docs = saved
    assert isinstance(hf, PreTrainedTokenizerFast)
    make_config(hf, args).save_pretrained(out / "base")  # qwen2 dir: AutoTokenizer -> Qwen2


def load_tokenizer(out: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(out / "base")


def pretrain(tok, out: Path, args) -> float:
    from transformers import AutoModelForCausalLM

    tr.seed_all(args.seed)
    model = AutoModelForCausalLM.from_config(make_config(tok, args))
    streams = [token_stream(tok, out, d, "train") for d in DOMAINS]
    groups = [{"params": list(model.parameters()), "lr": args.base_lr}]
    secs = tr.train_loop(model, groups, streams, args.base_steps, args, args.seed, "base")
    tr.save_bf16(model, tok, out / "base")
    return secs


def finetune(tok, out: Path, domain: str, args) -> float:
    seed = args.seed + 1 + DOMAINS.index(domain)
    tr.seed_all(seed)
    model = tr.load_fp32(out / "base")
    mlp, other = [], []
    for name, p in model.named_parameters():
        if tr.is_frozen(name):
            p.requires_grad_(False)
        else:
            (mlp if tr.is_mlp(name) else other).append(p)
    groups = [
        {"params": mlp, "lr": args.expert_lr},
        {"params": other, "lr": args.expert_lr * args.attn_scale},
    ]
    streams = [token_stream(tok, out, domain, "train")]
    secs = tr.train_loop(model, groups, streams, args.expert_steps, args, seed, f"expert {domain}")
    tr.save_bf16(model, tok, out / "experts" / domain)
    return secs


def evaluate(tok, out: Path, args) -> dict:
    streams = {d: token_stream(tok, out, d, "valid") for d in DOMAINS}
    models = {"base": tr.load_fp32(out / "base")}
    models |= {d: tr.load_fp32(out / "experts" / d) for d in DOMAINS}
    ppl = {
        n: {d: math.exp(tr.mean_loss(m, streams[d], args.seq)) for d in DOMAINS}
        for n, m in models.items()
    }
    sds = {n: {k: v.float() for k, v in m.state_dict().items()} for n, m in models.items()}
    founders = [sds[d] for d in DOMAINS]
    oracle = {}
    for d in DOMAINS:
        m = type(models["base"])(models["base"].config).eval()
        m.load_state_dict(tr.compose(founders, sds[d]))
        p = math.exp(tr.mean_loss(m, streams[d], args.seq))
        oracle[d] = {"expert_ppl": ppl[d][d], "average_backbone_ppl": p, "retention": ppl[d][d] / p}
        tr.log(f"{d}: expert {ppl[d][d]:.2f} base {ppl['base'][d]:.2f} avg-backbone {p:.2f}")
    return {"ppl": ppl, "oracle": oracle, "tokenizer_class": type(tok).__name__}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".cache/set2"))
    ap.add_argument(
        "--stages",
        nargs="+",
        default=["data", "tokenizer", "base", "experts", "eval"],
        choices=["data", "tokenizer", "base", "experts", "eval"],
    )
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--base-steps", type=int, default=500)
    ap.add_argument("--base-lr", type=float, default=3e-3)
    ap.add_argument("--expert-steps", type=int, default=200)
    ap.add_argument("--expert-lr", type=float, default=2e-3)
    ap.add_argument("--attn-scale", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    log_path = out / "train_log.json"
    trained = json.loads(log_path.read_text()) if log_path.exists() else {"experts": {}}
    if "data" in args.stages:
        make_data(out, out)
    if "tokenizer" in args.stages:
        tokenizer_stage(out, args)
    tok = load_tokenizer(out)
    tr.log(f"tokenizer: {type(tok).__name__}, {len(tok)} tokens")
    if "base" in args.stages:
        trained["base"] = {"steps": args.base_steps, "seconds": pretrain(tok, out, args)}
        log_path.write_text(json.dumps(trained, indent=1) + "\n")
    if "experts" in args.stages:
        for d in args.domains:
            secs = finetune(tok, out, d, args)
            trained["experts"][d] = {"steps": args.expert_steps, "seconds": secs}
            log_path.write_text(json.dumps(trained, indent=1) + "\n")
    if "eval" in args.stages:
        res = evaluate(tok, out, args) | {"trained": trained}
        (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res["oracle"], indent=1))


if __name__ == "__main__":
    sys.exit(main())
