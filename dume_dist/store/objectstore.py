"""ObjectStore: the single door to storage for the rest of the project.

Owns: resolving a store URL to a back end (local paths on `os`; `s3://`, `memory://`
and anything else fsspec speaks through fsspec), key validation, atomic writes,
conditional create (the one concurrency primitive that versions, marks and the
registry are built on), checksummed file and directory transfer, and turning
back-end failures into one-line `StoreError`s that name the URL.

Keys are '/'-separated paths relative to the store root: "versions/v3/manifest.json".

URLs:
  /abs/path, rel/path, file:///abs/path    local directory (created on first write)
  s3://bucket/prefix                       s3fs; endpoint_url/key/secret from
                                           `storage_options`, else the usual AWS_* env
                                           (AWS_ENDPOINT_URL included)
  memory://name                            fsspec's in-process memory store (tests)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
from typing import Any

import fsspec

from .backends import (
    TMP_MARK,
    FsspecBackend,
    LocalBackend,
    is_missing_bucket,
    protocols,
    tmp_path_beside,
)
from .errors import ChecksumError, StoreConflict, StoreError, StoreNotFound, one_line


def _remote_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError as AiohttpClientError

        errors.append(AiohttpClientError)
    return tuple(errors)


_REMOTE_ERRORS = _remote_errors()


def encode_json(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no NaN); ValueError if `obj` is not JSON."""
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"not JSON-serialisable: {e}") from e


def _as_bytes(data) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise ValueError(f"expected bytes, got {type(data).__name__}")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # no newline, NUL, ... in a key


def check_key(key: str, *, prefix: bool = False) -> str:
    """Validate a store key (or, with `prefix`, a directory prefix; "" is the root)."""
    if not isinstance(key, str):
        raise ValueError(f"store key must be a str, got {type(key).__name__}")
    if prefix:
        key = key.rstrip("/")
        if not key:
            return ""
    for part in key.split("/"):
        if (
            part in ("", ".", "..")
            or "\\" in part
            or part.startswith(TMP_MARK)
            or _CONTROL.search(part)
        ):
            raise ValueError(f"invalid store key {key!r}")
    return key


