"""`dume admin add-node`: the operator registers a node and issues its credential."""

from __future__ import annotations

from dume_dist.cli import federated
from dume_dist.cli.shared import (
    coordinator,
    operator_flag,
    operator_secret,
    ray_flags,
    secret_destination,
    write_secret,
)
from dume_dist.distributed.calls import call


def register(sub) -> None:
    a = sub.add_parser("admin", help="operator: register nodes")
    as_ = a.add_subparsers(dest="command2", required=True, metavar="ACTION")
    p = as_.add_parser("add-node", help="register a node and issue its credential")
    p.add_argument("--name", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument(
        "--credential-out",
        default=None,
        help="write the node's credential here (0600) instead of printing it",
    )
    operator_flag(p)
    ray_flags(p)
    p.set_defaults(func=run_add_node)
    federated.register_admin_actions(as_, operator_flag, ray_flags)


def run_add_node(args) -> int:
    from dume_dist.distributed.genesis import node_credential_record
    from dume_dist.store import new_secret

    secret = new_secret()
    hashed, key = node_credential_record(args.name, args.domain, secret)
    op = operator_secret(args)
    with secret_destination(args.credential_out):  # writable before the node exists
        call(coordinator(args), "add_node", op, args.name, args.domain, hashed, key)
    if args.credential_out:
        path = write_secret(args.credential_out, secret)
        print(f"node {args.name!r} ({args.domain}) registered; credential written to {path}")
    else:
        print(f"node {args.name!r} ({args.domain}) registered; its credential (shown once):")
        print(secret)
    return 0
