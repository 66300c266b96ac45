"""The distributed commands: coordinator, node, admin, unlearn, versions, status, demo, and
``dume bench scaling`` (registered into ``dume bench`` by `register_bench`).

Who runs what:
  operator     coordinator start|stop|publish|hold|rebase, admin add-node, unlearn
  contributor  node join|leave (with the credential the operator issued)
  anyone       versions list|show|pull (read access to the store), status

Secrets are read from files or the environment, never from the command line:
the operator credential from ``--operator-credential-file`` (default
``~/.dume/operator.credential``) or ``$DUME_OPERATOR_CREDENTIAL``; a node credential from
``--credential-file`` or ``$DUME_CREDENTIAL``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dume_dist.cli.build import BACKBONE_HELP, ROUTING_PRESETS, add_routing_flags, parse_experts

DEFAULT_OPERATOR_FILE = "~/.dume/operator.credential"


# -- shared flags ---------------------------------------------------------------------------------


def _ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or auto)"
    )
    p.add_argument("--namespace", default="dume", help="Ray namespace of the coordinator actor")
    p.add_argument(
        "--coordinator-name", default="dume-coordinator", help="name of the coordinator actor"
    )


def _operator_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--operator-credential-file",
        default=None,
        help=f"file holding the operator credential (default $DUME_OPERATOR_CREDENTIAL, else {DEFAULT_OPERATOR_FILE})",
    )


def _node_credential_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--credential-file",
        default=None,
        help="file holding this node's credential (default $DUME_CREDENTIAL)",
    )


def _store_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--store",
        required=required,
        default=None,
        help="store URL: a directory, file://DIR or s3://bucket/prefix",
    )
    p.add_argument(
        "--storage-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)",
    )


def parse_storage_options(values: list[str] | None) -> dict:
    out = {}
    for value in values or []:
        key, sep, raw = value.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option expects KEY=VALUE, got {value!r}")
        out[key] = {"true": True, "false": False}.get(raw.lower(), raw)
    return out


def read_secret(path: str | None, env: str, what: str, default_path: str | None = None) -> str:
    if path is None and os.environ.get(env):
        return os.environ[env].strip()
    path = path or default_path
    if path is None:
        raise ValueError(f"no {what}: pass its file or set ${env}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"no {what}: {p} does not exist (or set ${env})")
    secret = p.read_text().strip()
    if not secret:
        raise ValueError(f"{what} file {p} is empty")
    return secret


def write_secret(path: str | Path, secret: str) -> Path:
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return p


def _operator_secret(args) -> str:
    return read_secret(args.operator_credential_file, "DUME_OPERATOR_CREDENTIAL", "operator credential",
                       DEFAULT_OPERATOR_FILE)  # fmt: skip


def _coordinator(args):
    from dume_dist.distributed.cluster import connect, get_coordinator

    connect(args.address, args.namespace)
    return get_coordinator(args.coordinator_name, args.namespace)


def _call(handle, method: str, *a):
    from dume_dist.distributed.cluster import get

    return get(getattr(handle, method).remote(*a))


# -- registration ---------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    _register_coordinator(sub)
    _register_node(sub)
    _register_admin(sub)
    _register_unlearn(sub)
    _register_versions(sub)
    _register_status(sub)
    _register_demo(sub)
    from dume_dist.cli import main as cli_main

    if "bench" not in cli_main.COMMAND_MODULES or not _module_exists("dume_dist.cli.bench"):
        bench = sub.add_parser("bench", help="benchmarks (results to JSON + markdown)")
        register_bench(bench.add_subparsers(dest="command2", required=True, metavar="BENCH"))


def _module_exists(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _routing_flags(p: argparse.ArgumentParser) -> None:
    add_routing_flags(
        p,
        routing_default="paper",
        routing_help="named routing setting (fixed at genesis): 'paper' (the default: token "
        "features, ridge, λ=1e-2, k=1), 'context' (prefix-mean features, lda, λ chosen on "
        "held-out statistics) or 'ngram' (sequence-level naive Bayes on hashed token bigrams, mu "
        "chosen on held-out statistics)",
        holdout_owner="node",
    )


def _routing_settings(args) -> dict:
    """The routing entries of coordinator settings (None: the preset's value)."""
    out = {"routing": args.routing, "features": args.features, "solver": args.solver,
           "lam": args.lam, "smoothing": args.smoothing, "holdout_fraction": args.holdout_fraction,
           "ngram_buckets": args.ngram_buckets, "min_weight": args.min_weight}  # fmt: skip
    return {k: v for k, v in out.items() if v is not None}


def _register_coordinator(sub) -> None:
    c = sub.add_parser("coordinator", help="operator: the coordinator actor on the Ray cluster")
    cs = c.add_subparsers(dest="command2", required=True, metavar="ACTION")

    p = cs.add_parser(
        "start", help="start (or find) the coordinator; found the store on first start"
    )
    _store_flags(p, required=True)
    p.add_argument("--backbone", default="average", help=BACKBONE_HELP)
    p.add_argument("--founding-expert", action="append", default=None, metavar="NAME=DIR",
                   help="a founding expert whose non-MLP weights the 'average' backbone averages (repeatable)")  # fmt: skip
    _routing_flags(p)
    p.add_argument("--temperature", type=float, default=1.0, help="router temperature T")
    p.add_argument("--top-k", type=int, default=None, help="experts per token k (default 1)")
    p.add_argument(
        "--max-tokens-per-seq",
        type=int,
        default=1024,
        help="leading tokens of each sequence in the statistics",
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
    _operator_flag(p)
    _ray_flags(p)
    p.set_defaults(func=run_coordinator_start)

    p = cs.add_parser("stop", help="stop the coordinator actor (its state stays in the store)")
    _ray_flags(p)
    p.set_defaults(func=run_coordinator_stop)

    p = cs.add_parser(
        "publish", help="publish a version now if contributions changed (even when held)"
    )
    _operator_flag(p)
    _ray_flags(p)
    p.set_defaults(func=run_coordinator_publish)

    p = cs.add_parser("hold", help="hold publication (or --release it, publishing what is pending)")
    p.add_argument(
        "--release", action="store_true", help="release the hold and publish pending changes"
    )
    _operator_flag(p)
    _ray_flags(p)
    p.set_defaults(func=run_coordinator_hold)

    p = cs.add_parser("rebase", help="change the backbone: every contributor must recompute")
    p.add_argument("--backbone", required=True, help=BACKBONE_HELP)
    p.add_argument("--founding-expert", action="append", default=None, metavar="NAME=DIR")
    _store_flags(p, required=True)
    _operator_flag(p)
    _ray_flags(p)
    p.set_defaults(func=run_coordinator_rebase)


def _register_node(sub) -> None:
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
    _node_credential_flag(p)
    _ray_flags(p)
    p.set_defaults(func=run_node_join)

    p = ns.add_parser("leave", help="withdraw this node's contribution (a new version without it)")
    p.add_argument("--name", required=True)
    p.add_argument("--domain", required=True)
    _node_credential_flag(p)
    _ray_flags(p)
    p.set_defaults(func=run_node_leave)


def _register_admin(sub) -> None:
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
    _operator_flag(p)
    _ray_flags(p)
    p.set_defaults(func=run_add_node)


def _register_unlearn(sub) -> None:
    p = sub.add_parser(
        "unlearn", help="operator: remove a node's statistics and expert, re-solve, publish"
    )
    p.add_argument("--node", required=True, help="the node to unlearn")
    p.add_argument("--reason", required=True, help="why (recorded in the registry)")
    p.add_argument(
        "--purge", action="store_true", help="also delete every earlier version that contained it"
    )
    _operator_flag(p)
    _ray_flags(p)
    p.set_defaults(func=run_unlearn)


def _register_versions(sub) -> None:
    v = sub.add_parser("versions", help="published model versions (reads the store)")
    vs = v.add_subparsers(dest="command2", required=True, metavar="ACTION")
    p = vs.add_parser("list", help="table of versions")
    _store_flags(p, required=True)
    p.add_argument("--all", action="store_true", help="include purged versions")
    p.set_defaults(func=run_versions_list)
    p = vs.add_parser("show", help="one version's manifest")
    p.add_argument("version")
    _store_flags(p, required=True)
    p.set_defaults(func=run_versions_show)
    p = vs.add_parser("pull", help="download a version (checksums verified) into DIR")
    p.add_argument("version")
    p.add_argument("dir")
    _store_flags(p, required=True)
    p.set_defaults(func=run_versions_pull)


def _register_status(sub) -> None:
    p = sub.add_parser("status", help="contributors, domains, tokens and versions")
    _store_flags(p, required=False)
    _ray_flags(p)
    p.set_defaults(func=run_status)


def _register_demo(sub) -> None:
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
        help="routing preset of the demo's coordinator (default: the demo's, 'ngram')",
    )
    p.set_defaults(func=run_demo)


def register_bench(kinds: argparse._SubParsersAction) -> None:
    """``dume bench scaling`` (called by `dume_dist.cli.bench` for its ``bench`` command)."""
    p = kinds.add_parser(
        "scaling", help="join / re-solve / unlearn times and bytes pushed, 2-32 contributors"
    )
    p.add_argument("--json", required=True, help="results file (a .md table is written beside it)")
    p.add_argument("--contributors", default="2,8,32", help="comma-separated contributor counts")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2048, help="statistics tokens per contributor")
    p.set_defaults(func=run_bench_scaling)