class ObjectStore:
    """Bytes and JSON under string keys, with atomic writes and conditional create."""

    def __init__(self, url: str, storage_options: dict | None = None, *, check: bool = True):
        if not url:
            raise ValueError("store URL is empty")
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.backend = _open_backend(url, dict(self.storage_options))
        if check:
            self.check()

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def __reduce__(self):
        # Sent to another process (a Ray actor), a store reopens with a fresh client, a local
        # one at the directory it names here (that process's working directory is another).
        return _reopen, (absolute_url(self.url), self.storage_options)

    # -- errors -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _translate(self, what: str):
        try:
            yield
        except StoreError:
            raise
        except FileNotFoundError as e:
            if is_missing_bucket(e):
                raise StoreError(f"{self.url}: cannot {what}: bucket does not exist") from e
            raise StoreNotFound(f"{self.url}: cannot {what}: not found") from e
        except PermissionError as e:
            raise StoreError(
                f"{self.url}: cannot {what}: access denied, check credentials ({one_line(e)})"
            ) from e
        except NotImplementedError as e:
            raise StoreError(f"{self.url}: cannot {what}: {e}") from e
        except (OSError, *_REMOTE_ERRORS) as e:
            raise StoreError(f"{self.url}: cannot {what}: {one_line(e)}") from e

    def check(self) -> None:
        """Fail with one clear `StoreError` if the store is unreachable or its bucket missing."""
        backend = self.backend
        if isinstance(backend, LocalBackend):
            if os.path.exists(backend.root) and not os.path.isdir(backend.root):
                raise StoreError(f"{self.url}: {backend.root} exists and is not a directory")
            return
        if "s3" not in protocols(backend.fs):
            with self._translate("reach the store"):
                backend.fs.exists(backend.root)
            return
        endpoint = getattr(backend.fs, "endpoint_url", None)
        if endpoint:  # fail fast: botocore and s3fs would retry a dead endpoint for ~10 s
            _probe_endpoint(self.url, endpoint)
        bucket = backend.root.split("/", 1)[0]
        try:
            with self._translate("reach the store"):
                backend.fs.call_s3("head_bucket", Bucket=bucket)
        except StoreNotFound as e:
            raise StoreError(f"{self.url}: bucket {bucket!r} does not exist") from e

    def location_exists(self) -> bool:
        """Whether anything is at the store's location: a local directory that exists, a remote
        prefix with objects under it (True when it cannot be listed: a reader may see only
        ``public/``). A mistyped store path is told apart from a founded, empty store."""
        if isinstance(self.backend, LocalBackend):
            return os.path.isdir(self.backend.root)
        try:
            return bool(self.children(""))
        except StoreError:
            return True

    # -- bytes ------------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        key = check_key(key)
        with self._translate(f"read {key}"):
            return self.backend.read(key)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Create or replace `key`; readers see the old or the new bytes, never a mix."""
        key = check_key(key)
        with self._translate(f"write {key}"):
            self.backend.write(key, _as_bytes(data))

    def create_bytes(self, key: str, data: bytes) -> None:
        """Create `key` only if it does not exist; else raise `StoreConflict`.

        Atomic: of two writers racing for one key exactly one succeeds. A store that
        cannot guarantee this fails with `StoreError` instead of writing.
        """
        key = check_key(key)
        with self._translate(f"create {key}"):
            try:
                self.backend.create(key, _as_bytes(data))
            except FileExistsError as e:
                raise StoreConflict(f"{self.url}: {key} already exists") from e

    def exists(self, key: str) -> bool:
        key = check_key(key)
        with self._translate(f"look up {key}"):
            return self.backend.exists(key)

    def list(self, prefix: str = "") -> list[str]:
        """Every key under the directory `prefix`, recursively, sorted."""
        prefix = check_key(prefix, prefix=True)
        with self._translate(f"list {prefix or '/'}"):
            return self.backend.find(prefix)

    def children(self, prefix: str = "") -> list[str]:
        """Names directly under `prefix` (files and sub-directories), sorted."""
        prefix = check_key(prefix, prefix=True)
        with self._translate(f"list {prefix or '/'}"):
            return self.backend.children(prefix)

    def delete(self, key: str, *, missing_ok: bool = False) -> None:
        key = check_key(key)
        try:
            with self._translate(f"delete {key}"):
                self.backend.delete(key)
        except StoreNotFound:
            if not missing_ok:
                raise

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under `prefix` (no error if there is none)."""
        prefix = check_key(prefix, prefix=True)
        if not prefix:
            raise ValueError("refusing to delete the whole store")
        with self._translate(f"delete {prefix}/"):
            self.backend.delete_tree(prefix)

    # -- JSON -------------------------------------------------------------------------

    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise StoreError(f"{self.url}: {key} is not valid JSON: {one_line(e)}") from e

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, encode_json(obj))

    def create_json(self, key: str, obj: Any) -> None:
        self.create_bytes(key, encode_json(obj))

    # -- files and directories ----------------------------------------------------------

    def put_file(self, local_path: str, key: str) -> dict:
        """Upload one local file; return its `{"sha256", "size"}`."""
        key = check_key(key)
        with self._translate(f"upload {local_path} to {key}"):
            sha256, size = self.backend.upload(local_path, key)
        return {"sha256": sha256, "size": size}

    def put_range(self, local_path: str, offset: int, size: int, key: str) -> dict:
        """Upload ``size`` bytes at ``offset`` of a local file as ``key``; their sha256 and size."""
        key = check_key(key)
        with self._translate(f"upload {local_path} to {key}"):
            sha256, got = self.backend.upload_range(local_path, offset, size, key)
        if got != size:
            raise StoreError(f"{local_path} is shorter than expected ({got} of {size} bytes)")
        return {"sha256": sha256, "size": got}

    def get_file(self, key: str, local_path: str, expected: dict | None = None) -> dict:
        """Download `key` to `local_path` atomically, verifying `expected` {"sha256", "size"}.

        On a mismatch `ChecksumError` is raised and `local_path` is left untouched.
        """
        key = check_key(key)
        local_path = os.path.abspath(local_path)
        tmp = tmp_path_beside(local_path)
        try:
            with self._translate(f"download {key}"):
                sha256, size = self.backend.download(key, tmp)
            got = {"sha256": sha256, "size": size}
            if expected is not None and got != {k: expected[k] for k in ("sha256", "size")}:
                raise ChecksumError(
                    f"{self.url}: {key} is corrupt: sha256 {sha256[:16]}… size {size}, "
                    f"expected sha256 {expected['sha256'][:16]}… size {expected['size']}"
                )
            os.replace(tmp, local_path)
            return got
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def copy_to(self, key: str, dst, expected: dict) -> None:
        """Append the object at ``key`` to the open file ``dst``, streamed, checking its sha256 and
        size against ``expected``; ChecksumError (nothing more appended) on a mismatch."""
        key = check_key(key)
        h, size = hashlib.sha256(), 0
        with self._translate(f"read {key}"), self.backend.open_read(key) as src:
            while data := src.read(8 << 20):
                h.update(data)
                size += len(data)
                if size > expected["size"]:
                    break
                dst.write(data)
        if size != expected["size"] or h.hexdigest() != expected["sha256"]:
            raise ChecksumError(
                f"{self.url}: {key} is corrupt: sha256 {h.hexdigest()[:16]}… size {size}, "
                f"expected sha256 {expected['sha256'][:16]}… size {expected['size']}"
            )

    def link_to(self, key: str, local_path: str) -> bool:
        """Hard-link ``key`` to ``local_path`` on a local store; False where not possible."""
        key = check_key(key)
        with self._translate(f"link {key}"):
            return self.backend.link(key, local_path)

    def put_dir(self, local_dir: str, prefix: str, exclude: tuple[str, ...] = ()) -> dict:
        """Upload every file under `local_dir`; return `{relpath: {"sha256", "size"}}`."""
        prefix = check_key(prefix, prefix=True)
        if not os.path.isdir(local_dir):
            raise ValueError(f"not a directory: {local_dir}")
        files = {}
        for rel in local_files(local_dir):
            if rel not in exclude:
                key = f"{prefix}/{rel}" if prefix else rel
                files[rel] = self.put_file(os.path.join(local_dir, *rel.split("/")), key)
        return files

    def get_dir(
        self, prefix: str, local_dir: str, files: dict, extra: dict[str, bytes] | None = None
    ) -> None:
        """Download `files` ({relpath: {"sha256", "size"}}) under `prefix` into `local_dir`.

        Everything lands in a temp dir beside `local_dir`, is verified, and is renamed
        into place only at the end: on any error nothing is left at `local_dir`.
        `extra` are further small files ({relpath: bytes}) to write into the directory.
        """
        prefix = check_key(prefix, prefix=True)
        local_dir, tmp = staging_dir(local_dir)
        try:
            for rel, entry in sorted(files.items()):
                dest = os.path.join(tmp, *check_key(rel).split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                self.get_file(f"{prefix}/{rel}" if prefix else rel, dest, expected=entry)
            for rel, data in (extra or {}).items():
                with open(os.path.join(tmp, *check_key(rel).split("/")), "wb") as f:
                    f.write(data)
            os.rename(tmp, local_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def absolute_url(url: str) -> str:
    """``url`` with a local directory made absolute here (``~`` expanded); other URLs as they
    are. What another process must be given: a Ray actor runs in its cluster's working
    directory, not in the one of the command that started it, so ``./store`` would be another
    directory there."""
    if not isinstance(url, str) or not url:
        return url
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url))
    protocol, rest = url.split("://", 1)
    if protocol in ("file", "local"):
        path = os.path.abspath(os.path.expanduser(file_url_path(rest)))
        return f"{protocol}://{urllib.parse.quote(path)}"
    return url


