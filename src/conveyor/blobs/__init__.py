"""Blob stores behind the ``BlobStore`` protocol: where event payloads too large for the log go."""

from conveyor.blobs.base import BlobStore
from conveyor.blobs.memory import MemoryBlobStore

__all__ = ["BlobStore", "MemoryBlobStore"]
