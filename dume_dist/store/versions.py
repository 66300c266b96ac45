"""VersionStore: immutable, numbered model versions whose files share content-addressed chunks
(DESIGN §5).

Layout, everything under one public prefix (default ``versions/``; readers need nothing else):

  versions/objects/<ab>/<sha256>  a chunk of a file, stored once, shared by every version using
                                  it (``store/chunks.py``: a safetensors file is cut into its
                                  header and one chunk per part: backbone, routers, each expert)
  versions/vN/claim.json          allocates N (conditional create: one writer wins N)
  versions/vN/refs.json           the chunks a publish in flight will reference, written before
                                  any upload (garbage collection keeps them)
  versions/vN/manifest.json       written LAST, by conditional create: the version is visible
                                  from this moment; ``files``: {relpath: {sha256, size, chunks}}
  versions/vN/marks/<rev>.json    append-only marks merged into the manifest on read
  versions/vN/purged.json         tombstone of a purged version; N is never reused
  versions/gc.lock                held by a garbage collection (conditional create), with a
                                  lease: a dead holder's lock is taken over (store/gclock.py)
  versions/vN/files/<relpath>     versions written before chunks (schema 1 without ``chunks``):
                                  still read; ``migrate()`` moves them to chunks
                                  (``versions/vN/chunks.json`` then lists them)

A join writes its new expert's chunks, the routers' chunk, the small files and the manifest; an
unlearn the routers and the manifest. ``pull`` materialises a standard HF directory, verifying
every chunk's and file's sha256 (single-chunk files of a local store are hard-linked; objects
are read-only), and renames it into place only when all match.

Garbage collection vs a concurrent publish: a publisher writes ``refs.json`` and only then
looks for ``gc.lock`` (waiting while it exists); a collector takes ``gc.lock`` and only then
reads the references (manifests, sidecars and every ``refs.json``). Whichever order they run
in, a chunk a publish will reference is never deleted.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from datetime import datetime, timezone

from dume_dist.core.digest import file_sha256_size

from .backends import LocalBackend
from .chunks import SHA256, Chunk, check_chunk_list, plan_file
from .errors import StoreConflict, StoreError, StoreNotFound
from .gclock import GC_LEASE_S, GcLock
from .log import AppendLog
from .objectstore import ObjectStore, encode_json, local_files, staging_dir

SCHEMA_VERSION = 1
LAYOUT = "chunks/1"
MANIFEST_FILE = "dume_manifest.json"  # the manifest's name inside a pulled directory
_GENERATED = ("files", "version", "created_at", "schema_version", "marks", "layout")
_VERSION_ID = re.compile(r"v([1-9][0-9]*)")
_MARKERS = ("claim.json", "manifest.json", "purged.json", "refs.json", "chunks.json")


def parse_version(vid: str) -> int:
    """Parse "v12" -> 12; ValueError for anything else."""
    m = _VERSION_ID.fullmatch(vid) if isinstance(vid, str) else None
    if not m:
        raise ValueError(f"invalid version id {vid!r} (expected v1, v2, ...)")
    return int(m.group(1))


def _is_complete(names: set[str]) -> bool:
    return "manifest.json" in names and "purged.json" not in names


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class VersionStore:
    def __init__(self, store: ObjectStore, prefix: str = "versions", gc_wait_s: float = 600.0,
                 gc_lease_s: float = GC_LEASE_S):  # fmt: skip
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.gc_wait_s, self.gc_lease_s = gc_wait_s, gc_lease_s

    def _key(self, vid: str, name: str) -> str:
        parse_version(vid)
        return f"{self.prefix}/{vid}/{name}"

    def object_key(self, sha256: str) -> str:
        return f"{self.prefix}/objects/{sha256[:2]}/{sha256}"

    # -- reading ----------------------------------------------------------------------

    def _scan(self) -> dict[int, set[str]]:
        """{N: the marker files of vN present}, from one listing."""
        found: dict[int, set[str]] = {}
        for key in self.store.list(self.prefix):
            vid, _, name = key[len(self.prefix) + 1 :].partition("/")
            m = _VERSION_ID.fullmatch(vid)
            if m and name in _MARKERS:
                found.setdefault(int(m.group(1)), set()).add(name)
        return found

    def list_versions(self, include_purged: bool = False) -> list[str]:
        """Complete versions (manifest written), oldest first; purged ones only if asked."""
        return [
            f"v{n}"
            for n, names in sorted(self._scan().items())
            if ("purged.json" in names and include_purged) or _is_complete(names)
        ]

    def list_incomplete(self) -> list[str]:
        """Claimed versions with no manifest and no tombstone: uploads in flight or abandoned."""
        return [
            f"v{n}"
            for n, names in sorted(self._scan().items())
            if "claim.json" in names and not names & {"manifest.json", "purged.json"}
        ]

    def latest(self) -> str | None:
        versions = self.list_versions()
        return versions[-1] if versions else None

    def get_manifest(self, vid: str) -> dict:
        """The manifest of a complete version, with its marks merged in under "marks"."""
        if self.store.exists(self._key(vid, "purged.json")):
            raise StoreNotFound(f"{self.store.url}: version {vid} was purged")
        try:
            manifest = self._read_manifest(vid)
        except StoreNotFound as e:
            raise StoreNotFound(f"{self.store.url}: no complete version {vid}") from e
        manifest["marks"] = self.marks(vid)
        return manifest

    def _read_manifest(self, vid: str) -> dict:
        """``vid``'s manifest as written, checked for the fields the store relies on: a
        manifest edited by hand, or written for another version, is a one-line `StoreError`
        (never a crash in whoever reads it, never a version shown under the wrong id)."""
        manifest = self.store.read_json(self._key(vid, "manifest.json"))
        problem = _manifest_problem(vid, manifest)
        if problem:
            raise StoreError(f"{self.store.url}: manifest of {vid} is malformed: {problem}")
        return manifest

    def marks(self, vid: str) -> dict:
        """{key: value} of every mark on `vid`; a later mark of a key wins."""
        merged = {}
        for rev, record in AppendLog(self.store, self._key(vid, "marks")).records():
            if not (
                isinstance(record, dict)
                and isinstance(record.get("key"), str)
                and "value" in record
            ):
                raise StoreError(f"{self.store.url}: mark {rev} of {vid} is malformed")
            merged[record["key"]] = record["value"]
        return merged

    def file_chunks(self, vid: str, manifest: dict) -> dict[str, list[dict] | None]:
        """{relpath: chunk list}, or None per file of a version stored whole (schema 1)."""
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise StoreError(f"{self.store.url}: manifest of {vid} has no files")
        sidecar = {}
        if not all(isinstance(e, dict) and "chunks" in e for e in files.values()):
            with contextlib.suppress(StoreNotFound):
                sidecar = self.store.read_json(self._key(vid, "chunks.json"))
        out = {}
        for rel, entry in files.items():
            chunks = entry.get("chunks") if isinstance(entry, dict) else None
            chunks = chunks if chunks is not None else sidecar.get(rel)
            out[rel] = None if chunks is None else check_chunk_list(rel, chunks)
        return out

    def pull(self, vid: str, local_dir: str) -> dict:
        """Materialise `vid` at `local_dir` (which must not exist), verified; return its manifest.

        On any error (missing or corrupt chunk or file) nothing is left at `local_dir`.
        The manifest is saved in the directory as `dume_manifest.json`.
        """
        manifest = self.get_manifest(vid)
        chunks = self.file_chunks(vid, manifest)
        if all(c is None for c in chunks.values()):  # a version stored whole
            self.store.get_dir(
                self._key(vid, "files"), local_dir, manifest["files"],
                extra={MANIFEST_FILE: encode_json(manifest)},
            )  # fmt: skip
            return manifest
        local_dir, tmp = staging_dir(local_dir)
        try:
            for rel, entry in sorted(manifest["files"].items()):
                dest = os.path.join(tmp, *_check_rel(rel).split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                self._materialise(vid, rel, entry, chunks[rel], dest)
            with open(os.path.join(tmp, MANIFEST_FILE), "wb") as f:
                f.write(encode_json(manifest))
            os.rename(tmp, local_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def _materialise(self, vid, rel, entry, chunks, dest) -> None:
        try:
            if chunks is None:
                self.store.get_file(self._key(vid, f"files/{rel}"), dest, expected=entry)
                return
            if not (
                len(chunks) == 1 and self.store.link_to(self.object_key(chunks[0]["sha256"]), dest)
            ):
                with open(dest, "wb") as f:
                    for c in chunks:
                        self.store.copy_to(self.object_key(c["sha256"]), f, c)
            got = dict(zip(("sha256", "size"), file_sha256_size(dest)))
            if got != {"sha256": entry["sha256"], "size": entry["size"]}:
                raise StoreError(f"{self.store.url}: {vid}/{rel} is corrupt (checksum mismatch)")
        except StoreError as e:
            if rel in str(e):
                raise
            raise type(e)(f"{self.store.url}: cannot pull {vid}/{rel}: {e}") from e

    # -- writing ----------------------------------------------------------------------

    def publish(self, local_dir: str, manifest: dict) -> str:
        """Upload `local_dir` as the next version and return its id ("v7").

        `manifest` holds the caller's fields (contributors, λ/T/k, fingerprints, and
        optionally "parent"; it defaults to the newest complete version). The store adds
        "files" {relpath: {sha256, size, chunks}}, "version", "created_at", "schema_version",
        "layout". Only chunks not already in the store are uploaded. A top-level
        `dume_manifest.json` in `local_dir` (from an earlier pull) is skipped.
        """
        if not os.path.isdir(local_dir):
            raise ValueError(f"not a directory: {local_dir}")
        if not isinstance(manifest, dict):
            raise ValueError(f"manifest must be a dict, got {type(manifest).__name__}")
        reserved = sorted(set(manifest) & set(_GENERATED))
        if reserved:
            raise ValueError(f"manifest fields {reserved} are set by the store")
        encode_json(manifest)  # ValueError before anything is written
        plans = {
            rel: plan_file(os.path.join(local_dir, *rel.split("/")))
            for rel in local_files(local_dir)
            if rel != MANIFEST_FILE
        }
        scan = self._scan()
        complete = [n for n, names in scan.items() if _is_complete(names)]
        default_parent = f"v{max(complete)}" if complete else None
        parent = manifest.get("parent", default_parent)
        vid = self._claim(first=max(scan, default=0) + 1)
        sources = {c.sha256: (rel, c) for rel, (chunks, _, _) in plans.items() for c in chunks}
        self._upload_chunks(vid, local_dir, sources)
        files = {
            rel: {"sha256": sha, "size": size, "chunks": [c.entry() for c in chunks]}
            for rel, (chunks, sha, size) in sorted(plans.items())
        }
        full = {
            **manifest,
            "version": vid,
            "parent": parent,
            "created_at": _now(),
            "schema_version": SCHEMA_VERSION,
            "layout": LAYOUT,
            "files": files,
        }
        self.store.create_json(self._key(vid, "manifest.json"), full)
        self.store.delete(self._key(vid, "refs.json"), missing_ok=True)
        return vid

    def _upload_chunks(self, vid: str, local_dir: str, sources: dict[str, tuple[str, Chunk]]):
        """Record the references, wait out a running collection, upload the missing chunks."""
        self.store.write_json(self._key(vid, "refs.json"), {"chunks": sorted(sources)})
        self._wait_for_gc()
        for sha, (rel, chunk) in sorted(sources.items()):
            key = self.object_key(sha)
            if self.store.exists(key):
                continue
            path = os.path.join(local_dir, *rel.split("/"))
            if self.store.put_range(path, chunk.offset, chunk.size, key)["sha256"] != sha:
                self.store.delete(key, missing_ok=True)
                raise StoreError(f"{local_dir}/{rel} changed while it was published")
            if isinstance(self.store.backend, LocalBackend):  # pulls may hard-link it
                with contextlib.suppress(OSError):
                    os.chmod(self.store.backend.path(key), 0o444)

    def _wait_for_gc(self) -> None:
        deadline = time.monotonic() + self.gc_wait_s
        while self.store.exists(f"{self.prefix}/gc.lock"):
            with contextlib.suppress(StoreConflict):  # another publisher took it over first
                if self.resume_collection() is not None:  # its holder was dead: finished
                    continue
            if time.monotonic() > deadline:
                raise StoreError(
                    f"{self.store.url}: a garbage collection holds {self.prefix}/gc.lock for "
                    f"over {self.gc_wait_s:.0f} s; if it crashed, delete that key"
                )
            time.sleep(0.2)

    def _claim(self, first: int, attempts: int = 50) -> str:
        number = first
        claim = {
            "claimed_at": _now(),
            "by": f"{socket.gethostname()}:{os.getpid()}",
            "token": uuid.uuid4().hex,
        }
        for _ in range(attempts):
            try:
                self.store.create_json(self._key(f"v{number}", "claim.json"), claim)
                return f"v{number}"
            except StoreConflict:
                number += 1
        raise StoreConflict(f"{self.store.url}: could not allocate a version id")

    def mark(self, vid: str, key: str, value) -> None:
        """Attach `key: value` to a complete version (e.g. "contains_unlearned": ["nodeX"])."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"mark key must be a non-empty str, got {key!r}")
        self.get_manifest(vid)  # StoreNotFound for a missing, incomplete or purged version
        record = {"key": key, "value": value, "marked_at": _now()}
        encode_json(record)
        AppendLog(self.store, self._key(vid, "marks")).append_latest(record)

    def purge(self, vid: str, reason: str = "", collect: bool = True) -> None:
        """Delete a version's manifest (and files), leaving a tombstone, then collect the chunks
        no kept version references (unless ``collect`` is off or a collection runs). Idempotent."""
        if not self.store.exists(self._key(vid, "claim.json")):
            raise StoreNotFound(f"{self.store.url}: no version {vid}")
        try:  # tombstone first: from here on readers treat the version as gone
            self.store.create_json(
                self._key(vid, "purged.json"), {"purged_at": _now(), "reason": reason}
            )
        except StoreConflict:
            pass  # already purged (or a purge is being retried)
        self.store.delete_prefix(self._key(vid, "files"))
        self.store.delete(self._key(vid, "manifest.json"), missing_ok=True)
        if collect:
            with contextlib.suppress(StoreConflict):
                self.collect_garbage()

    # -- garbage collection and migration --------------------------------------------------

    def referenced(self) -> set[str]:
        """Every chunk a kept version, a migrated version or a publish in flight references."""
        refs: set[str] = set()
        for n, names in sorted(self._scan().items()):
            vid = f"v{n}"
            if "refs.json" in names:
                with contextlib.suppress(StoreNotFound):
                    refs.update(self.store.read_json(self._key(vid, "refs.json"))["chunks"])
            if not _is_complete(names):
                continue
            try:
                manifest = self._read_manifest(vid)
            except StoreNotFound:
                continue  # purged meanwhile
            for chunks in self.file_chunks(vid, manifest).values():
                refs.update(c["sha256"] for c in chunks or [])
        return refs

    def _gc_lock(self) -> GcLock:
        return GcLock(self.store, f"{self.prefix}/gc.lock", self.gc_lease_s)

    def collect_garbage(self) -> dict:
        """Delete the chunks nobody references; returns what was kept and deleted. Raises
        StoreConflict while another collection runs."""
        if not self.store.children(self.prefix):  # nothing published here (a mistyped store)
            return {"kept": 0, "deleted": 0}  # and nothing written: no lock, no directory
        lock = self._gc_lock()
        lock.take(create=True)
        return self._collect(lock)

    def resume_collection(self) -> dict | None:
        """Finish a collection whose collector died holding ``gc.lock`` (publishes wait on it):
        take the lock over, read the references again and delete what nobody references. What
        a restarted coordinator runs first, and a publish that finds a dead holder's lock.
        None when no lock is held or its holder is alive (``store.gclock``: the lease). The
        references are read after the takeover, and no publish passed the lock since it was
        taken, so the module's ordering argument still holds."""
        lock = self._gc_lock()
        if not lock.holder_dead():
            return None
        lock.take(create=False)
        return self._collect(lock)

    def _collect(self, lock: GcLock) -> dict:
        try:
            objects = [k for k in self.store.list(f"{self.prefix}/objects")]
            lock.beat()
            keep = self.referenced()  # read after the lock: see the module docstring
            lock.beat(check=True)  # still ours: nobody took a slow collector's lock over
            deleted = [k for k in objects if k.rsplit("/", 1)[-1] not in keep]
            for key in deleted:
                self.store.delete(key, missing_ok=True)
                lock.beat()
            return {"kept": len(objects) - len(deleted), "deleted": len(deleted)}
        finally:
            lock.release()

    def migrate(self) -> list[str]:
        """Move every complete version stored whole (schema 1 without chunks) to chunks: upload
        its files' chunks, write ``chunks.json``, delete its ``files/``. Returns the versions
        migrated; pulls give the same bytes before and after."""
        done = []
        for vid in self.list_versions():
            manifest = self._read_manifest(vid)
            if any(c is not None for c in self.file_chunks(vid, manifest).values()):
                continue
            with tempfile.TemporaryDirectory(prefix="dume-migrate-") as tmp:
                local = os.path.join(tmp, "v")
                self.store.get_dir(self._key(vid, "files"), local, manifest["files"])
                plans = {
                    rel: plan_file(os.path.join(local, *rel.split("/")))
                    for rel in manifest["files"]
                }
                sources = {
                    c.sha256: (rel, c) for rel, (chunks, _, _) in plans.items() for c in chunks
                }
                self._upload_chunks(vid, local, sources)
            sidecar = {rel: [c.entry() for c in chunks] for rel, (chunks, _, _) in plans.items()}
            self.store.create_json(self._key(vid, "chunks.json"), sidecar)
            self.store.delete(self._key(vid, "refs.json"), missing_ok=True)
            self.store.delete_prefix(self._key(vid, "files"))
            done.append(vid)
        return done


def _manifest_problem(vid: str, manifest) -> str | None:
    """What is wrong with a manifest read from ``vid`` (None when nothing is)."""
    if not isinstance(manifest, dict):
        return f"not a JSON object ({type(manifest).__name__})"
    if manifest.get("version") != vid:
        return f"it names version {str(manifest.get('version'))[:40]!r}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "no files"
    for rel, entry in files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not SHA256.fullmatch(entry["sha256"])
            or not isinstance(entry.get("size"), int)
            or isinstance(entry["size"], bool)
            or entry["size"] < 0
        ):
            return f"file {str(rel)[:80]!r} has no valid sha256 and size"
    return None


def _check_rel(rel: str) -> str:
    parts = rel.split("/") if isinstance(rel, str) else [""]
    if any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
        raise StoreError(f"manifest names a bad file path {rel!r}")
    return rel
