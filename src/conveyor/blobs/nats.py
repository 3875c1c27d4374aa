"""BlobStore on a JetStream object store: the default beside the NATS log, on the same servers."""

from __future__ import annotations

import asyncio

import nats
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore

from conveyor.errors import UnavailableError
from conveyor.jetstream import JetStreamBackend

_WEEK = 7 * 86_400.0


class NatsBlobStore(JetStreamBackend):
    """One bucket (``<prefix>_blobs``) whose objects expire after ``max_age`` (the log's retention),
    stored in chunks as the object store stores them, replicated like the log's streams."""

    client_name = "conveyor-blobs"

    def __init__(
        self, nc: Client, *, prefix: str = "conveyor", replicas: int = 1, max_age: float = _WEEK
    ) -> None:
        super().__init__(nc, replicas=replicas)
        self.bucket = f"{prefix}_blobs"
        self._max_age = max_age
        self._store: ObjectStore | None = None
        self._lock = asyncio.Lock()

    async def _objects(self) -> ObjectStore:
        async with self._lock:
            if self._store is None:
                try:
                    self._store = await self._js.object_store(self.bucket)
                except BucketNotFoundError:
                    config = api.ObjectStoreConfig(
                        ttl=self._max_age, storage=api.StorageType.FILE, replicas=self.replicas
                    )
                    self._store = await self._js.create_object_store(self.bucket, config)
            return self._store

    async def put(self, name: str, data: bytes) -> None:
        try:
            await (await self._objects()).put(name, data)
        except (nats.errors.Error, TimeoutError) as exc:
            raise UnavailableError(f"blob put {name}: {exc!r}") from exc

    async def get(self, name: str) -> bytes | None:
        try:
            result = await (await self._objects()).get(name)
        except NotFoundError:  # never put, deleted, or expired
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise UnavailableError(f"blob get {name}: {exc!r}") from exc
        return bytes(result.data or b"")
