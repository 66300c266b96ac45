"""Train the demo's tokenizer, tiny Llama base and five domain experts; measure them.

Stages (all by default, each can be run alone with ``--stages``):

``tokenizer``  byte-level BPE (``tokenizers``) on the founding domains' train text,
               saved as a ``PreTrainedTokenizerFast`` (``<bos>``/``<eos>``/``<pad>``).
``base``       pretrain a tiny ``LlamaForCausalLM`` on an even mix of the founding
               domains' train text (the joining domain is never seen).
``experts``    fine-tune one expert per domain from the (bf16-rounded) base:
               embeddings and lm_head frozen, MLPs at ``--expert-lr``, attention and
               norms at ``--attn-scale`` x that rate.
``eval``       validation perplexity matrix (base + experts x domains) from the saved
               bf16 weights, and oracle retention: expert ppl / ppl of a plain Llama with
               the founders' *averaged* non-MLP tensors and the expert's own MLPs.

Everything is seeded; budgets are in steps.  See ``recipe/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from dume_dist.demo import (
    DOMAINS,
    FOUNDING_DOMAINS,
    JOINING_DOMAIN,
    base_dir,
    data_path,
    expert_dir,
)

RECIPE_DIR = Path(__file__).resolve().parent
SPECIALS = ("<pad>", "<bos>", "<eos>")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def read_docs(domain: str, split: str) -> list[str]:
    text = data_path(domain, split).read_text(encoding="utf-8")
    return [d for d in text.split("\n\n") if d.strip()]


# ------------------------------------------------------------------------- tokenizer


def train_tokenizer(vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = [d for dom in FOUNDING_DOMAINS for d in read_docs(dom, "train")]
    tok.train_from_iterator(docs, trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        model_max_length=512,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    return hf


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def token_stream(tok, domain: str, split: str) -> torch.Tensor:
    """All documents of a split as one id stream: <bos> doc <eos> <bos> doc <eos> ..."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # chunks are longer than model_max_length: fine here
    ids: list[int] = []
    enc = tok(read_docs(domain, split), add_special_tokens=False)["input_ids"]
    for e in enc:
        ids.append(tok.bos_token_id)
        ids.extend(e)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- model


def make_config(tok, args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
    )


