"""One way to call the coordinator (or an agent): a Ray actor handle or the plain object.

``call(target, "method", *args)`` runs ``target.method.remote(*args)`` and waits for it (re-raising
the exception raised inside the actor, not Ray's wrapper) when ``target`` is an actor handle, and
``target.method(*args)`` otherwise (tests drive the plain classes in-process). Ray is imported only
for actor handles.
"""

from __future__ import annotations


def call(target, method: str, *args):
    fn = getattr(target, method)
    if hasattr(fn, "remote"):
        from dume_dist.distributed.cluster import get

        return get(fn.remote(*args))
    return fn(*args)
