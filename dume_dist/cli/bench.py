"""`dume bench ...`: benchmarks that write JSON results and a markdown table."""

from __future__ import annotations

import argparse


def _common(p, *, experts: str | None = None, train: bool = False, valid: bool = False) -> None:
    """--json, and the expert/text flags a benchmark takes (``experts``: the --expert help)."""
    p.add_argument("--json", required=True, help="results file (a .md table is written beside it)")
    if experts is not None:
        p.add_argument("--expert", action="append", metavar="NAME=DIR", help=experts)
    if train:
        p.add_argument("--train", action="append", metavar="NAME=PATH",
                       help="statistics text of NAME (repeat)")  # fmt: skip
    if valid:
        p.add_argument("--valid", action="append", metavar="NAME=PATH",
                       help="held-out text of NAME (repeat)")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (results to JSON + markdown)")
    kinds = bench.add_subparsers(dest="command2", required=True, metavar="BENCH")

    inf = kinds.add_parser("inference", help="dense vs DUME tokens/s; statistics vs forward")
    _common(inf)
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

    rt = kinds.add_parser(
        "routing", help="routing options vs oracle routing: quality, statistics, solve, speed"
    )
    _common(rt, experts="an expert (repeat; default: the shipped founding demo experts)",
            train=True, valid=True)  # fmt: skip
    rt.add_argument(
        "--option",
        action="append",
        metavar="LABEL",
        help="run only the options whose label contains LABEL (repeat; default: all)",
    )
    rt.add_argument("--holdout-fraction", type=float, default=0.1)
    rt.add_argument("--seq-len", type=int, default=512, help="statistics window length")
    rt.add_argument("--max-tokens", type=int, default=None, help="statistics tokens per expert")
    rt.add_argument("--eval-seq-len", type=int, default=256)
    rt.add_argument("--max-eval-tokens", type=int, default=32768, help="per domain")
    rt.add_argument("--batch-size", type=int, default=8)
    rt.add_argument("--repeats", type=int, default=7)
    rt.add_argument("--threads", type=int, default=None)
    rt.add_argument("--device", default="cpu")
    rt.add_argument(
        "--mixed-sequences", type=int, default=64,
        help="mixed-domain sequences (4 segments of 64 tokens) per option; 0: none",
    )  # fmt: skip
    rt.set_defaults(func=run_routing)

    sc = kinds.add_parser(
        "scaling", help="join / re-solve / unlearn times and bytes pushed, 2-32 contributors"
    )
    _common(sc)
    sc.add_argument("--contributors", default="2,8,32", help="comma-separated contributor counts")
    sc.add_argument("--hidden-size", type=int, default=64)
    sc.add_argument("--layers", type=int, default=2)
    sc.add_argument("--intermediate-size", type=int, default=128)
    sc.add_argument("--tokens", type=int, default=2048, help="statistics tokens per contributor")
    sc.set_defaults(func=run_scaling)

    lk = kinds.add_parser(
        "leakage", help="what a curious coordinator recovers from each routing kind's statistics"
    )
    _common(lk, experts="an expert (repeat; default: the shipped ones)", train=True)
    lk.add_argument("--kind", action="append", choices=("ngram", "paper", "context"), default=None)
    lk.add_argument("--seq-len", type=int, default=512, help="statistics window length")
    lk.add_argument("--max-tokens", type=int, default=None, help="statistics tokens per expert")
    lk.add_argument(
        "--dp-epsilon", type=float, action="append", default=None,
        help="also attack statistics made (ε, --dp-delta)-private (repeat)",
    )  # fmt: skip
    lk.add_argument("--dp-delta", type=float, default=1e-6)
    lk.add_argument("--threads", type=int, default=None)
    lk.set_defaults(func=run_leakage)

    for name, helptext in (
        ("privacy", "what differential privacy costs per routing kind and ε (two data sizes)"),
        ("poisoning", "what one contributor's inflated or forged statistics do to routing"),
    ):
        rb = kinds.add_parser(name, help=helptext)
        _common(rb, experts="an expert (repeat; default: the shipped founding ones)",
                train=True, valid=True)  # fmt: skip
        linear = ("paper", "paper-equal", "context", "context-tokens")
        held = ("context-auto", "paper-equal-auto") if name == "poisoning" else ()
        rb.add_argument("--kind", action="append", choices=("ngram", *linear, *held),
                        help="settings (bench/robustness.py FIXED, HELDOUT); default: all")  # fmt: skip
        rb.add_argument("--seq-len", type=int, default=512, help="statistics window length")
        rb.add_argument("--max-eval-tokens", type=int, default=8192, help="per domain")
        rb.add_argument("--threads", type=int, default=None)
        if name == "privacy":
            rb.add_argument("--dp-epsilon", type=float, action="append", default=None,
                            help="ε to measure (repeat; default 8 and 1)")  # fmt: skip
            rb.add_argument("--dp-delta", type=float, default=1e-6)
            rb.add_argument("--sizes", default="",
                            help="comma-separated statistics tokens per expert (default: all)")  # fmt: skip
        else:
            rb.add_argument("--target", default="python", help="the lying contributor")
            rb.add_argument("--max-tokens", type=int, default=None)
        rb.set_defaults(func=run_robustness)

    sc = kinds.add_parser(
        "scale", help="memory and seconds of build, solve and publish at real sizes; store bytes"
    )
    _common(sc)
    sc.add_argument(
        "--shape",
        choices=("189m", "1b", "tiny"),
        default="189m",
        help="expert shape: 189m (hidden 1024, 16 layers, intermediate 2816), 1b (TinyLlama's), "
        "tiny (a quick check)",
    )
    sc.add_argument(
        "--experts", type=int, action="append", help="N to measure (repeat; default 2, 4, 8)"
    )
    sc.add_argument("--max-tokens", type=int, default=8192, help="statistics tokens per expert")
    sc.add_argument("--threads", type=int, default=None, help="torch threads in each step")
    sc.add_argument("--work", default=None, help="keep the experts and stores here")
    sc.set_defaults(func=run_scale)