def load_fp32(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def save_bf16(model, tok, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    m = model.to(torch.bfloat16)
    m.config.dtype = torch.bfloat16
    m.save_pretrained(path)
    tok.save_pretrained(path)
    model.to(torch.float32)


def batches(streams: list[torch.Tensor], steps: int, batch: int, seq: int, seed: int):
    """Random windows of seq+1 tokens; each row from a uniformly drawn stream."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = []
        which = torch.randint(len(streams), (batch,), generator=g)
        for w in which.tolist():
            s = streams[w]
            i = int(torch.randint(len(s) - seq, (1,), generator=g))
            rows.append(s[i : i + seq])
        yield torch.stack(rows)


def lr_at(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def train_loop(model, groups, streams, steps, args, seed, tag):
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    model.train()
    t0 = time.time()
    for step, x in enumerate(batches(streams, steps, args.batch, args.seq, seed)):
        f = lr_at(step, steps, args.warmup)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"{tag} step {step:4d}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return time.time() - t0


def is_mlp(name: str) -> bool:
    return ".mlp." in name


def is_frozen(name: str) -> bool:
    return "embed_tokens" in name or name.startswith("lm_head")


def pretrain(tok, args) -> float:
    from transformers import LlamaForCausalLM

    seed_all(args.seed)
    model = LlamaForCausalLM(make_config(tok, args))
    log(f"base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
    streams = [token_stream(tok, d, "train") for d in FOUNDING_DOMAINS]
    groups = [{"params": list(model.parameters()), "lr": args.base_lr}]
    secs = train_loop(model, groups, streams, args.base_steps, args, args.seed, "base")
    save_bf16(model, tok, base_dir())
    return secs


def attn_scale(domain: str, args) -> float:
    return args.joining_attn_scale if domain == JOINING_DOMAIN else args.attn_scale


def finetune(tok, domain: str, args) -> float:
    seed = args.seed + 1 + DOMAINS.index(domain)
    seed_all(seed)
    model = load_fp32(base_dir())  # the bf16-rounded base as shipped
    mlp, other = [], []
    for name, p in model.named_parameters():
        if is_frozen(name):
            p.requires_grad_(False)
        elif is_mlp(name):
            mlp.append(p)
        else:
            other.append(p)
    groups = [
        {"params": mlp, "lr": args.expert_lr},
        {"params": other, "lr": args.expert_lr * attn_scale(domain, args)},
    ]
    streams = [token_stream(tok, domain, "train")]
    secs = train_loop(model, groups, streams, args.expert_steps, args, seed, f"expert {domain}")
    save_bf16(model, tok, expert_dir(domain))
    return secs


# ------------------------------------------------------------------------------ eval


@torch.no_grad()
def mean_loss(model, stream: torch.Tensor, seq: int, max_windows: int | None = None) -> float:
    n = len(stream) // seq
    if max_windows:
        n = min(n, max_windows)
    x = stream[: n * seq].view(n, seq)
    tot, cnt = 0.0, 0
    for i in range(0, n, 32):
        xb = x[i : i + 32]
        logits = model(input_ids=xb).logits[:, :-1].float()
        tot += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), xb[:, 1:].reshape(-1), reduction="sum"
        ).item()
        cnt += xb[:, 1:].numel()
    return tot / cnt


def compose(backbone_sds: list[dict], mlp_sd: dict) -> dict:
    """Average of the backbone state dicts' non-MLP tensors + one expert's MLP tensors."""
    out = {}
    for k in mlp_sd:
        if is_mlp(k):
            out[k] = mlp_sd[k].clone()
        else:
            out[k] = torch.stack([sd[k].double() for sd in backbone_sds]).mean(0).float()
    return out


def rel_diff(a: dict, b: dict, pred) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a if pred(k))
    den = sum(float(b[k].double().norm() ** 2) for k in a if pred(k))
    return math.sqrt(num / den)


def evaluate(tok, args) -> dict:
    from transformers import LlamaForCausalLM

    streams = {d: token_stream(tok, d, "valid") for d in DOMAINS}
    models = {"base": load_fp32(base_dir())}
    for d in DOMAINS:
        models[d] = load_fp32(expert_dir(d))
    ppl: dict[str, dict[str, float]] = {}
    for name, m in models.items():
        ppl[name] = {d: math.exp(mean_loss(m, streams[d], args.seq)) for d in DOMAINS}
        log(f"ppl {name:10s} " + " ".join(f"{d}={v:8.2f}" for d, v in ppl[name].items()))

    sds = {n: {k: v.float() for k, v in m.state_dict().items()} for n, m in models.items()}
    founders = [sds[d] for d in FOUNDING_DOMAINS]
    avg = compose(founders, sds["base"])  # non-MLP average (its MLPs are unused here)
    cfg = models["base"].config
    oracle: dict[str, dict] = {}
    for d in DOMAINS:
        row = {"expert_ppl": ppl[d][d]}
        for bb_name, bb in (("average", founders), ("base", [sds["base"]])):
            m = LlamaForCausalLM(cfg).eval()
            m.load_state_dict(compose(bb, sds[d]))
            p = math.exp(mean_loss(m, streams[d], args.seq))
            row[f"{bb_name}_backbone_ppl"] = p
            row[f"{bb_name}_backbone_retention"] = ppl[d][d] / p
        row["nonmlp_rel_diff_vs_average"] = rel_diff(sds[d], avg, lambda k: not is_mlp(k))
        row["nonmlp_rel_diff_vs_base"] = rel_diff(sds[d], sds["base"], lambda k: not is_mlp(k))
        row["mlp_rel_diff_vs_base"] = rel_diff(sds[d], sds["base"], is_mlp)
        oracle[d] = row
        log(
            f"oracle {d:10s} expert={row['expert_ppl']:.2f} avg-bb={row['average_backbone_ppl']:.2f}"
            f" ({100 * row['average_backbone_retention']:.1f}%)"
            f" base-bb={row['base_backbone_ppl']:.2f} ({100 * row['base_backbone_retention']:.1f}%)"
        )
    frozen_equal = all(
        torch.equal(sds[d][k], sds["base"][k]) for d in DOMAINS for k in sds[d] if is_frozen(k)
    )
    return {
        "ppl": ppl,
        "oracle": oracle,
        "frozen_tensors_bit_identical": frozen_equal,
        "valid_tokens": {d: int(len(s) // args.seq * args.seq) for d, s in streams.items()},
    }


def write_results(res: dict, args, trained: dict) -> None:
    res = dict(res)
    res["trained"] = trained
    (RECIPE_DIR / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    cols = list(DOMAINS)
    lines = [
        "# Demo experts: measured results",
        "",
        "Generated by `python -m dume_dist.demo.recipe.train` (from the saved bf16 weights,",
        f"cast to fp32; validation windows of {args.seq} tokens, every window of each",
        "domain's `valid.txt`). Joining domain (not in the base's pretraining, not in the",
        f"averaged backbone): **{JOINING_DOMAIN}**.",
        "",
        "## Validation perplexity (rows: model, columns: domain)",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, row in res["ppl"].items():
        best = {c: min(res["ppl"][n][c] for n in res["ppl"]) for c in cols}
        cells = [f"**{row[c]:.2f}**" if row[c] == best[c] else f"{row[c]:.2f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Oracle retention (expert ppl / ppl with the expert's MLPs on a shared backbone)",
        "",
        "`average` backbone = element-wise mean of the four founding experts' non-MLP",
        "tensors (embeddings, attention, norms, lm_head): what DUME's oracle routing",
        "computes. `base` backbone = the base model's non-MLP tensors.",
        "",
        "| domain | expert ppl | avg-backbone ppl | retention (avg) | base-backbone ppl"
        " | retention (base) | non-MLP rel. diff vs avg | MLP rel. diff vs base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d, r in res["oracle"].items():
        tag = " (joining)" if d == JOINING_DOMAIN else ""
        lines.append(
            f"| {d}{tag} | {r['expert_ppl']:.2f} | {r['average_backbone_ppl']:.2f}"
            f" | {100 * r['average_backbone_retention']:.1f}% | {r['base_backbone_ppl']:.2f}"
            f" | {100 * r['base_backbone_retention']:.1f}% | {r['nonmlp_rel_diff_vs_average']:.4f}"
            f" | {r['mlp_rel_diff_vs_base']:.4f} |"
        )
    b = trained["base"]
    lines += [
        "",
        f"Frozen tensors (embeddings, lm_head) bit-identical across base and experts: "
        f"{res['frozen_tensors_bit_identical']}.",
        "",
        "## Settings (`train_log.json`)",
        "",
        f"Tokenizer vocab {trained['tokenizer']['vocab_size']}. Base: seed {b['seed']}, kv heads"
        f" {b['kv_heads']}, {b['steps']} steps of batch {b['batch']} x seq {b['seq']}, lr"
        f" {b['lr']}, warmup {b['warmup']}, cosine to 10%, AdamW(0.9, 0.95), no weight decay,"
        f" grad clip 1.0, {b['threads']} torch threads. Experts (same schedule and batch;"
        " embeddings and lm_head frozen):",
        "",
        "| expert | steps | MLP lr | attention/norm lr | seed | train seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for d, e in trained["experts"].items():
        lines.append(
            f"| {d} | {e['steps']} | {e['lr']} | {e['lr'] * e['attn_scale']:.2g}"
            f" ({e['attn_scale']}x) | {e['seed']} | {e['seconds']:.0f} |"
        )
    lines += [
        "",
        f"Base training took {b['seconds']:.0f} s (wall-clock on a shared 2-core CPU).",
        "",
    ]
    (RECIPE_DIR / "RESULTS.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m dume_dist.demo.recipe.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--stages",
        nargs="+",
        default=["tokenizer", "base", "experts", "eval"],
        choices=["tokenizer", "base", "experts", "eval"],
    )
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--base-lr", type=float, default=3e-3)
    ap.add_argument("--expert-steps", type=int, default=250)
    ap.add_argument("--expert-lr", type=float, default=2e-3)
    ap.add_argument(
        "--attn-scale",
        type=float,
        default=0.1,
        help="attention/norm lr as a fraction of --expert-lr (founding experts)",
    )
    ap.add_argument(
        "--joining-attn-scale",
        type=float,
        default=0.02,
        help="the same for the joining domain's expert",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok_dir = base_dir()
    lpath = RECIPE_DIR / "train_log.json"
    trained: dict = {"tokenizer": {}, "base": {}, "experts": {}}
    if lpath.exists():
        trained = json.loads(lpath.read_text())

    if "tokenizer" in args.stages:
        tok = train_tokenizer(args.vocab_size, tok_dir)
        trained["tokenizer"] = {"vocab_size": len(tok)}
        log(f"tokenizer: {len(tok)} tokens")
    tok = load_tokenizer(tok_dir)
    if "base" in args.stages:
        secs = pretrain(tok, args)
        trained["base"] = {
            "seed": args.seed,
            "kv_heads": args.kv_heads,
            "steps": args.base_steps,
            "batch": args.batch,
            "seq": args.seq,
            "lr": args.base_lr,
            "warmup": args.warmup,
            "threads": args.threads,
            "seconds": secs,
        }
    if "experts" in args.stages:
        for d in args.domains:
            secs = finetune(tok, d, args)
            trained["experts"][d] = {
                "seed": args.seed + 1 + DOMAINS.index(d),
                "steps": args.expert_steps,
                "lr": args.expert_lr,
                "attn_scale": attn_scale(d, args),
                "threads": args.threads,
                "seconds": secs,
            }
            lpath.write_text(json.dumps(trained, indent=1) + "\n")
        trained["experts"] = {d: trained["experts"][d] for d in DOMAINS if d in trained["experts"]}
    lpath.write_text(json.dumps(trained, indent=1) + "\n")
    if "eval" in args.stages:
        write_results(evaluate(tok, args), args, trained)


if __name__ == "__main__":
    main()
