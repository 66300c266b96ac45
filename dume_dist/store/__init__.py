"""store: versions, statistics blobs and registry state in an fsspec object store.

Layout of a store root (layout.py: what readers may see apart from what only the coordinator
may; each module documents its part):

  public/versions/vN/...  VersionStore   immutable model versions (versions.py)
  private/blobs/...       BlobStore      content-addressed statistics and expert weights (blobs.py)
  private/registry/...    RegistryStore  the coordinator's state, append-only revisions (registry.py)
  private/backbone/...                   the backbone's files

Everything rests on ObjectStore (objectstore.py): atomic writes and conditional
create over local disk, S3 (s3fs) or memory. No Ray, no torch.
"""

from .blobs import BlobStore, parse_blob_id
from .credentials import hash_secret, new_secret, verify_secret
from .errors import ChecksumError, StoreConflict, StoreError, StoreNotFound
from .layout import CURRENT, LEGACY, Layout, coordinator_layout, reader_layout
from .log import AppendLog
from .objectstore import ObjectStore
from .registry import RegistryStore
from .versions import MANIFEST_FILE, SCHEMA_VERSION, VersionStore, parse_version

__all__ = [
    "CURRENT",
    "LEGACY",
    "Layout",
    "coordinator_layout",
    "reader_layout",
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "AppendLog",
    "BlobStore",
    "ChecksumError",
    "ObjectStore",
    "RegistryStore",
    "StoreConflict",
    "StoreError",
    "StoreNotFound",
    "VersionStore",
    "hash_secret",
    "new_secret",
    "parse_blob_id",
    "parse_version",
    "verify_secret",
]
