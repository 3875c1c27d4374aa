"""StateStore on Redis (or Valkey): one hash per key, every write one atomic Lua script.

Layout, for a store prefix ``p``:

* ``p:{namespace}:{key}``: a hash with the value (``v``) and its revision (``r``),
  expiring ``TTL[namespace]`` after its last write.
* ``p:revision``: the counter every write takes its revision from. One counter,
  not one per key, so a key deleted and created again never gets back a revision
  a stale compare-and-set could still hold.
* channel ``p:{namespace}``: every write publishes ``{len(key)}:{key}{value}``
  there, from inside the same script, for ``watch``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from conveyor.errors import MissingExtraError, RetryableError, UnavailableError
from conveyor.store.base import TTL, Entry, Namespace

try:
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:
    raise MissingExtraError("redis", "redis") from exc

# ARGV: value, condition (put | create | update), expected revision, TTL in ms (0: none), channel, key.
# False (nil to the client) when the condition does not hold: nothing is written or published.
_WRITE = """
local current = redis.call('HGET', KEYS[1], 'r')
if (ARGV[2] == 'create' and current) or (ARGV[2] == 'update' and current ~= ARGV[3]) then
    return false
end
local revision = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'r', revision)
if ARGV[4] ~= '0' then
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
redis.call('PUBLISH', ARGV[5], #ARGV[6] .. ':' .. ARGV[6] .. ARGV[1])
return revision
"""

# How long one wait for a watched write lasts before the next (which runs the client's health check).
_WATCH_POLL = 5.0


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Redis client errors as Conveyor's: the runtime retries both kinds."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise UnavailableError(f"redis {what}: {exc!r}") from exc
    except RedisError as exc:  # a server refusal (OOM, READONLY during failover, ...)
        raise RetryableError(f"redis {what}: {exc!r}") from exc


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStateStore:
    def __init__(self, client: Redis, *, prefix: str = "conveyor") -> None:
        self._client = client
        self.prefix = prefix
        self._write_script = client.register_script(_WRITE)

    @classmethod
    async def open(cls, url: str, **options: Any) -> RedisStateStore:
        # A bounded pool that makes callers wait for a free connection: the default pool fails
        # at once when it is exhausted, which a stage with hundreds of events in flight hits
        # under load (every projector write then failed until its events were dead-lettered).
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=64,
            timeout=10,
            socket_connect_timeout=2,
            socket_timeout=10,
            health_check_interval=30,
            # No client-side retries: a write whose reply was lost may have been applied,
            # and retrying a create would then report our own write as someone else's.
            # The runtime retries the whole step instead.
            retry=Retry(NoBackoff(), 0),
        )
        return cls(Redis.from_pool(pool), **options)  # the client owns the pool: closes it

    def _key(self, ns: Namespace, key: str) -> str:
        return f"{self.prefix}:{ns.value}:{key}"

    def _channel(self, ns: Namespace) -> str:
        return f"{self.prefix}:{ns.value}"

    async def _write(
        self, ns: Namespace, key: str, value: bytes, condition: str, expected: int = 0
    ) -> int | None:
        ttl_ms = int(TTL[ns] * 1000)
        with _translated(f"{condition} {ns}/{key}"):
            revision = await self._write_script(
                keys=[self._key(ns, key), f"{self.prefix}:revision"],
                args=[value, condition, str(expected), str(ttl_ms), self._channel(ns), key],
            )
        return None if revision is None else int(revision)

    async def get(self, ns: Namespace, key: str) -> Entry | None:
        with _translated(f"get {ns}/{key}"):
            value, revision = await self._client.hmget(self._key(ns, key), ["v", "r"])
        if not isinstance(value, bytes) or revision is None:
            return None  # absent (the client returns bytes: it does not decode responses)
        return Entry(value, int(revision))

    async def put(self, ns: Namespace, key: str, value: bytes) -> int:
        revision = await self._write(ns, key, value, "put")
        assert revision is not None  # the script writes a put unconditionally
        return revision

    async def create(self, ns: Namespace, key: str, value: bytes) -> int | None:
        return await self._write(ns, key, value, "create")

    async def update(self, ns: Namespace, key: str, value: bytes, revision: int) -> int | None:
        return await self._write(ns, key, value, "update", revision)

    async def delete(self, ns: Namespace, key: str) -> None:
        with _translated(f"delete {ns}/{key}"):
            await self._client.delete(self._key(ns, key))

    async def keys(self, ns: Namespace) -> list[str]:
        start = len(self._key(ns, ""))
        found: set[str] = set()  # SCAN may return a key twice while the server resizes its table
        with _translated(f"keys {ns}"):
            async for name in self._client.scan_iter(match=_glob_escape(self._key(ns, "")) + "*", count=500):
                found.add(name.decode()[start:])
        return sorted(found)

    async def watch(self, ns: Namespace) -> AsyncIterator[tuple[str, bytes]]:
        # Writes published before the server confirms the subscription are not seen:
        # "after it started" means after the first iteration has subscribed.
        async with self._client.pubsub(ignore_subscribe_messages=True) as pubsub:
            with _translated(f"watch {ns}"):
                await pubsub.subscribe(self._channel(ns))
                while True:
                    message = await pubsub.get_message(timeout=_WATCH_POLL)
                    if message is None or message["type"] != "message":
                        continue
                    length, _, rest = bytes(message["data"]).partition(b":")
                    size = int(length)
                    yield rest[:size].decode(), rest[size:]

    async def ping(self) -> None:
        with _translated("ping"):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    async def delete_all(self) -> None:
        """Remove every key of this prefix, the revision counter too (test isolation)."""
        with _translated("delete_all"):
            names = [name async for name in self._client.scan_iter(match=_glob_escape(self.prefix) + ":*")]
            if names:
                await self._client.delete(*names)