# -- handlers: operator ---------------------------------------------------------------------------


def _settings(args) -> dict:
    """Coordinator settings from the flags; checked (one-line errors) before any actor exists."""
    from dume_dist.distributed.coordinator import check_settings

    settings = {**_routing_settings(args), "temperature": args.temperature,
                "max_tokens_per_seq": args.max_tokens_per_seq}  # fmt: skip
    if args.top_k is not None:
        settings["top_k"] = args.top_k
    check_settings(settings)
    return settings


def run_coordinator_start(args) -> int:
    from dume_dist.distributed import genesis
    from dume_dist.distributed.cluster import connect, start_coordinator
    from dume_dist.store import ObjectStore

    settings = _settings(args)  # bad settings: an error before anything is written
    options = parse_storage_options(args.storage_option)
    store = ObjectStore(args.store, options)  # a bad URL fails here, before any actor exists
    founding = parse_experts(args.founding_expert) if args.founding_expert else {}
    cred_path = args.operator_credential_file or DEFAULT_OPERATOR_FILE
    existing = os.environ.get("DUME_OPERATOR_CREDENTIAL") or (
        Path(cred_path).expanduser().read_text().strip()
        if Path(cred_path).expanduser().is_file()
        else None
    )
    # Genesis work (backbone build and upload) happens before any actor exists.
    record = None if genesis.is_founded(store) else genesis.prepare(store, args.backbone, founding)
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
        status = _call(handle, "status")
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
    return 0


