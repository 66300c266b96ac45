"""AppendLog: a numbered, append-only sequence of JSON records.

This is the store's optimistic-concurrency scheme; it needs nothing but
conditional create, so it works on local disk, S3 and memory alike.

Layout under `prefix`:
  <prefix>/000000000001.json, 000000000002.json, ...   records, never rewritten
  <prefix>/HEAD                                        hint: a revision known to exist

Record n+1 is created (`create_bytes`) only by a writer that has checked that
record n exists, so the log has no gaps and two writers can never both write the
same revision: the loser gets `StoreConflict`. HEAD is rewritten after each
append; it may lag (a crash, or two writers finishing out of order) but never
points past the end, so `head()` reads it and probes forward: about three
requests however long the log grows.
"""

import re

from .errors import StoreConflict, StoreNotFound
from .objectstore import ObjectStore

_RECORD = re.compile(r"(\d{12})\.json")


class AppendLog:
    def __init__(self, store: ObjectStore, prefix: str):
        self.store = store
        self.prefix = prefix.rstrip("/")

    def _key(self, revision: int) -> str:
        return f"{self.prefix}/{revision:012d}.json"

    def head(self) -> int:
        """The newest revision; 0 for an empty log."""
        try:
            revision = int(self.store.read_bytes(f"{self.prefix}/HEAD").decode())
            if revision < 0 or (revision > 0 and not self.store.exists(self._key(revision))):
                raise ValueError("HEAD points past the log")  # a corrupt hint: list instead
        except (StoreNotFound, ValueError):
            revision = max(self.revisions(), default=0)
        while self.store.exists(self._key(revision + 1)):
            revision += 1
        return revision

    def revisions(self) -> list[int]:
        """Every revision present, from a listing (ascending)."""
        names = (key.rsplit("/", 1)[-1] for key in self.store.list(self.prefix))
        return sorted(int(m.group(1)) for m in map(_RECORD.fullmatch, names) if m)

    def read(self, revision: int) -> dict:
        return self.store.read_json(self._key(revision))

    def records(self) -> list[tuple[int, dict]]:
        """All (revision, record) pairs in order; for short logs (marks)."""
        return [(rev, self.read(rev)) for rev in self.revisions()]

    def append(self, record: dict, expected_head: int) -> int:
        """Write `record` as revision `expected_head + 1`; `StoreConflict` if that is taken."""
        if not isinstance(expected_head, int) or expected_head < 0:
            raise ValueError(f"expected revision must be an int >= 0, got {expected_head!r}")
        if expected_head > 0 and not self.store.exists(self._key(expected_head)):
            raise ValueError(f"revision {expected_head} does not exist in {self.prefix}")
        revision = expected_head + 1
        self.store.create_json(self._key(revision), record)
        self.store.write_bytes(f"{self.prefix}/HEAD", str(revision).encode())
        return revision

    def append_latest(self, record: dict, attempts: int = 20) -> int:
        """Append `record` after whatever is newest, retrying when another writer wins."""
        for _ in range(attempts):
            try:
                return self.append(record, self.head())
            except StoreConflict:
                continue
        raise StoreConflict(
            f"{self.store.url}: {self.prefix}: lost {attempts} append races in a row"
        )
