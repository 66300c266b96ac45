"""The federated side of the distributed commands: the coordinator's HTTP API and contributors
outside the operator's cluster (docs/distributed.md, "Federated deployment").

  operator     coordinator start --api-port P [--tls-cert C --tls-key K]   serve the API
               admin rotate-credential --name N                            new credential, same contribution
  contributor  node join|leave|status|rotate-credential --coordinator-url URL [--ca-cert PEM]

A contributor with ``--coordinator-url`` needs only its credential: its agent runs on its own
Ray instance (``--address`` of one it runs, else a local one started for the join, with a
fresh token) and reaches the coordinator over HTTPS, every request signed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP API for contributors outside the cluster")
    g.add_argument("--api-port", type=int, default=None,
                   help="serve the coordinator's HTTP API (Ray Serve) on this port")  # fmt: skip
    g.add_argument("--api-host", default="127.0.0.1",
                   help="address the API binds (0.0.0.0 behind a Kubernetes Service)")  # fmt: skip
    g.add_argument("--tls-cert", default=None, help="PEM certificate of the API (HTTPS)")
    g.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    g.add_argument("--api-upload-dir", default=None,
                   help="where unfinished uploads are staged (default: a temp dir on the head)")  # fmt: skip
    g.add_argument("--trust-forwarded-for", action="store_true",
                   help="throttle by X-Forwarded-For (only behind an ingress that sets it)")  # fmt: skip
    g.add_argument("--max-auth-failures", type=int, default=10,
                   help="failed authentications per client address per minute before it is refused")  # fmt: skip
    g.add_argument("--max-auth-failures-per-node", type=int, default=20,
                   help="failed authentications naming one node per minute before it is refused")  # fmt: skip


def check_serve_flags(args) -> None:
    """The API flags, checked before `coordinator start` does anything (one-line errors)."""
    if args.api_port is None:
        if args.tls_cert or args.tls_key:
            raise ValueError("--tls-cert/--tls-key need --api-port")
        return
    if not 1 <= args.api_port <= 65535:
        raise ValueError(f"--api-port must be a TCP port (1-65535), got {args.api_port}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path} does not exist")
    if args.max_auth_failures < 1 or args.max_auth_failures_per_node < 1:
        raise ValueError("--max-auth-failures and --max-auth-failures-per-node must be >= 1")


def maybe_serve(args) -> None:
    """Deploy the API after `coordinator start` founded or resumed the store."""
    check_serve_flags(args)
    if args.api_port is None:
        return
    from dume_dist.distributed.api import ApiLimits, serve_api

    limits = ApiLimits(failures_per_address=args.max_auth_failures,
                       failures_per_node=args.max_auth_failures_per_node)  # fmt: skip
    url = serve_api(args.coordinator_name, args.namespace, host=args.api_host, port=args.api_port,
                    tls_cert=args.tls_cert, tls_key=args.tls_key, limits=limits,
                    upload_dir=args.api_upload_dir, trust_forwarded_for=args.trust_forwarded_for)  # fmt: skip
    print(f"coordinator API serving at {url}" + ("" if args.tls_cert else " (plain HTTP)"))


def stop_api() -> bool:
    """Delete the API's Serve application if one runs on the connected cluster."""
    import ray

    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    except ValueError:
        return False
    from ray import serve

    from dume_dist.distributed.api import APP_NAME

    serve.delete(APP_NAME)
    return True


def add_url_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator-url", default=None,
                   help="the coordinator's HTTP API (federated: no Ray cluster token needed)")  # fmt: skip
    p.add_argument("--ca-cert", default=None,
                   help="PEM file of the CA (or certificate) the API's TLS certificate is checked against")  # fmt: skip


def transport(args, secret: str):
    from dume_dist.distributed.client import HttpTransport

    if args.ca_cert and not Path(args.ca_cert).is_file():
        raise ValueError(f"--ca-cert {args.ca_cert} does not exist")
    return HttpTransport(args.coordinator_url, args.name, args.domain, secret, ca_cert=args.ca_cert)


