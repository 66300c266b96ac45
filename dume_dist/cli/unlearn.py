"""`dume unlearn`: the operator removes a node's statistics and expert, re-solves and publishes."""

from __future__ import annotations

from dume_dist.cli.shared import coordinator, operator_flag, operator_secret, ray_flags
from dume_dist.distributed.calls import call


def register(sub) -> None:
    p = sub.add_parser(
        "unlearn", help="operator: remove a node's statistics and expert, re-solve, publish"
    )
    p.add_argument("--node", required=True, help="the node to unlearn")
    p.add_argument("--reason", required=True, help="why (recorded in the registry)")
    p.add_argument(
        "--purge", action="store_true", help="also delete every earlier version that contained it"
    )
    operator_flag(p)
    ray_flags(p)
    p.set_defaults(func=run_unlearn)


def run_unlearn(args) -> int:
    result = call(
        coordinator(args), "unlearn", operator_secret(args), args.node, args.reason, args.purge
    )
    affected = ", ".join(result["affected_versions"]) or "none"
    # what the registry records (an earlier `--purge` of the node stands), not this call's flag
    what = "purged" if result.get("purge", args.purge) else "marked contains_unlearned"
    latest = result["version"]
    print(
        f"unlearned {args.node!r}: its statistics and expert are deleted; latest version {latest or '(none)'}"
    )
    print(f"earlier versions that contained it ({what}): {affected}")
    if result["hold"]:
        print("publication is held: run `dume coordinator publish` to publish a version without it")
    elif latest is not None and latest in result["affected_versions"]:
        print(f"no version without it was published (no active contributor is left): "
              f"{latest} contains it and is {what.split()[0]}")  # fmt: skip
    return 0