def run_coordinator_stop(args) -> int:
    from dume_dist.distributed.cluster import connect, stop_coordinator

    connect(args.address, args.namespace)
    stopped = stop_coordinator(args.coordinator_name, args.namespace)
    print(
        "coordinator stopped (its state stays in the store)"
        if stopped
        else "no coordinator running"
    )
    return 0


def run_coordinator_publish(args) -> int:
    result = _call(_coordinator(args), "publish", _operator_secret(args))
    print(f"latest version: {result['version'] or '(none: no contributions yet)'}")
    return 0


def run_coordinator_hold(args) -> int:
    handle = _coordinator(args)
    secret = _operator_secret(args)
    result = _call(handle, "set_hold", secret, not args.release)
    if args.release:
        published = _call(handle, "publish", secret)
        print(f"publication released; latest version: {published['version'] or '(none)'}")
    else:
        print(f"publication held (registry revision {result['revision']})")
    return 0


def run_coordinator_rebase(args) -> int:
    from dume_dist.distributed import genesis
    from dume_dist.store import ObjectStore

    store = ObjectStore(args.store, parse_storage_options(args.storage_option))
    founding = parse_experts(args.founding_expert) if args.founding_expert else {}
    record = genesis.rebase_record(store, args.backbone, founding)
    result = _call(_coordinator(args), "rebase", _operator_secret(args), record)
    if result["rebased"]:
        print(f"backbone is now {record['fingerprint'][:12]}; {result['stale_blobs']} statistics blobs are stale: "
              "every node must run `dume node join` again (hold publication to get one version with all)")  # fmt: skip
    else:
        print("the backbone is unchanged")
    return 0


def run_add_node(args) -> int:
    from dume_dist.distributed.genesis import issue_node_credential

    secret, hashed = issue_node_credential(args.name, args.domain)
    _call(_coordinator(args), "add_node", _operator_secret(args), args.name, args.domain, hashed)
    if args.credential_out:
        path = write_secret(args.credential_out, secret)
        print(f"node {args.name!r} ({args.domain}) registered; credential written to {path}")
    else:
        print(f"node {args.name!r} ({args.domain}) registered; its credential (shown once):")
        print(secret)
    return 0


def run_unlearn(args) -> int:
    result = _call(
        _coordinator(args), "unlearn", _operator_secret(args), args.node, args.reason, args.purge
    )
    affected = ", ".join(result["affected_versions"]) or "none"
    what = "purged" if args.purge else "marked contains_unlearned"
    print(
        f"unlearned {args.node!r}: its statistics and expert are deleted; latest version {result['version']}"
    )
    print(f"earlier versions that contained it ({what}): {affected}")
    if result["hold"]:
        print("publication is held: run `dume coordinator publish` to publish a version without it")
    return 0


