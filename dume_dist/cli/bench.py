"""`dume bench ...`: benchmarks that write JSON results and a markdown table."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (results to JSON + markdown)")
    kinds = bench.add_subparsers(dest="command2", required=True, metavar="BENCH")

    inf = kinds.add_parser("inference", help="dense vs DUME tokens/s; statistics vs forward")
    inf.add_argument(
        "--json", required=True, help="results file (a .md table is written beside it)"
    )
    inf.add_argument(
        "--expert",
        default=None,
        help="take dimensions from this expert dir (default: the shipped demo experts)",
    )
    inf.add_argument("--num-experts", type=int, default=4)
    inf.add_argument("--batch-size", type=int, default=8)
    inf.add_argument("--seq-len", type=int, default=256)
    inf.add_argument("--repeats", type=int, default=5)
    inf.add_argument("--threads", type=int, default=None)
    inf.add_argument("--device", default=None)
    inf.set_defaults(func=run_inference)

    try:
        from dume_dist.cli import dist_commands
    except ImportError:
        return
    if hasattr(dist_commands, "register_bench"):
        dist_commands.register_bench(kinds)


def run_inference(args) -> int:
    from dume_dist.bench.inference import markdown_table, run_inference_bench, write_results

    expert = args.expert
    if expert is None:
        from dume_dist.demo import FOUNDING_DOMAINS, expert_dir

        expert = str(expert_dir(FOUNDING_DOMAINS[0]))
    result = run_inference_bench(
        expert_dir=expert, num_experts=args.num_experts, batch_size=args.batch_size,
        seq_len=args.seq_len, repeats=args.repeats, threads=args.threads, device=args.device,
    )  # fmt: skip
    md = write_results(result, args.json)
    print(markdown_table(result))
    print(f"wrote {args.json} and {md}")
    return 0