def file_url_path(rest: str) -> str:
    """The local path of a ``file://`` URL (what follows ``://``): percent-encoded characters
    decoded (``my%20store`` is ``my store``), an empty or ``localhost`` host dropped."""
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    return urllib.parse.unquote(rest)


def staging_dir(local_dir: str) -> tuple[str, str]:
    """For a download into the new directory ``local_dir``: its absolute path and a temp dir
    beside it (renamed into place at the end). A destination that exists, or that cannot be
    made, is a one-line ValueError."""
    local_dir = os.path.abspath(local_dir)
    if os.path.lexists(local_dir):
        raise ValueError(f"destination already exists: {local_dir}")
    parent = os.path.dirname(local_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{TMP_MARK}{os.path.basename(local_dir)}-", dir=parent)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and e.filename != local_dir else ""
        raise ValueError(f"cannot create {local_dir}: {e.strerror or one_line(e)}{where}") from e
    return local_dir, tmp


def _reopen(url: str, storage_options: dict) -> ObjectStore:
    return ObjectStore(url, storage_options, check=False)


def local_files(local_dir: str) -> list[str]:
    """Relative '/'-paths of every file under `local_dir` (symlinks to files included)."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(local_dir):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, local_dir).replace(os.sep, "/")
        for name in filenames:
            rels.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    return sorted(rels)


def _probe_endpoint(url: str, endpoint: str, timeout_s: float = 5.0) -> None:
    parsed = urllib.parse.urlsplit(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise StoreError(f"{url}: cannot connect to endpoint {endpoint}: {one_line(e)}") from e


def _open_backend(url: str, options: dict):
    if "://" not in url:
        return LocalBackend(url)
    protocol, rest = url.split("://", 1)
    if protocol in ("file", "local"):
        return LocalBackend(file_url_path(rest))
    if protocol in ("s3", "s3a"):
        options = _s3_options(options)
    fs, root = fsspec.core.url_to_fs(url, **options)
    return FsspecBackend(fs, root)


def _s3_options(options: dict) -> dict:
    # A fresh, uncached client: two stores (two coordinators) must see each other's writes.
    options.setdefault("skip_instance_cache", True)
    options.setdefault("use_listings_cache", False)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = options.get("client_kwargs") or {}
    if endpoint and "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
        options["endpoint_url"] = endpoint
    return options
