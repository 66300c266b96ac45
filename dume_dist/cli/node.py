"""`dume node join|leave`: a contributor's commands (with the credential the operator issued)."""

from __future__ import annotations

import sys
from pathlib import Path

from dume_dist.cli import federated
from dume_dist.cli.build import add_dp_flags, dp_spec
from dume_dist.cli.shared import coordinator, node_credential_flag, node_secret, ray_flags
from dume_dist.distributed.calls import call


def register(sub) -> None:
    n = sub.add_parser("node", help="contributor: join with an expert and local data, or leave")
    ns = n.add_subparsers(dest="command2", required=True, metavar="ACTION")

    p = ns.add_parser(
        "join", help="upload the expert's MLPs and this node's statistics (data stays here)"
    )
    p.add_argument("--name", required=True, help="this node's name (as registered by the operator)")
    p.add_argument("--domain", required=True, help="this node's domain (as registered)")
    p.add_argument("--expert", required=True, help="the expert's HF model directory on this node")
    p.add_argument(
        "--data", nargs="+", action="extend", required=True, help=".txt/.jsonl files on this node"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="statistics workers (default: one per GPU, else 1)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=None, help="cap on the statistics tokens of this run"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--seq-len", type=int, default=None, help="window length (default: max_tokens_per_seq)"
    )
    p.add_argument("--cache-dir", default=None, help="where the backbone is cached on this node")
    p.add_argument(
        "--node-id", default=None, help="Ray node id to pin the agent to (default: this node)"
    )
    p.add_argument("--no-progress", action="store_true", help="do not show progress")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="compute the statistics and show what would leave this node, then stop",
    )
    p.add_argument(
        "--send-heldout-bigrams",
        action="store_true",
        help="allow sending the exact (previous token, token, count) bigrams of the held-out "
        "documents (text fragments), for a coordinator whose n-gram routing uses them "
        "(mu_criterion bigrams, or switch auto); the default routing needs none",
    )
    add_dp_flags(p)
    p.add_argument("--json", default=None, help="also write the join's result here")
    node_credential_flag(p)
    ray_flags(p)
    federated.add_url_flags(p)
    p.set_defaults(func=run_join)

    p = ns.add_parser("leave", help="withdraw this node's contribution (a new version without it)")
    p.add_argument("--name", required=True)
    p.add_argument("--domain", required=True)
    node_credential_flag(p)
    ray_flags(p)
    federated.add_url_flags(p)
    p.set_defaults(func=run_leave)
    federated.register_node_actions(ns, node_credential_flag)


def run_join(args) -> int:
    from dume_dist.distributed.cluster import launch_agent, run_join

    secret = node_secret(args)
    data = [str(Path(p).resolve()) for p in args.data]
    dp = dp_spec(args)
    kwargs = {"expert_dir": str(Path(args.expert).resolve()), "data": data, "workers": args.workers,
              "max_tokens": args.max_tokens, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "dp": None if dp is None else dp.to_json(), "dry_run": True,
              "send_heldout_bigrams": args.send_heldout_bigrams}  # fmt: skip
    show = not args.no_progress and sys.stderr.isatty()
    if args.coordinator_url:  # federated: this machine's own Ray, the coordinator over HTTPS
        with federated.own_ray(args, secret) as link:
            agent = launch_agent(link, args.name, args.domain, None, node_id=args.node_id,
                                 cache_dir=args.cache_dir)  # fmt: skip
            return _join_with(agent, run_join, kwargs, show, args)
    agent = launch_agent(coordinator(args), args.name, args.domain, secret, node_id=args.node_id,
                         cache_dir=args.cache_dir)  # fmt: skip
    return _join_with(agent, run_join, kwargs, show, args)


def _join_with(agent, run_join, kwargs: dict, show: bool, args) -> int:
    """Compute, show what will leave the node, then send it (unless ``--dry-run``)."""
    prepared = run_join(agent, kwargs, show_progress=show)
    print_outbound(prepared["outbound"], args.dry_run)
    if args.dry_run:  # (--json: what would leave the node, as shown)
        _write_json(args.json, prepared)
        return 0
    result = call(agent, "send_prepared")
    print_join(result)
    federated.print_sent(result)
    _write_json(args.json, result)
    return 0


def _write_json(path: str | None, result: dict) -> None:
    if path:
        import json

        Path(path).write_text(json.dumps(result, indent=2, default=str))


def print_outbound(outbound: list[dict], dry_run: bool) -> None:
    """What leaves the node, printed before anything is sent."""
    verb = "would leave" if dry_run else "will leave"
    total = sum(o["bytes"] for o in outbound)
    print(f"what {verb} this node ({total:,} B; the data itself never does):")
    for o in outbound:
        tokens = f", {o['tokens']:,} tokens" if "tokens" in o else ""
        print(f"  {o['what']} [{o['kind']}]: {o['bytes']:,} B{tokens}")
    if not outbound:
        print("  nothing (these statistics were already counted)")


def print_join(result: dict) -> None:
    status = result["status"]
    extra = " (already counted: nothing added)" if status == "duplicate" else ""
    print(
        f"node {result['node']}: statistics {status}{extra}; latest version {result.get('version') or '(held)'}"
    )
    if "stats_bytes" in result:
        print(f"  pushed {result['stats_bytes']:,} B of statistics; expert MLPs {result['expert_bytes']:,} B "
              f"({'uploaded' if result['expert_uploaded'] else 'already registered'})")  # fmt: skip


def run_leave(args) -> int:
    if args.coordinator_url:
        result = federated.run_node_leave_http(args, node_secret(args))
    else:
        result = call(coordinator(args), "leave", node_secret(args), args.name, args.domain)
    print(f"node {args.name!r} left; latest version {result['version'] or '(none)'}")
    return 0
