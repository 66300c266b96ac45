"""Errors raised by the store layer.

Every failure that reaches a caller of `dume_dist.store` is a `StoreError` (or a
`ValueError` for a bad argument). Messages are one line and name the store URL.
"""


class StoreError(Exception):
    """The store cannot do what was asked: unreachable, denied, missing bucket, corrupt data."""


class StoreNotFound(StoreError):
    """A key (version, blob, file) does not exist in the store."""


class StoreConflict(StoreError):
    """A conditional write lost: the key already exists or the state moved on."""


class ChecksumError(StoreError):
    """Bytes read back do not match the sha256 recorded when they were written."""


def one_line(error: BaseException) -> str:
    """`type: message` of an exception squeezed onto one line."""
    text = " ".join(str(error).split()) or "(no message)"
    return f"{type(error).__name__}: {text}"
