"""Where each part of a store lives: what readers may see apart from what only the coordinator may.

  public/versions/...    VersionStore   published versions and their tensors: anyone who pulls
  private/registry/...   RegistryStore  the coordinator's state (nodes, credential hashes)
  private/blobs/...      BlobStore      contributors' statistics and expert MLP weights
  private/backbone/...                  the backbone's files (node agents get them through the
                                        coordinator)

Readers (`dume versions list|show|pull`) need read access to ``public/`` only; the coordinator
and the operator's genesis need ``private/`` too. docs/distributed.md has an S3 bucket policy
that grants exactly that. A store founded before this split keeps its root-level ``versions/``,
``registry/``, ``blobs/`` (`LEGACY`): a store that already has a root-level registry is read
and written where it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import StoreError
from .objectstore import ObjectStore

PUBLIC_PREFIX = "public"
PRIVATE_PREFIX = "private"


@dataclass(frozen=True)
class Layout:
    versions: str
    registry: str
    blobs: str
    backbone: str


CURRENT = Layout(
    versions=f"{PUBLIC_PREFIX}/versions",
    registry=f"{PRIVATE_PREFIX}/registry",
    blobs=f"{PRIVATE_PREFIX}/blobs",
    backbone=f"{PRIVATE_PREFIX}/backbone",
)
LEGACY = Layout(versions="versions", registry="registry", blobs="blobs", backbone="backbone")


def coordinator_layout(store: ObjectStore) -> Layout:
    """The layout of a store as its coordinator (or the operator) sees it."""
    return LEGACY if store.children(LEGACY.registry) else CURRENT


def reader_layout(store: ObjectStore) -> Layout:
    """The layout as a reader with access to ``public/`` only sees it: `CURRENT` unless there
    are no public versions and a root-level ``versions/`` can be listed (a legacy store)."""
    if store.children(CURRENT.versions):
        return CURRENT
    try:
        return LEGACY if store.children(LEGACY.versions) else CURRENT
    except StoreError:  # no access outside public/: not a legacy store a reader could read
        return CURRENT
