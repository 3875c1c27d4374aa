"""BlobStore on a JetStream object store: the default beside the NATS log, on the same servers.

Blobs are written by nats-py's object store (chunks, then a meta message naming them and their
digest) and read by direct gets of the same messages: nats-py reads an object through an ephemeral
consumer, which a cluster creates and deletes by consensus, for every read.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

import nats
import orjson
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import BucketNotFoundError
from nats.js.object_store import ObjectStore

from conveyor.errors import UnavailableError
from conveyor.jetstream import JetStreamBackend

_WEEK = 7 * 86_400.0


class NatsBlobStore(JetStreamBackend):
    """One bucket (``<prefix>_blobs``) whose objects expire after ``max_age`` (the log's retention),
    replicated like the log's streams."""

    client_name = "conveyor-blobs"

    def __init__(
        self, nc: Client, *, prefix: str = "conveyor", replicas: int = 1, max_age: float = _WEEK
    ) -> None:
        super().__init__(nc, replicas=replicas)
        self.bucket = f"{prefix}_blobs"
        self._direct = f"$JS.API.DIRECT.GET.OBJ_{self.bucket}"
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
        await self._objects()
        what = f"blob get {name}"
        meta = f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
        found = await self._direct_get(self._direct, orjson.dumps({"last_by_subj": meta}), what=what)
        if found is None:
            return None  # never put, or expired
        info = orjson.loads(found.data)
        if info.get("deleted"):
            return None
        chunks, data, seq = f"$O.{self.bucket}.C.{info['nuid']}", bytearray(), 0
        for _ in range(info.get("chunks") or 0):
            asked = orjson.dumps({"seq": seq + 1, "next_by_subj": chunks})
            chunk = await self._direct_get(self._direct, asked, what=what)
            if chunk is None:  # its chunks expired before its meta message
                return None
            data += chunk.data
            seq = int((chunk.headers or {})["Nats-Sequence"])
        digest = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        if len(data) != info.get("size", 0) or digest != info.get("digest"):
            raise UnavailableError(f"{what}: its chunks do not add up to what its meta message says")
        return bytes(data)