# -- handlers: contributor ------------------------------------------------------------------------


def run_node_join(args) -> int:
    from dume_dist.distributed.cluster import launch_agent, run_join

    secret = read_secret(args.credential_file, "DUME_CREDENTIAL", "node credential")
    handle = _coordinator(args)
    data = [str(Path(p).resolve()) for p in args.data]
    agent = launch_agent(
        handle, args.name, args.domain, secret, node_id=args.node_id, cache_dir=args.cache_dir
    )
    kwargs = {"expert_dir": str(Path(args.expert).resolve()), "data": data, "workers": args.workers,
              "max_tokens": args.max_tokens, "batch_size": args.batch_size, "seq_len": args.seq_len}  # fmt: skip
    result = run_join(agent, kwargs, show_progress=not args.no_progress and sys.stderr.isatty())
    print_join(result)
    return 0


def print_join(result: dict) -> None:
    status = result["status"]
    extra = " (already counted: nothing added)" if status == "duplicate" else ""
    print(
        f"node {result['node']}: statistics {status}{extra}; latest version {result.get('version') or '(held)'}"
    )
    if "stats_bytes" in result:
        print(f"  pushed {result['stats_bytes']:,} B of statistics; expert MLPs {result['expert_bytes']:,} B "
              f"({'uploaded' if result['expert_uploaded'] else 'already registered'})")  # fmt: skip


def run_node_leave(args) -> int:
    secret = read_secret(args.credential_file, "DUME_CREDENTIAL", "node credential")
    result = _call(_coordinator(args), "leave", secret, args.name, args.domain)
    print(f"node {args.name!r} left; latest version {result['version'] or '(none)'}")
    return 0


# -- handlers: readers ----------------------------------------------------------------------------


def _version_store(args):
    from dume_dist.store import ObjectStore, VersionStore

    return VersionStore(ObjectStore(args.store, parse_storage_options(args.storage_option)))


def run_versions_list(args) -> int:
    from dume_dist.distributed.tables import print_versions

    vs = _version_store(args)
    print_versions(
        [_manifest_or_tombstone(vs, v) for v in vs.list_versions(include_purged=args.all)]
    )
    return 0


def _manifest_or_tombstone(vs, vid: str) -> dict:
    from dume_dist.store import StoreNotFound

    try:
        return vs.get_manifest(vid)
    except StoreNotFound:
        return {"version": vid, "purged": True}


def run_versions_show(args) -> int:
    import json

    manifest = _version_store(args).get_manifest(args.version)
    manifest.pop("files", None)
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return 0


def run_versions_pull(args) -> int:
    manifest = _version_store(args).pull(args.version, args.dir)
    print(
        f"pulled {args.version} into {args.dir} ({len(manifest['files'])} files, checksums verified)"
    )
    return 0


def run_status(args) -> int:
    from dume_dist.distributed.tables import print_status

    if args.store:
        from dume_dist.distributed.state import public_view
        from dume_dist.store import ObjectStore, RegistryStore

        state, rev = RegistryStore(
            ObjectStore(args.store, parse_storage_options(args.storage_option))
        ).load()
        status = {"store": args.store, "revision": rev, "registry": public_view(state)}
    else:
        status = _call(_coordinator(args), "status")
    print_status(status)
    return 0


# -- demo and bench -------------------------------------------------------------------------------


def run_demo(args) -> int:
    from dume_dist.distributed.auth import token_auth_for_a_new_cluster

    token_auth = token_auth_for_a_new_cluster()  # before Ray is imported
    from dume_dist.distributed.demo import run_demo as demo

    print(
        f"Ray token authentication: {'on (a fresh token for this cluster)' if token_auth else 'off'}"
    )

    settings = {"routing": args.routing} if args.routing else None
    demo(store=args.store, max_tokens=args.max_tokens, eval_tokens=args.eval_tokens,
         unlearn=args.unlearn, json_out=args.json, settings=settings)  # fmt: skip
    return 0


def run_bench_scaling(args) -> int:
    from dume_dist.distributed.auth import token_auth_for_a_new_cluster

    token_auth_for_a_new_cluster()  # before Ray is imported
    from dume_dist.bench.scaling import markdown_table, run_scaling_bench, write_results

    counts = [int(c) for c in args.contributors.split(",") if c.strip()]
    result = run_scaling_bench(counts, hidden_size=args.hidden_size, num_layers=args.layers,
                               intermediate_size=args.intermediate_size, tokens=args.tokens)  # fmt: skip
    md = write_results(result, args.json)
    print(markdown_table(result))
    print(f"wrote {args.json} and {md}")
    return 0
