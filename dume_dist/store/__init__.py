"""store: versions, statistics blobs and registry state in an fsspec object store.

Layout of a store root (each module documents its part):

  versions/vN/...   VersionStore   immutable model versions (versions.py)
  blobs/...         BlobStore      content-addressed statistics and expert weights (blobs.py)
  registry/...      RegistryStore  the coordinator's state, append-only revisions (registry.py)

Everything rests on ObjectStore (objectstore.py): atomic writes and conditional
create over local disk, S3 (s3fs) or memory. No Ray, no torch.
"""

from .blobs import BlobStore, parse_blob_id
from .credentials import hash_secret, new_secret, verify_secret
from .errors import ChecksumError, StoreConflict, StoreError, StoreNotFound
from .log import AppendLog
from .objectstore import ObjectStore
from .registry import RegistryStore
from .versions import MANIFEST_FILE, SCHEMA_VERSION, VersionStore, parse_version

__all__ = [
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
