"""An in-process BlobStore for unit tests."""

from __future__ import annotations


class MemoryBlobStore:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    async def put(self, name: str, data: bytes) -> None:
        self.blobs[name] = bytes(data)

    async def get(self, name: str) -> bytes | None:
        return self.blobs.get(name)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
