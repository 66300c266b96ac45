"""The lease on ``versions/gc.lock``: who holds a garbage collection, and when it is dead.

A collector takes the lock (conditional create), names itself in it (machine, process, a token
of its own) and beats it (``beat``, at least every ``BEAT_S`` while it works). A lock is the
holder's while the holder lives:

* the holder is this process: alive while its collection runs (``_RUNNING``);
* another process of this machine: alive while that process exists;
* another machine: alive while its last beat is younger than the lease (``GC_LEASE_S``).

A dead holder's lock is taken over (``take(create=False)``): the new holder reads the
references after the takeover, as any collector does, so the ordering argument of
``store.versions`` holds. A holder checks that the lock is still its own before it deletes
anything (``beat(check=True)``), so of two that took over the same dead lock only the last
collects.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from .errors import StoreConflict, StoreError, StoreNotFound
from .objectstore import ObjectStore

GC_LEASE_S = 300.0  # a lock held from another machine is dead once its last beat is this old
BEAT_S = 30.0  # a collector beats its lock at least this often while it works

_RUNNING: set[str] = set()  # tokens of the collections running in this process
_RUNNING_LOCK = threading.Lock()


def _machine() -> str:
    boot = Path("/proc/sys/kernel/random/boot_id")
    boot_id = boot.read_text().strip() if boot.is_file() else ""
    return f"{socket.gethostname()}/{boot_id}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder_alive(record, lease_s: float = GC_LEASE_S) -> bool:
    """Whether the collection that wrote lock ``record`` may still be running. A record this
    module cannot read (an older format, garbage) counts as alive only by its beat's age."""
    if not isinstance(record, dict):
        return False
    by = record.get("by")
    parts = by.split("|") if isinstance(by, str) else []
    if len(parts) == 3 and parts[0] == _machine():
        machine, pid, token = parts
        if pid == str(os.getpid()):
            with _RUNNING_LOCK:
                return token in _RUNNING
        return pid.isdigit() and _pid_alive(int(pid))
    return _age_s(record.get("beat") or record.get("since")) < lease_s


def _age_s(stamp) -> float:
    try:
        when = datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return math.inf
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (_now() - when).total_seconds()


class GcLock:
    """One collector's hold on the lock at ``key``."""

    def __init__(self, store: ObjectStore, key: str, lease_s: float = GC_LEASE_S):
        self.store, self.key, self.lease_s = store, key, lease_s
        self.token = secrets.token_hex(8)
        self._last_beat = 0.0

    def _record(self) -> dict:
        stamp = _now().isoformat(timespec="seconds")
        return {"since": stamp, "beat": stamp, "by": f"{_machine()}|{os.getpid()}|{self.token}"}

    def read(self) -> dict | None:
        """The lock's record; None when nobody holds it; {} when it cannot be read."""
        try:
            record = self.store.read_json(self.key)
        except StoreNotFound:
            return None
        except (StoreError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def holder_dead(self) -> bool | None:
        """None: no lock; True: its holder is dead (take it over); False: it is alive."""
        record = self.read()
        return None if record is None else not holder_alive(record, self.lease_s)

    def take(self, create: bool = True) -> None:
        """Hold the lock: ``create`` (StoreConflict while anyone holds it), else overwrite a
        dead holder's."""
        with _RUNNING_LOCK:
            _RUNNING.add(self.token)
        try:
            if create:
                self.store.create_json(self.key, self._record())
            else:
                self.store.write_json(self.key, self._record())
        except BaseException:
            self._forget()
            raise
        self._last_beat = time.monotonic()

    def beat(self, check: bool = False) -> None:
        """Renew the lease (at most every ``BEAT_S`` unless ``check``); StoreConflict when the
        lock is no longer this collector's (it was taken over): stop before deleting."""
        if not check and time.monotonic() - self._last_beat < BEAT_S:
            return
        record = self.read() or {}
        if not str(record.get("by", "")).endswith(f"|{self.token}"):
            raise StoreConflict(f"{self.store.url}: {self.key} was taken over by another collector")
        record["beat"] = _now().isoformat(timespec="seconds")
        self.store.write_json(self.key, record)
        self._last_beat = time.monotonic()

    def release(self) -> None:
        """Give the lock up (delete it if it is still this collector's)."""
        try:
            record = self.read() or {}
            if str(record.get("by", "")).endswith(f"|{self.token}"):
                with contextlib.suppress(StoreNotFound):
                    self.store.delete(self.key, missing_ok=True)
        finally:
            self._forget()

    def _forget(self) -> None:
        with _RUNNING_LOCK:
            _RUNNING.discard(self.token)
