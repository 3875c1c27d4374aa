"""Opening the log and the store named by a URL; each adapter is imported only when used."""

from __future__ import annotations

from urllib.parse import urlsplit

from conveyor.log.base import EventLog
from conveyor.store.base import StateStore


async def open_log(url: str, *, prefix: str = "conveyor", ack_wait: float = 10.0) -> EventLog:
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