def run_inference(args) -> int:
    _check_outputs(args)
    from dume_dist.bench.inference import markdown_table, run_inference_bench

    expert = args.expert
    if expert is None:
        from dume_dist.demo import FOUNDING_DOMAINS, expert_dir

        expert = str(expert_dir(FOUNDING_DOMAINS[0]))
    result = run_inference_bench(
        expert_dir=expert, num_experts=args.num_experts, batch_size=args.batch_size,
        seq_len=args.seq_len, repeats=args.repeats, threads=args.threads, device=args.device,
    )  # fmt: skip
    return _report(result, args.json, markdown_table)


def run_scale(args) -> int:
    _check_outputs(args)
    from dume_dist.bench.scale import markdown_table, run_scale_bench

    result = run_scale_bench(
        counts=tuple(args.experts or (2, 4, 8)), shape=args.shape, max_tokens=args.max_tokens,
        threads=args.threads, work=args.work,
    )  # fmt: skip
    return _report(result, args.json, markdown_table)


def run_routing(args) -> int:
    _check_outputs(args)
    from dume_dist.bench.routing import markdown_table, run_routing_bench, select_options
    from dume_dist.cli.build import parse_experts, parse_named
    from dume_dist.model.mixed import MixedSettings

    if args.expert:
        experts = parse_experts(args.expert)
        train, valid = parse_named(args.train, "--train"), parse_named(args.valid, "--valid")
        if set(train) != set(experts) or not set(valid) <= set(experts) or not valid:
            raise ValueError("--train needs every --expert name, --valid a subset of them")
    else:
        experts, train, valid = _founders()
    options = select_options(args.option)
    result = run_routing_bench(
        experts, train, valid, options=options, holdout_fraction=args.holdout_fraction,
        seq_len=args.seq_len, max_tokens=args.max_tokens, eval_seq_len=args.eval_seq_len,
        max_eval_tokens=args.max_eval_tokens, batch_size=args.batch_size, repeats=args.repeats,
        threads=args.threads, device=args.device,
        mixed=MixedSettings(sequences=args.mixed_sequences) if args.mixed_sequences > 0 else None,
    )  # fmt: skip
    code = _report(result, args.json, markdown_table)
    print(f"best: {result['best']}")
    return code


def run_scaling(args) -> int:
    _check_outputs(args)
    from dume_dist.distributed.auth import token_auth_for_a_new_cluster

    token_auth_for_a_new_cluster()  # before Ray is imported
    from dume_dist.bench.scaling import markdown_table, run_scaling_bench

    counts = _int_list(args.contributors, "--contributors")
    result = run_scaling_bench(counts, hidden_size=args.hidden_size, num_layers=args.layers,
                               intermediate_size=args.intermediate_size, tokens=args.tokens)  # fmt: skip
    return _report(result, args.json, markdown_table)


