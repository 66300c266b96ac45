"""`dume versions list|show|pull`: published versions, read from the store (anyone with read
access to its public prefix); `dume versions gc|migrate` for store writers."""

from __future__ import annotations

import json
import sys

from dume_dist.cli.shared import open_store, store_flags


def register(sub) -> None:
    v = sub.add_parser("versions", help="published model versions (reads the store)")
    vs = v.add_subparsers(dest="command2", required=True, metavar="ACTION")
    p = vs.add_parser("list", help="table of versions")
    store_flags(p, required=True)
    p.add_argument("--all", action="store_true", help="include purged versions")
    p.set_defaults(func=run_list)
    p = vs.add_parser("show", help="one version's manifest")
    p.add_argument("version")
    store_flags(p, required=True)
    p.set_defaults(func=run_show)
    p = vs.add_parser("pull", help="download a version (checksums verified) into DIR")
    p.add_argument("version")
    p.add_argument("dir")
    store_flags(p, required=True)
    p.set_defaults(func=run_pull)
    p = vs.add_parser("gc", help="delete the chunks no kept version references (store writers)")
    store_flags(p, required=True)
    p.set_defaults(func=run_gc)
    p = vs.add_parser("migrate", help="move versions stored whole (older stores) to shared chunks")
    store_flags(p, required=True)
    p.set_defaults(func=run_migrate)


def _version_store(args, must_exist: bool = True):
    from dume_dist.store import VersionStore, reader_layout

    store = open_store(args, must_exist)
    return VersionStore(store, reader_layout(store).versions)


def manifest_or_note(vs, vid: str) -> dict:
    """The version's manifest; a purged version's tombstone; for a version whose manifest
    cannot be read, a note saying why (one bad version never hides the others)."""
    from dume_dist.store import StoreError, StoreNotFound

    try:
        return vs.get_manifest(vid)
    except StoreNotFound:
        return {"version": vid, "purged": True}
    except StoreError as exc:
        return {"version": vid, "unreadable": " ".join(str(exc).split())}


def run_list(args) -> int:
    from dume_dist.distributed.tables import print_versions

    vs = _version_store(args)
    manifests = [manifest_or_note(vs, v) for v in vs.list_versions(include_purged=args.all)]
    print_versions(manifests)
    for m in manifests:
        if "unreadable" in m:
            print(f"version {m['version']} skipped: {m['unreadable']}", file=sys.stderr)
    return 0


def run_show(args) -> int:
    manifest = _version_store(args).get_manifest(args.version)
    manifest.pop("files", None)
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return 0


def run_pull(args) -> int:
    manifest = _version_store(args).pull(args.version, args.dir)
    print(
        f"pulled {args.version} into {args.dir} ({len(manifest['files'])} files, checksums verified)"
    )
    return 0


def run_gc(args) -> int:
    result = _version_store(args, must_exist=False).collect_garbage()  # (nothing: a no-op)
    print(f"kept {result['kept']} chunks, deleted {result['deleted']}")
    return 0


def run_migrate(args) -> int:
    done = _version_store(args).migrate()
    print(f"migrated {', '.join(done) if done else 'nothing (every version uses chunks)'}")
    return 0
