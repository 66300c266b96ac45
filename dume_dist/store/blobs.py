"""BlobStore: content-addressed blobs per kind and owner (statistics, expert weights).

Layout:
  blobs/<kind>/<owner>/<sha256>.bin    the bytes
  blobs/<kind>/<owner>/<sha256>.json   {"sha256", "size", "kind", "owner", "created_at",
                                        "meta": {...}}; written after the bytes, so a
                                        blob is listed only once it is complete

A blob id is "<kind>/<owner>/<sha256>": a retried submission of the same bytes maps
to the same id and is stored once (the first submission's meta is kept). Reads
verify the sha256. `delete_owner` removes everything an owner ever submitted
(unlearning); `sweep` removes whatever no registry entry references (a call that died between
writing a blob and saving the registry). The store only moves bytes; (de)serialising statistics lives elsewhere.
"""

import hashlib
import re
from datetime import datetime, timezone

from .errors import ChecksumError, StoreNotFound
from .names import check_name
from .objectstore import ObjectStore, encode_json

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_name(what: str, name: str) -> str:
    return check_name(f"blob {what}", name, max_len=128)


def parse_blob_id(blob_id: str) -> tuple[str, str, str]:
    """Split "kind/owner/sha256" -> (kind, owner, sha256); ValueError if malformed."""
    parts = blob_id.split("/") if isinstance(blob_id, str) else []
    if len(parts) != 3 or not _SHA256.fullmatch(parts[2]):
        raise ValueError(f"invalid blob id {blob_id!r} (expected kind/owner/sha256)")
    return _check_name("kind", parts[0]), _check_name("owner", parts[1]), parts[2]


class BlobStore:
    def __init__(self, store: ObjectStore, prefix: str = "blobs"):
        self.store = store
        self.prefix = prefix.rstrip("/")

    def _key(self, blob_id: str, suffix: str) -> str:
        parse_blob_id(blob_id)
        return f"{self.prefix}/{blob_id}{suffix}"

    def put_blob(self, kind: str, owner: str, data: bytes, meta: dict | None = None) -> str:
        """Store `data` (once) and return its id "kind/owner/sha256"."""
        _check_name("kind", kind)
        _check_name("owner", owner)
        data = data if isinstance(data, bytes) else bytes(data)
        sha256 = hashlib.sha256(data).hexdigest()
        blob_id = f"{kind}/{owner}/{sha256}"
        if self.store.exists(self._key(blob_id, ".json")):
            return blob_id
        record = {
            "sha256": sha256,
            "size": len(data),
            "kind": kind,
            "owner": owner,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "meta": meta or {},
        }
        encoded = encode_json(record)  # ValueError before anything is written
        self.store.write_bytes(self._key(blob_id, ".bin"), data)
        self.store.write_bytes(self._key(blob_id, ".json"), encoded)
        return blob_id

    def get_blob(self, blob_id: str) -> bytes:
        """The blob's bytes, verified against its sha256 (`ChecksumError` if corrupt)."""
        try:
            data = self.store.read_bytes(self._key(blob_id, ".bin"))
        except StoreNotFound as e:
            raise StoreNotFound(f"{self.store.url}: no blob {blob_id}") from e
        sha256 = parse_blob_id(blob_id)[2]
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ChecksumError(f"{self.store.url}: blob {blob_id} is corrupt (sha256 mismatch)")
        return data

    def get_meta(self, blob_id: str) -> dict:
        """The record written with the blob; its "meta" holds what the submitter passed."""
        try:
            return self.store.read_json(self._key(blob_id, ".json"))
        except StoreNotFound as e:
            raise StoreNotFound(f"{self.store.url}: no blob {blob_id}") from e

    def list_blobs(self, kind: str, owner: str) -> list[str]:
        """Ids of an owner's complete blobs of one kind, sorted."""
        prefix = f"{self.prefix}/{_check_name('kind', kind)}/{_check_name('owner', owner)}"
        names = (key.rsplit("/", 1)[-1] for key in self.store.list(prefix))
        return [f"{kind}/{owner}/{n[:-5]}" for n in names if n.endswith(".json")]

    def owners(self, kind: str) -> list[str]:
        return self.store.children(f"{self.prefix}/{_check_name('kind', kind)}")

    def delete_blob(self, blob_id: str) -> None:
        self.store.delete(self._key(blob_id, ".json"), missing_ok=True)
        self.store.delete(self._key(blob_id, ".bin"), missing_ok=True)

    def delete_owner(self, owner: str) -> int:
        """Delete every blob of `owner`, of every kind; return how many there were."""
        _check_name("owner", owner)
        count = 0
        for kind in self.store.children(self.prefix):
            count += len(self.list_blobs(kind, owner))
            self.store.delete_prefix(f"{self.prefix}/{kind}/{owner}")
        return count

    def sweep(self, referenced: set[str]) -> list[str]:
        """Delete every blob whose id is not in ``referenced``, complete or not (a ``.bin``
        without its ``.json``: a write that died half-way); returns the ids removed, sorted.
        Only the coordinator writes blobs, under its registry lock: call it holding that lock."""
        removed = set()
        for kind in self.store.children(self.prefix):
            for owner in self.store.children(f"{self.prefix}/{kind}"):
                for key in self.store.list(f"{self.prefix}/{kind}/{owner}"):
                    stem = key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                    blob_id = f"{kind}/{owner}/{stem}"
                    if blob_id not in referenced:
                        self.store.delete(key, missing_ok=True)
                        removed.add(blob_id)
        return sorted(removed)