def _experts_and_train(args):
    from dume_dist.cli.build import parse_experts, parse_named

    if args.expert:
        experts, train = parse_experts(args.expert), parse_named(args.train, "--train")
        if set(train) != set(experts):
            raise ValueError("--train needs every --expert name")
        return experts, train
    from dume_dist.demo import DOMAINS, data_path, expert_dir

    return {d: str(expert_dir(d)) for d in DOMAINS}, {d: [str(data_path(d))] for d in DOMAINS}


def run_leakage(args) -> int:
    _check_outputs(args)
    import torch

    from dume_dist.bench.leakage import KINDS, markdown_table, run_leakage_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    experts, train = _experts_and_train(args)
    result = run_leakage_bench(
        experts, train, kinds=args.kind or KINDS, seq_len=args.seq_len,
        max_tokens=args.max_tokens, dp_epsilons=args.dp_epsilon or (), dp_delta=args.dp_delta,
    )  # fmt: skip
    return _report(result, args.json, markdown_table)


def run_robustness(args) -> int:
    _check_outputs(args)
    import torch

    from dume_dist.bench import robustness as rb

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.expert:
        experts, train = _experts_and_train(args)
        valid = parse_named_valid(args)
    else:
        experts, train, valid = _founders()
    default = rb.FIXED if args.command2 == "privacy" else rb.SETTINGS
    common = dict(kinds=args.kind or tuple(default), seq_len=args.seq_len,
                  max_eval_tokens=args.max_eval_tokens)  # fmt: skip
    if args.command2 == "privacy":
        sizes = _int_list(args.sizes, "--sizes", empty_ok=True) or [None]
        result = rb.run_privacy_bench(experts, train, valid, epsilons=args.dp_epsilon or (8.0, 1.0),
                                      delta=args.dp_delta, sizes=sizes, **common)  # fmt: skip
        table = rb.privacy_table
    else:
        result = rb.run_poisoning_bench(experts, train, valid, target=args.target,
                                        max_tokens=args.max_tokens, **common)  # fmt: skip
        table = rb.poisoning_table
    return _report(result, args.json, table)


def parse_named_valid(args) -> dict:
    from dume_dist.cli.build import parse_named

    valid = parse_named(args.valid, "--valid")
    if not valid:
        raise ValueError("--valid is needed with --expert")
    return valid


def _int_list(text: str, flag: str, empty_ok: bool = False) -> list[int]:
    """Comma-separated positive integers (a one-line error naming ``flag`` otherwise)."""
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not all(x.isdigit() and int(x) > 0 for x in items) or not (items or empty_ok):
        raise ValueError(f"{flag} expects comma-separated positive integers, got {text!r}")
    return [int(x) for x in items]


def _check_outputs(args) -> None:
    """Before any work: --json (and the .md beside it) can be written, --device exists, the
    counts are positive."""
    from dume_dist.bench.results import check_results_path
    from dume_dist.cli.build import check_device

    check_results_path(args.json, "--json")
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    for key in ("num_experts", "batch_size", "seq_len", "repeats", "threads", "max_tokens",
                "eval_seq_len", "max_eval_tokens", "hidden_size", "layers", "intermediate_size",
                "tokens"):  # fmt: skip
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {value}")
    if getattr(args, "mixed_sequences", 0) < 0:
        raise ValueError(f"--mixed-sequences must be >= 0, got {args.mixed_sequences}")


def _report(result: dict, json_path: str, table) -> int:
    """Write ``result`` (JSON and its Markdown table beside it) and print the table."""
    from dume_dist.bench.results import write_results

    md = write_results(result, json_path, table)
    print(table(result))
    print(f"wrote {json_path} and {md}")
    return 0


def _founders() -> tuple[dict, dict, dict]:
    """The shipped founding experts with their statistics and held-out texts."""
    from dume_dist.demo import FOUNDING_DOMAINS, data_path, expert_dir

    experts = {d: str(expert_dir(d)) for d in FOUNDING_DOMAINS}
    train = {d: [str(data_path(d, "train"))] for d in FOUNDING_DOMAINS}
    valid = {d: [str(data_path(d, "valid"))] for d in FOUNDING_DOMAINS}
    return experts, train, valid
