"""RegistryStore: the coordinator's state as JSON, with optimistic concurrency.

The state is an opaque JSON-serialisable dict; the coordinator owns its schema.
Each `save` appends one revision to an `AppendLog` under `registry/`:

  registry/000000000001.json   {"revision": 1, "saved_at": ..., "state": {...}}
  registry/HEAD                hint for the newest revision

`save(state, expected_revision)` succeeds only if nobody has saved since
`expected_revision`; otherwise it raises `StoreConflict` and writes nothing, so
two coordinators on one store cannot overwrite each other. Old revisions are kept
(an audit trail, and what makes a stale writer's conflict detectable).
"""

import logging
from datetime import datetime, timezone

from .errors import StoreConflict, StoreError
from .log import AppendLog
from .objectstore import ObjectStore, encode_json

_log = logging.getLogger("dume_dist.store")


class RegistryStore:
    def __init__(self, store: ObjectStore, prefix: str = "registry"):
        self.store = store
        self.log = AppendLog(store, prefix)

    def load(self, revision: int | None = None, check=None) -> tuple[dict, int]:
        """(state, revision) of the newest save (or of `revision`); ({}, 0) for a fresh store.

        A newest revision that cannot be read (truncated, not JSON, or refused by ``check``, a
        callable that raises ValueError for a state it cannot use) is skipped with a warning:
        the state is the newest valid revision's, the revision the newest number, so the next
        `save` supersedes the bad one."""
        head = self.log.head() if revision is None else revision
        for rev in range(head, 0, -1) if revision is None else [revision]:
            try:
                state = self.log.read(rev)["state"]
                if not isinstance(state, dict):
                    raise ValueError("state is not a JSON object")
                if check is not None:
                    check(state)
            except (StoreError, ValueError, KeyError, TypeError) as exc:
                if revision is not None:
                    raise
                _log.warning("%s: registry revision %d is unreadable (%s): using an older one",
                             self.store.url, rev, " ".join(str(exc).split())[:200])  # fmt: skip
                continue
            return state, head
        if head:
            raise StoreError(f"{self.store.url}: none of the {head} registry revisions is readable")
        return {}, 0

    def save(self, state: dict, expected_revision: int) -> int:
        """Persist `state` as the revision after `expected_revision`; return the new revision.

        Raises `StoreConflict` (and changes nothing) if another writer saved since.
        """
        if not isinstance(state, dict):
            raise ValueError(f"registry state must be a dict, got {type(state).__name__}")
        encode_json(state)  # ValueError now, before anything is written
        record = {
            "revision": expected_revision + 1,
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "state": state,
        }
        try:
            return self.log.append(record, expected_revision)
        except StoreConflict as e:
            raise StoreConflict(
                f"{self.store.url}: registry changed since revision {expected_revision} "
                "(another coordinator saved); reload and retry"
            ) from e

    def history(self) -> list[int]:
        """Every saved revision, ascending."""
        return self.log.revisions()
