"""VersionStore: immutable, numbered model versions (DESIGN §5).

Layout (N = 1, 2, ...; ids are "v1", "v2", ...):

  versions/vN/claim.json         allocates N (conditional create: one writer wins N)
  versions/vN/files/<relpath>    the model directory, byte for byte
  versions/vN/manifest.json      written LAST, by conditional create: the version is
                                 visible from this moment, complete and checksummed
  versions/vN/marks/<rev>.json   append-only marks merged into the manifest on read
                                 (manifests are immutable)
  versions/vN/purged.json        tombstone of a purged version; N is never reused

A claimed version without a manifest (a publisher crashed or is still uploading)
is invisible to readers. `pull` verifies every file's sha256 and size, and
renames the directory into place only when all of them match.
"""

import contextlib
import os
import re
import socket
import uuid
from datetime import datetime, timezone

from .errors import StoreConflict, StoreError, StoreNotFound
from .log import AppendLog
from .objectstore import ObjectStore, encode_json

SCHEMA_VERSION = 1
MANIFEST_FILE = "dume_manifest.json"  # the manifest's name inside a pulled directory
_GENERATED = ("files", "version", "created_at", "schema_version", "marks")
_VERSION_ID = re.compile(r"v([1-9][0-9]*)")


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
    def __init__(self, store: ObjectStore, prefix: str = "versions"):
        self.store = store
        self.prefix = prefix.rstrip("/")

    def _key(self, vid: str, name: str) -> str:
        parse_version(vid)
        return f"{self.prefix}/{vid}/{name}"

    # -- reading ----------------------------------------------------------------------

    def _scan(self) -> dict[int, set[str]]:
        """{N: {"claim.json", "manifest.json", "purged.json"} ∩ present}, from one listing."""
        found: dict[int, set[str]] = {}
        for key in self.store.list(self.prefix):
            vid, _, name = key[len(self.prefix) + 1 :].partition("/")
            m = _VERSION_ID.fullmatch(vid)
            if m and name in ("claim.json", "manifest.json", "purged.json"):
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
        return [f"v{n}" for n, names in sorted(self._scan().items()) if names == {"claim.json"}]

    def latest(self) -> str | None:
        versions = self.list_versions()
        return versions[-1] if versions else None

    def get_manifest(self, vid: str) -> dict:
        """The manifest of a complete version, with its marks merged in under "marks"."""
        if self.store.exists(self._key(vid, "purged.json")):
            raise StoreNotFound(f"{self.store.url}: version {vid} was purged")
        try:
            manifest = self.store.read_json(self._key(vid, "manifest.json"))
        except StoreNotFound as e:
            raise StoreNotFound(f"{self.store.url}: no complete version {vid}") from e
        manifest["marks"] = self.marks(vid)
        return manifest

    def marks(self, vid: str) -> dict:
        """{key: value} of every mark on `vid`; a later mark of a key wins."""
        merged = {}
        for _, record in AppendLog(self.store, self._key(vid, "marks")).records():
            merged[record["key"]] = record["value"]
        return merged

    def pull(self, vid: str, local_dir: str) -> dict:
        """Download `vid` into `local_dir` (which must not exist), verified; return its manifest.

        On any error (missing or corrupt file) nothing is left at `local_dir`.
        The manifest is saved in the directory as `dume_manifest.json`.
        """
        manifest = self.get_manifest(vid)
        self.store.get_dir(
            self._key(vid, "files"),
            local_dir,
            manifest["files"],
            extra={MANIFEST_FILE: encode_json(manifest)},
        )
        return manifest

    # -- writing ----------------------------------------------------------------------

    def publish(self, local_dir: str, manifest: dict) -> str:
        """Upload `local_dir` as the next version and return its id ("v7").

        `manifest` holds the caller's fields (contributors, λ/T/k, fingerprints, and
        optionally "parent"; it defaults to the newest complete version). The store adds
        "files" {relpath: {sha256, size}}, "version", "created_at", "schema_version".
        A top-level `dume_manifest.json` in `local_dir` (from an earlier pull) is skipped.
        """
        if not os.path.isdir(local_dir):
            raise ValueError(f"not a directory: {local_dir}")
        if not isinstance(manifest, dict):
            raise ValueError(f"manifest must be a dict, got {type(manifest).__name__}")
        reserved = sorted(set(manifest) & set(_GENERATED))
        if reserved:
            raise ValueError(f"manifest fields {reserved} are set by the store")
        encode_json(manifest)  # ValueError before anything is written

        scan = self._scan()
        complete = [n for n, names in scan.items() if _is_complete(names)]
        default_parent = f"v{max(complete)}" if complete else None
        parent = manifest.get("parent", default_parent)
        vid = self._claim(first=max(scan, default=0) + 1)
        try:
            files = self.store.put_dir(local_dir, self._key(vid, "files"), exclude=(MANIFEST_FILE,))
        except BaseException:
            with contextlib.suppress(StoreError):  # best effort; the claim stays, unused
                self.store.delete_prefix(self._key(vid, "files"))
            raise
        full = {
            **manifest,
            "version": vid,
            "parent": parent,
            "created_at": _now(),
            "schema_version": SCHEMA_VERSION,
            "files": files,
        }
        self.store.create_json(self._key(vid, "manifest.json"), full)
        return vid

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

    def purge(self, vid: str, reason: str = "") -> None:
        """Delete a version's files and manifest, leaving a tombstone. Idempotent."""
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
