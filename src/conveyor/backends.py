"""Opening the log and the store named by a URL; each adapter is imported only when used."""

from __future__ import annotations

from urllib.parse import urlsplit

from conveyor.blobs.base import BlobStore
from conveyor.log.base import EventLog
from conveyor.log.claim_check import DEFAULT_LIMIT, ClaimCheckLog
from conveyor.store.base import StateStore

# How long blobs are kept: as long as the log keeps the events that refer to them.
BLOB_MAX_AGE = 7 * 86_400.0


async def open_log(
    url: str,
    *,
    prefix: str = "conveyor",
    ack_wait: float = 10.0,
    blob_url: str | None = None,
    max_event_bytes: int = DEFAULT_LIMIT,
) -> EventLog:
    """The log at ``url``; with ``blob_url``, payloads over ``max_event_bytes`` go to that blob store."""
    log = await _open_log(url, prefix=prefix, ack_wait=ack_wait)
    if blob_url is None:
        return log
    try:
        blobs = await open_blobs(blob_url, prefix=prefix)
    except BaseException:
        await log.close()
        raise
    return ClaimCheckLog(log, blobs, limit=max_event_bytes)


async def _open_log(url: str, *, prefix: str, ack_wait: float) -> EventLog:
    scheme = urlsplit(url).scheme
    if scheme == "nats":
        from conveyor.log.nats import NatsEventLog

        return await NatsEventLog.open(url, prefix=prefix, ack_wait=ack_wait)
    if scheme == "kafka":
        from conveyor.log.kafka import KafkaEventLog

        return await KafkaEventLog.open(url, prefix=prefix, ack_wait=ack_wait)
    if scheme == "memory":
        from conveyor.log.memory import MemoryEventLog

        return MemoryEventLog(ack_wait=ack_wait)
    raise ValueError(
        f"unsupported log URL {url!r}: use nats://HOST:PORT, kafka://HOST:PORT[?partitions=N]"
        " (or memory:// in one process)"
    )


async def open_blobs(url: str, *, prefix: str = "conveyor") -> BlobStore:
    scheme = urlsplit(url).scheme
    if scheme == "nats":
        from conveyor.blobs.nats import NatsBlobStore

        return await NatsBlobStore.open(url, prefix=prefix, max_age=BLOB_MAX_AGE)
    if scheme in ("s3", "s3a", "gs", "az", "abfs", "abfss", "file"):
        from conveyor.blobs.object_storage import ObjectStorageBlobs

        return ObjectStorageBlobs(url, max_age=BLOB_MAX_AGE)
    if scheme == "memory":
        from conveyor.blobs.memory import MemoryBlobStore

        return MemoryBlobStore()
    raise ValueError(
        f"unsupported blob store URL {url!r}: use nats://HOST:PORT, s3://BUCKET/PREFIX, gs://…, az://…,"
        " file:///DIRECTORY (or memory:// in one process)"
    )


async def open_store(url: str, *, prefix: str = "conveyor") -> StateStore:
    scheme = urlsplit(url).scheme
    if scheme == "nats":
        from conveyor.store.nats_kv import NatsStateStore

        return await NatsStateStore.open(url, prefix=prefix)
    if scheme in ("redis", "rediss"):
        from conveyor.store.redis import RedisStateStore

        return await RedisStateStore.open(url, prefix=prefix)
    if scheme == "memory":
        from conveyor.store.memory import MemoryStateStore

        return MemoryStateStore()
    raise ValueError(
        f"unsupported store URL {url!r}: use nats://HOST:PORT, redis://HOST:PORT/DB"
        " (or memory:// in one process)"
    )
