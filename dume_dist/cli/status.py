"""`dume status`: contributors, domains, tokens and versions (from the coordinator, or read from
the store's registry with ``--store``)."""

from __future__ import annotations

from dume_dist.cli.shared import coordinator, open_store, ray_flags, store_flags
from dume_dist.distributed.calls import call


def register(sub) -> None:
    p = sub.add_parser("status", help="contributors, domains, tokens and versions")
    store_flags(p, required=False)
    ray_flags(p)
    p.set_defaults(func=run_status)


def run_status(args) -> int:
    from dume_dist.distributed.tables import print_status

    if args.store:
        from dume_dist.distributed.state import public_view
        from dume_dist.store import RegistryStore, coordinator_layout

        store = open_store(args, must_exist=True)
        state, rev = RegistryStore(store, coordinator_layout(store).registry).load()
        status = {"store": args.store, "revision": rev, "registry": public_view(state)}
    else:
        status = call(coordinator(args), "status")
    print_status(status)
    return 0
