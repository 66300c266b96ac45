"""`dume coordinator start|stop|publish|hold|rebase`: the operator's coordinator actor."""

from __future__ import annotations

import os
from pathlib import Path

from dume_dist.cli import federated
from dume_dist.cli.build import BACKBONE_HELP, add_routing_flags, parse_experts, routing_settings
from dume_dist.cli.shared import (
    DEFAULT_OPERATOR_FILE,
    coordinator,
    open_store,
    operator_flag,
    operator_secret,
    parse_storage_options,
    ray_flags,
    read_secret,
    store_flags,
    write_secret,
)
from dume_dist.distributed.calls import call


def register(sub) -> None:
    c = sub.add_parser("coordinator", help="operator: the coordinator actor on the Ray cluster")
    cs = c.add_subparsers(dest="command2", required=True, metavar="ACTION")

    p = cs.add_parser(
        "start", help="start (or find) the coordinator; found the store on first start"
    )
    store_flags(p, required=True)
    p.add_argument("--backbone", default="average", help=BACKBONE_HELP)
    p.add_argument("--founding-expert", action="append", default=None, metavar="NAME=DIR",
                   help="a founding expert whose non-MLP weights the 'average' backbone averages (repeatable)")  # fmt: skip
    add_routing_flags(p, holdout_owner="node")  # fixed at genesis
    p.add_argument("--temperature", type=float, default=1.0, help="router temperature T")
    p.add_argument(
        "--max-tokens-per-seq",
        type=int,
        default=None,
        help="leading tokens of each sequence in the statistics (default: the experts' "
        "max_position_embeddings, at most 1024)",
    )
    p.add_argument(
        "--hold",
        action="store_true",
        help="start with publication held (publish with `coordinator publish`)",
    )
    p.add_argument(
        "--resource",
        default=None,
        help="place the coordinator on a node offering this custom resource (deploy/ gives the head 'dume_coordinator')",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="the coordinator's local cache (default: a temp dir on its node)",
    )
    federated.add_serve_flags(p)
    operator_flag(p)
    ray_flags(p)
    p.set_defaults(func=run_start)

    p = cs.add_parser("stop", help="stop the coordinator actor (its state stays in the store)")
    ray_flags(p)
    p.set_defaults(func=run_stop)

    p = cs.add_parser(
        "publish", help="publish a version now if contributions changed (even when held)"
    )
    operator_flag(p)
    ray_flags(p)
    p.set_defaults(func=run_publish)

    p = cs.add_parser("hold", help="hold publication (or --release it, publishing what is pending)")
    p.add_argument(
        "--release", action="store_true", help="release the hold and publish pending changes"
    )
    operator_flag(p)
    ray_flags(p)
    p.set_defaults(func=run_hold)

    p = cs.add_parser("rebase", help="change the backbone: every contributor must recompute")
    p.add_argument("--backbone", required=True, help=BACKBONE_HELP)
    p.add_argument("--founding-expert", action="append", default=None, metavar="NAME=DIR")
    store_flags(p, required=True)
    operator_flag(p)
    ray_flags(p)
    p.set_defaults(func=run_rebase)


def settings_from_args(args) -> dict:
    """Coordinator settings from the flags; checked (one-line errors) before any actor exists."""
    from dume_dist.distributed.validation import check_settings

    settings = {**routing_settings(args), "temperature": args.temperature}
    if args.max_tokens_per_seq is not None:  # else the experts' limit, set at genesis
        settings["max_tokens_per_seq"] = args.max_tokens_per_seq
    check_settings(settings)
    return settings


def _existing_operator_secret(path: str) -> str | None:
    if os.environ.get("DUME_OPERATOR_CREDENTIAL"):
        return os.environ["DUME_OPERATOR_CREDENTIAL"].strip()
    if not Path(path).expanduser().is_file():
        return None
    return read_secret(path, "DUME_OPERATOR_CREDENTIAL", "operator credential")


def run_start(args) -> int:
    from dume_dist.distributed import genesis
    from dume_dist.distributed.cluster import connect, start_coordinator

    settings = settings_from_args(args)  # bad settings: an error before anything is written
    federated.check_serve_flags(args)  # so are bad API flags (the API is deployed last)
    options = parse_storage_options(args.storage_option)
    store = open_store(args)  # a bad URL fails here, before any actor exists
    founding = parse_experts(args.founding_expert) if args.founding_expert else {}
    cred_path = args.operator_credential_file or DEFAULT_OPERATOR_FILE
    existing = _existing_operator_secret(cred_path)
    # Genesis work (backbone build and upload) happens before any actor exists.
    record = None
    if not genesis.is_founded(store):
        record, settings = genesis.prepare(store, args.backbone, founding, settings)
    connect(args.address, args.namespace)
    resources = None
    if args.resource:
        import ray

        if ray.cluster_resources().get(args.resource, 0) <= 0:
            raise ValueError(f"no node of the Ray cluster offers resource {args.resource!r}")
        resources = {args.resource: 0.01}
    handle = start_coordinator(args.store, options, name=args.coordinator_name, namespace=args.namespace,
                               work_dir=args.work_dir, resources=resources)  # fmt: skip
    if record is None:
        status = call(handle, "status")
        result, secret = {"founded": False, "revision": status["revision"]}, None
    else:
        result, secret = genesis.found_with(handle, record, settings, existing, args.hold)
    if result["founded"]:
        if not existing:
            path = write_secret(cred_path, secret)
            print(f"operator credential written to {path} (keep it secret)")
        print(f"founded store {args.store} (registry revision {result['revision']})")
    else:
        print(
            f"store {args.store} already founded: coordinator resumed (registry revision {result['revision']})"
        )
    print(f"coordinator {args.coordinator_name!r} running in namespace {args.namespace!r}")
    federated.maybe_serve(args)
    return 0


def run_stop(args) -> int:
    from dume_dist.distributed.cluster import connect, stop_coordinator

    connect(args.address, args.namespace)
    if federated.stop_api():
        print("coordinator API stopped")
    stopped = stop_coordinator(args.coordinator_name, args.namespace)
    print(
        "coordinator stopped (its state stays in the store)"
        if stopped
        else "no coordinator running"
    )
    return 0


def run_publish(args) -> int:
    result = call(coordinator(args), "publish", operator_secret(args))
    print(f"latest version: {result['version'] or '(none: no contributions yet)'}")
    return 0


def run_hold(args) -> int:
    handle = coordinator(args)
    secret = operator_secret(args)
    result = call(handle, "set_hold", secret, not args.release)
    if args.release:
        published = call(handle, "publish", secret)
        print(f"publication released; latest version: {published['version'] or '(none)'}")
    else:
        print(f"publication held (registry revision {result['revision']})")
    return 0


def run_rebase(args) -> int:
    from dume_dist.distributed import genesis

    store = open_store(args)
    founding = parse_experts(args.founding_expert) if args.founding_expert else {}
    record = genesis.rebase_record(store, args.backbone, founding)
    result = call(coordinator(args), "rebase", operator_secret(args), record)
    if result["rebased"]:
        print(f"backbone is now {record['fingerprint'][:12]}; {result['stale_blobs']} statistics blobs are stale: "
              "every node must run `dume node join` again (hold publication to get one version with all)")  # fmt: skip
    else:
        print("the backbone is unchanged")
    return 0
