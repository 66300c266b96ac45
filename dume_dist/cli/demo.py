"""`dume demo`: the whole story on a local Ray cluster (found, join, unlearn)."""

from __future__ import annotations

from dume_dist.cli.build import ROUTING_PRESETS


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole story on a local Ray cluster: found, join, unlearn")
    p.add_argument(
        "--store", default=None, help="store directory (default: a temp dir, removed afterwards)"
    )
    p.add_argument("--max-tokens", type=int, default=20000, help="statistics tokens per node")
    p.add_argument(
        "--eval-tokens", type=int, default=8192, help="held-out tokens per domain for the ppl table"
    )
    p.add_argument(
        "--unlearn", default=None, help="domain to unlearn (default: the second founding domain)"
    )
    p.add_argument("--json", default=None, help="also write the versions and ppl tables here")
    p.add_argument(
        "--routing",
        choices=ROUTING_PRESETS,
        default=None,
        help="routing preset of the demo's coordinator (default: the default routing)",
    )
    p.add_argument("--federated", action="store_true",
                   help="each contributor on its own Ray cluster, talking to the coordinator only "
                   "over its HTTPS API on 127.0.0.1")  # fmt: skip
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from dume_dist.distributed.auth import token_auth_for_a_new_cluster

    token_auth = token_auth_for_a_new_cluster()  # before Ray is imported
    from dume_dist.distributed.demo import run_demo as demo

    print(
        f"Ray token authentication: {'on (a fresh token for this cluster)' if token_auth else 'off'}"
    )

    settings = {"routing": args.routing} if args.routing else None
    if args.federated:
        from dume_dist.distributed.federated_demo import run_federated_demo as demo
    demo(store=args.store, max_tokens=args.max_tokens, eval_tokens=args.eval_tokens,
         unlearn=args.unlearn, json_out=args.json, settings=settings)  # fmt: skip
    return 0