@contextlib.contextmanager
def own_ray(args, secret: str):
    """The contributor's own Ray for a join (``--address`` if given, else a local instance with
    its own GCS and token, stopped afterwards); yields the HTTP transport its agent uses."""
    from dume_dist.distributed.auth import token_auth_for_a_new_cluster

    own = args.address is None and not os.environ.get("RAY_ADDRESS")
    if own:
        token_auth_for_a_new_cluster()  # before Ray is imported
    from dume_dist.distributed import cluster

    link = transport(args, secret)
    link.node_info()  # fails fast (wrong URL, certificate, credential) before Ray starts
    if own:
        local = cluster.start_local_instance(namespace=args.namespace)
    else:
        cluster.connect(args.address, args.namespace)
    try:
        yield link
    finally:
        if own:
            local.shutdown()


def print_sent(result: dict) -> None:
    sent = result.get("sent_bytes") or {}
    if sent:
        parts = ", ".join(f"{kind} {n:,} B" for kind, n in sent.items())
        print(f"  sent to the coordinator: {parts}")


def run_node_leave_http(args, secret: str) -> dict:
    return transport(args, secret).leave()


def register_node_actions(ns, credential_flag) -> None:
    """``node status`` and ``node rotate-credential`` (HTTP API)."""
    p = ns.add_parser("status", help="this node's state and the versions it is in (HTTP API)")
    _identity(p, credential_flag)
    p.set_defaults(func=run_node_status)
    p = ns.add_parser("rotate-credential",
                      help="replace this node's credential (its contribution is kept)")  # fmt: skip
    _identity(p, credential_flag)
    p.add_argument("--credential-out", required=True,
                   help="where the new credential is written (0600); the old one stops working")  # fmt: skip
    p.set_defaults(func=run_node_rotate)


def _identity(p, credential_flag) -> None:
    p.add_argument("--name", required=True)
    p.add_argument("--domain", required=True)
    add_url_flags(p)
    credential_flag(p)


def _node_secret(args) -> str:
    from dume_dist.cli.shared import node_secret

    if not args.coordinator_url:
        raise ValueError("--coordinator-url is required")
    return node_secret(args)


def run_node_status(args) -> int:
    out = transport(args, _node_secret(args)).status()
    versions = [v["version"] for v in out["versions"] if v["includes_you"]]
    print(f"node {args.name}: {out['state']}; {len(out['submissions'])} statistics submissions; "
          f"latest version {out['latest'] or '(none)'}; in versions: {', '.join(versions) or 'none'}")  # fmt: skip
    return 0


def run_node_rotate(args) -> int:
    from dume_dist.cli.shared import secret_destination, write_secret
    from dume_dist.store import new_secret

    link = transport(args, _node_secret(args))
    new = new_secret()
    with secret_destination(args.credential_out):  # writable before the old one is revoked
        link.rotate(new)
    path = write_secret(args.credential_out, new)
    print(
        f"node {args.name}: credential rotated; the new one is in {path} (the old one is revoked)"
    )
    return 0


def register_admin_actions(as_, operator_flag, ray_flags) -> None:
    p = as_.add_parser("rotate-credential",
                       help="issue a node a new credential (the old one is revoked; its contribution is kept)")  # fmt: skip
    p.add_argument("--name", required=True)
    p.add_argument("--credential-out", default=None,
                   help="write the new credential here (0600) instead of printing it")  # fmt: skip
    operator_flag(p)
    ray_flags(p)
    p.set_defaults(func=run_admin_rotate)


def run_admin_rotate(args) -> int:
    from dume_dist.cli.shared import coordinator, operator_secret, secret_destination, write_secret
    from dume_dist.distributed.calls import call
    from dume_dist.distributed.genesis import node_credential_record
    from dume_dist.store import new_secret

    op = operator_secret(args)
    handle = coordinator(args)
    record = call(handle, "status")["registry"]["nodes"].get(args.name)
    if record is None:
        raise ValueError(f"unknown node {args.name!r}")
    secret = new_secret()
    hashed, key = node_credential_record(args.name, record["domain"], secret)
    with secret_destination(args.credential_out):  # writable before the old one is revoked
        call(handle, "rotate_credential", op, args.name, hashed, key)
    if args.credential_out:
        print(f"node {args.name!r}: credential rotated; written to {write_secret(args.credential_out, secret)}")  # fmt: skip
    else:
        print(f"node {args.name!r}: credential rotated; the new credential (shown once):")
        print(secret)
    return 0
