"""What the distributed commands share: the Ray, store and credential flags, reading and writing
secrets, and reaching the coordinator actor.

Secrets are read from files or the environment, never from the command line: the operator
credential from ``--operator-credential-file`` (default ``~/.dume/operator.credential``) or
``$DUME_OPERATOR_CREDENTIAL``; a node credential from ``--credential-file`` or
``$DUME_CREDENTIAL``. A credential file readable by group or others is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
from pathlib import Path

DEFAULT_OPERATOR_FILE = "~/.dume/operator.credential"


def ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or auto)"
    )
    p.add_argument("--namespace", default="dume", help="Ray namespace of the coordinator actor")
    p.add_argument(
        "--coordinator-name", default="dume-coordinator", help="name of the coordinator actor"
    )


def operator_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--operator-credential-file",
        default=None,
        help=f"file holding the operator credential (default $DUME_OPERATOR_CREDENTIAL, else {DEFAULT_OPERATOR_FILE})",
    )


def node_credential_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--credential-file",
        default=None,
        help="file holding this node's credential (default $DUME_CREDENTIAL)",
    )


def store_flags(p: argparse.ArgumentParser, required: bool) -> None:
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


def open_store(args, must_exist: bool = False):
    """The store of ``--store``; with ``must_exist`` (readers) a location where nothing exists
    at all (a mistyped path) is an error rather than an empty answer."""
    from dume_dist.store import ObjectStore

    store = ObjectStore(args.store, parse_storage_options(args.storage_option))
    if must_exist and not store.location_exists():
        raise ValueError(f"store {args.store} does not exist (nothing is there: mistyped?)")
    return store


# -- secrets ------------------------------------------------------------------------------------


def read_secret(path: str | None, env: str, what: str, default_path: str | None = None) -> str:
    if path is None and os.environ.get(env):
        secret = os.environ[env].strip()
        if not secret:
            raise ValueError(f"${env} holds only whitespace: it is not a {what}")
        _one_line(secret, f"${env}", what)
        return secret
    path = path or default_path
    if path is None:
        raise ValueError(f"no {what}: pass its file or set ${env}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"no {what}: {p} does not exist (or set ${env})")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise ValueError(
            f"{what} file {p} is readable by others (mode {mode:04o}): run `chmod 600 {p}`"
        )
    try:
        secret = p.read_text().strip()
    except UnicodeDecodeError:
        raise ValueError(f"{what} file {p} is not text: it holds no credential") from None
    if not secret:
        raise ValueError(f"{what} file {p} is empty")
    _one_line(secret, f"file {p}", what)
    return secret


def _one_line(secret: str, where: str, what: str) -> None:
    """A credential is one line: a file that also holds others (e.g. the whole output of
    `dume admin add-node` pasted into it) would only ever fail authentication."""
    if "\n" in secret or "\r" in secret:
        raise ValueError(f"{what} {where} holds more than one line: it must hold the credential alone")  # fmt: skip


def write_secret(path: str | Path, secret: str) -> Path:
    """Write ``secret`` to a file only its owner can read, whether or not the file existed
    (the mode of ``os.open`` applies only to a new file: an existing one is chmod-ed first)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # before any byte of the secret is written
        f.truncate(0)
        f.write(secret + "\n")
    return p


def reserve_secret_file(path: str | Path) -> tuple[Path, bool]:
    """Make sure a secret can be written to ``path`` *before* the operation that issues it (a
    registration, a rotation): a secret issued and then lost to an unwritable path would lock
    its node out. Returns the path and whether the file existed already (its content is left
    as it is: a credential rotated in place stays readable until it is replaced)."""
    p = Path(path).expanduser()
    existed = p.exists()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.close(fd)
    except OSError as exc:
        raise ValueError(f"cannot write a credential to {p}: {exc.strerror or exc}") from None
    return p, existed


@contextlib.contextmanager
def secret_destination(path: str | Path | None):
    """``with secret_destination(F):`` around the call that issues a secret: the file is made
    writable first, and removed again if it was new and the call failed."""
    if path is None:
        yield None
        return
    p, existed = reserve_secret_file(path)
    try:
        yield p
    except BaseException:
        if not existed:
            p.unlink(missing_ok=True)
        raise


def operator_secret(args) -> str:
    return read_secret(args.operator_credential_file, "DUME_OPERATOR_CREDENTIAL", "operator credential",
                       DEFAULT_OPERATOR_FILE)  # fmt: skip


def node_secret(args) -> str:
    return read_secret(args.credential_file, "DUME_CREDENTIAL", "node credential")


# -- the coordinator ------------------------------------------------------------------------------


def coordinator(args):
    from dume_dist.distributed.cluster import connect, get_coordinator

    connect(args.address, args.namespace)
    return get_coordinator(args.coordinator_name, args.namespace)
