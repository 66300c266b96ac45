"""Storage back ends behind `ObjectStore`: local disk on plain `os`, the rest via fsspec.

Both expose the same small interface on '/'-separated keys relative to a root:
`read`, `write` (atomic replace), `create` (atomic, exclusive; raises
`FileExistsError`), `exists`, `find`, `children`, `delete`, `delete_tree`,
`upload`, `download`. `upload`/`download` return `(sha256_hex, size)` of the
bytes moved, hashed in chunks (a model shard is never held in memory whole).

Backend errors propagate unchanged (`OSError` subclasses, botocore errors);
`ObjectStore` turns them into `StoreError`s.
"""

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import uuid

from dume_dist.core.digest import file_sha256_size

CHUNK_BYTES = 8 * 2**20
TMP_MARK = ".dume-tmp-"  # prefix of in-flight local temp files; never listed as keys


def is_missing_bucket(error: BaseException) -> bool:
    """s3fs reports a missing bucket as FileNotFoundError, like a missing key."""
    return "specified bucket does not exist" in str(error) or "NoSuchBucket" in str(error)


def copy_stream(src, dst) -> tuple[str, int]:
    """Copy file object `src` to `dst` in chunks; return (sha256 hex, bytes copied)."""
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(CHUNK_BYTES):
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _remove_if_exists(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def tmp_path_beside(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f"{TMP_MARK}{uuid.uuid4().hex[:12]}-{name}")


def _write_durably(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class LocalBackend:
    """A directory on local disk. Writes go to a temp file that is then renamed or linked."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))

    def path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/")) if key else self.root

    def read(self, key: str) -> bytes:
        with open(self.path(key), "rb") as f:
            return f.read()

    def write(self, key: str, data: bytes) -> None:
        final = self.path(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tmp_path_beside(final)
        try:
            _write_durably(tmp, data)
            os.replace(tmp, final)
        finally:
            _remove_if_exists(tmp)

    def create(self, key: str, data: bytes) -> None:
        # link(2) fails with EEXIST atomically, and readers never see a partial file.
        final = self.path(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tmp_path_beside(final)
        try:
            _write_durably(tmp, data)
            os.link(tmp, final)
        finally:
            _remove_if_exists(tmp)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self.path(key))

    def find(self, prefix: str) -> list[str]:
        top = self.path(prefix)
        keys = []
        for dirpath, _, filenames in os.walk(top):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in filenames:
                if not name.startswith(TMP_MARK):
                    keys.append(name if rel == "." else f"{rel}/{name}")
        return sorted(keys)

    def children(self, prefix: str) -> list[str]:
        try:
            names = os.listdir(self.path(prefix))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in names if not n.startswith(TMP_MARK))

    def delete(self, key: str) -> None:
        os.unlink(self.path(key))

    def delete_tree(self, prefix: str) -> None:
        top = self.path(prefix)
        if os.path.isdir(top):
            shutil.rmtree(top)

    def upload(self, local_path: str, key: str) -> tuple[str, int]:
        return self._write_atomic(key, lambda src: src, local_path, 0)

    def download(self, key: str, local_path: str) -> tuple[str, int]:
        with open(self.path(key), "rb") as src, open(local_path, "wb") as dst:
            return copy_stream(src, dst)

    def open_read(self, key: str):
        return open(self.path(key), "rb")

    def upload_range(self, local_path: str, offset: int, size: int, key: str) -> tuple[str, int]:
        return self._write_atomic(key, lambda src: _Limited(src, size), local_path, offset)

    def _write_atomic(self, key: str, view, local_path: str, offset: int) -> tuple[str, int]:
        """Copy ``view(local file from offset)`` to ``key`` through a temporary file beside it,
        synced, then renamed into place: a reader sees the whole object or none."""
        final = self.path(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tmp_path_beside(final)
        try:
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                src.seek(offset)
                result = copy_stream(view(src), dst)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, final)
        finally:
            _remove_if_exists(tmp)
        return result

    def link(self, key: str, local_path: str) -> bool:
        """Hard-link the object at ``key`` to ``local_path``; False where not possible."""
        try:
            os.link(self.path(key), local_path)
            return True
        except OSError:
            return False


class FsspecBackend:
    """Any fsspec filesystem (s3, memory, gcs, ...) rooted at `root` (a path in `fs`).

    Exclusive create uses fsspec's `mode="create"` (S3: `If-None-Match: *`). Some
    S3-compatible servers ignore that header; the first `create` therefore probes
    that a second create of the same key really fails, and refuses to go on if not.
    """

    _memory_lock = threading.Lock()
    _verified_stores: set[tuple] = set()  # (protocols, endpoint, bucket) known to honour create

    def __init__(self, fs, root: str):
        self.fs = fs
        self.root = root.rstrip("/")
        self.is_memory = "memory" in protocols(fs)
        self._identity = (
            protocols(fs),
            getattr(fs, "endpoint_url", None),
            self.root.split("/")[0],
        )

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def key_of(self, path: str) -> str:
        path = self.fs._strip_protocol(path)
        assert path.startswith(self.root + "/"), (path, self.root)
        return path[len(self.root) + 1 :]

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(key), data)  # one PUT: atomic on S3

    def create(self, key: str, data: bytes) -> None:
        if not self.is_memory and self._identity not in self._verified_stores:
            self._verify_conditional_create()
        if self.is_memory:  # memory's exists-check and insert are not atomic across threads
            with self._memory_lock:
                self.fs.pipe_file(self.path(key), data, mode="create")
        else:
            self.fs.pipe_file(self.path(key), data, mode="create")

    def _verify_conditional_create(self) -> None:
        probe = f"_dume_probe/{uuid.uuid4().hex}"
        self.fs.pipe_file(self.path(probe), b"1", mode="create")
        try:
            self.fs.pipe_file(self.path(probe), b"2", mode="create")
        except FileExistsError:
            self._verified_stores.add(self._identity)
            return
        finally:
            self.fs.rm_file(self.path(probe))
        raise NotImplementedError(
            "the store ignores conditional create (If-None-Match: *); "
            "concurrent writers could corrupt it, refusing to write"
        )

    def exists(self, key: str) -> bool:
        try:
            return self.fs.info(self.path(key))["type"] == "file"
        except FileNotFoundError:
            return False

    def find(self, prefix: str) -> list[str]:
        try:
            paths = self.fs.find(self.path(prefix))
        except FileNotFoundError as e:
            if is_missing_bucket(e):
                raise
            return []
        return sorted(self.key_of(p) for p in paths)

    def children(self, prefix: str) -> list[str]:
        try:
            paths = self.fs.ls(self.path(prefix), detail=False)
        except FileNotFoundError as e:
            if is_missing_bucket(e):
                raise
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in paths)

    def delete(self, key: str) -> None:
        self.fs.rm_file(self.path(key))

    def delete_tree(self, prefix: str) -> None:
        paths = [self.path(k) for k in self.find(prefix)]
        if paths:
            self.fs.rm(paths)

    def upload(self, local_path: str, key: str) -> tuple[str, int]:
        # Hash first, then let fsspec move the bytes. s3fs: a small file is one PUT, a
        # large one a multipart upload that is aborted on error and otherwise becomes
        # visible only on completion, so readers never see a partial object.
        result = file_sha256_size(local_path)
        self.fs.put_file(local_path, self.path(key))
        return result

    def download(self, key: str, local_path: str) -> tuple[str, int]:
        self.fs.get_file(self.path(key), local_path)
        return file_sha256_size(local_path)

    def open_read(self, key: str):
        return self.fs.open(self.path(key), "rb")

    def upload_range(self, local_path: str, offset: int, size: int, key: str) -> tuple[str, int]:
        # Through a local temp file: fsspec uploads files (multipart for large ones).
        fd, tmp = tempfile.mkstemp(prefix=TMP_MARK)
        os.close(fd)
        try:
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                src.seek(offset)
                copy_stream(_Limited(src, size), dst)
            return self.upload(tmp, key)
        finally:
            _remove_if_exists(tmp)

    def link(self, key: str, local_path: str) -> bool:
        return False


class _Limited:
    """The next ``size`` bytes of a file object."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def read(self, n: int) -> bytes:
        data = self.f.read(min(n, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data


def protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
