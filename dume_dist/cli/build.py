"""`dume build` and `dume eval`: the single-machine MoErge and its evaluation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BACKBONE_HELP = "'average' of the experts' non-MLP weights (the paper) or 'base:DIR'"


def parse_named(values: list[str] | None, flag: str) -> dict[str, list[str]]:
    """``["a=x", "a=y", "b=z"]`` → ``{"a": ["x", "y"], "b": ["z"]}`` (order kept)."""
    out: dict[str, list[str]] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} expects NAME=PATH, got {value!r}")
        out.setdefault(name, []).append(path)
    return out


def parse_experts(values: list[str] | None) -> dict[str, str]:
    named = parse_named(values, "--expert")
    dup = [n for n, paths in named.items() if len(paths) > 1]
    if dup:
        raise ValueError(f"--expert names must be unique, {dup[0]!r} is given twice")
    return {n: paths[0] for n, paths in named.items()}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="MoErge dense experts into one DUME model")
    p.add_argument(
        "--expert",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a dense expert (HF model directory); repeat for each expert",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="router-statistics text of expert NAME (.txt or .jsonl); repeatable",
    )
    p.add_argument("--out", required=True, help="output model directory (must not exist)")
    p.add_argument("--backbone", default="average", help=BACKBONE_HELP)
    p.add_argument("--lam", type=float, default=1e-2, help="ridge regulariser λ")
    p.add_argument("--temperature", type=float, default=1.0, help="router temperature T")
    p.add_argument("--top-k", type=int, default=1, help="experts per token k")
    p.add_argument(
        "--max-tokens-per-seq",
        type=int,
        default=1024,
        help="leading tokens of each sequence used for statistics",
    )
    p.add_argument(
        "--max-tokens", type=int, default=None, help="cap on statistics tokens per expert"
    )
    p.add_argument("--seq-len", type=int, default=512, help="window length for statistics")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--format",
        choices=("dume", "mixtral"),
        default="dume",
        help="dume (router with bias, remote code) or mixtral (stock transformers)",
    )
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_build)

    e = sub.add_parser("eval", help="held-out perplexity per domain (and routing accuracy)")
    e.add_argument("--model", required=True, help="model directory (DUME, Mixtral or dense)")
    e.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="held-out text of domain NAME; repeatable",
    )
    e.add_argument(
        "--experts",
        action="append",
        metavar="NAME=DIR",
        help="dense experts: adds the baselines (experts, averaging, random, oracle, k=2, bias-free)",
    )
    e.add_argument("--json", help="write the results as JSON here")
    e.add_argument("--heatmap", help="write a routing heatmap PNG here (DUME models)")
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-eval-tokens", type=int, default=32768, help="per domain")
    e.add_argument("--device", default=None)
    e.set_defaults(func=run_eval)


def run_build(args) -> int:
    from dume_dist.model.build import build_dume

    experts = parse_experts(args.expert)
    data = parse_named(args.data, "--data")
    out = Path(args.out)
    if args.format == "mixtral":
        return _build_mixtral(args, experts, data, out)
    result = build_dume(
        experts, data, out,
        backbone=args.backbone, lam=args.lam, temperature=args.temperature, top_k=args.top_k,
        max_tokens_per_seq=args.max_tokens_per_seq, max_tokens=args.max_tokens,
        batch_size=args.batch_size, seq_len=args.seq_len, device=args.device,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote DUME model to {out}")
    _print_build_summary(result)
    return 0


def _build_mixtral(args, experts, data, out: Path) -> int:
    import tempfile

    from dume_dist.model.build import build_dume
    from dume_dist.model.export_mixtral import export_mixtral

    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"output directory {out} exists and is not empty (use --overwrite)")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        dume_dir = Path(tmp) / "dume"
        build_dume(
            experts, data, dume_dir,
            backbone=args.backbone, lam=args.lam, temperature=args.temperature, top_k=args.top_k,
            max_tokens_per_seq=args.max_tokens_per_seq, max_tokens=args.max_tokens,
            batch_size=args.batch_size, seq_len=args.seq_len, device=args.device,
        )  # fmt: skip
        export_mixtral(dume_dir, out, overwrite=args.overwrite)
    print(f"wrote Mixtral model to {out}")
    return 0


def _print_build_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    stats = getattr(result, "num_tokens", None)
    if not stats:
        return
    table = Table(title="statistics per expert")
    table.add_column("expert")
    table.add_column("tokens", justify="right")
    for name, count in stats.items():
        table.add_row(name, f"{count:,}")
    Console().print(table)


def run_eval(args) -> int:
    from dume_dist.model.evaluate import compare, print_table, write_heatmap

    data = parse_named(args.data, "--data")
    experts = parse_experts(args.experts) if args.experts else None
    table = compare(
        args.model, data, experts=experts, seq_len=args.seq_len, batch_size=args.batch_size,
        max_eval_tokens=args.max_eval_tokens, device=args.device,
    )  # fmt: skip
    print_table(table)
    if args.json:
        Path(args.json).write_text(json.dumps(table.to_json(), indent=2))
        print(f"wrote {args.json}")
    if args.heatmap:
        if not table.routing_share:
            raise ValueError("--heatmap needs a DUME model (no routing was recorded)")
        write_heatmap(table, args.heatmap)
        print(f"wrote {args.heatmap}")
    return 0
