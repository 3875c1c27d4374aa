"""StateStore on JetStream key-value: one bucket per namespace."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as JsNotFound
from nats.js.kv import KeyValue

from conveyor.errors import UnavailableError
from conveyor.jetstream import WRONG_LAST_SEQUENCE, JetStreamBackend, PublishRefused, stored
from conveyor.store.base import TTL, Entry, Namespace

# The keys JetStream key-value accepts (as nats-py checks them).
_VALID_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")


class NatsStateStore(JetStreamBackend):
    client_name = "conveyor-store"

    def __init__(self, nc: Client, *, prefix: str = "conveyor", replicas: int = 1) -> None:
        super().__init__(nc, replicas=replicas)
        self._prefix = prefix
        self._buckets: dict[Namespace, KeyValue] = {}
        self._lock = asyncio.Lock()

    def bucket_name(self, ns: Namespace) -> str:
        return f"{self._prefix}_{ns.value}"

    async def _kv(self, ns: Namespace) -> KeyValue:
        kv = self._buckets.get(ns)
        if kv is not None:
            return kv
        async with self._lock:
            if ns not in self._buckets:
                try:
                    self._buckets[ns] = await self._js.key_value(self.bucket_name(ns))
                except (JsNotFound, nats.js.errors.BucketNotFoundError):
                    config = api.KeyValueConfig(
                        bucket=self.bucket_name(ns),
                        history=1,
                        ttl=TTL[ns] or None,
                        storage=api.StorageType.FILE,
                        direct=True,  # reads served by any replica, without the JSON API round trip
                        replicas=self.replicas,
                    )
                    self._buckets[ns] = await self._js.create_key_value(config)
        return self._buckets[ns]

    async def get(self, ns: Namespace, key: str) -> Entry | None:
        # A direct get of the key's last message (the buckets allow direct reads): one request,
        # answered by any replica, without nats-py's per-call task and entry objects.
        self._check(ns, key)
        await self._kv(ns)
        bucket = self.bucket_name(ns)
        subject = f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{key}"
        reply = await self._direct_get(subject, what=f"store get {ns}/{key}")
        if reply is None:
            return None
        headers = reply.headers or {}
        if headers.get("KV-Operation") or headers.get("Nats-Marker-Reason"):
            return None  # a delete, purge or expiry marker
        return Entry(reply.data, int(headers["Nats-Sequence"]))

    @staticmethod
    def _check(ns: Namespace, key: str) -> None:
        if not _VALID_KEY.match(key):
            raise ValueError(f"invalid key {key!r} for {ns}")

    async def _write(self, ns: Namespace, key: str, value: bytes, last: int | None) -> int | None:
        """Store ``value`` under ``key`` (only if its revision is ``last``, 0: absent, when given);
        the new revision, or None if ``last`` was not the key's revision."""
        self._check(ns, key)
        await self._kv(ns)
        headers = None if last is None else {"Nats-Expected-Last-Subject-Sequence": str(last)}
        try:
            (ack,) = await self._heard([(f"$KV.{self.bucket_name(ns)}.{key}", value, headers)])
            return stored(ack)
        except PublishRefused as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return None
            raise UnavailableError(f"store write {ns}/{key}: {exc!r}") from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise UnavailableError(f"store write {ns}/{key}: {exc!r}") from exc

    async def put(self, ns: Namespace, key: str, value: bytes) -> int:
        revision = await self._write(ns, key, value, None)
        assert revision is not None  # an unconditional write has no expectation to miss
        return revision

    async def create(self, ns: Namespace, key: str, value: bytes) -> int | None:
        revision = await self._write(ns, key, value, 0)
        if revision is not None:
            return revision
        # Taken, or only a delete marker left (which nats-py's create knows to replace).
        kv = await self._kv(ns)
        try:
            return int(await kv.create(key, value))
        except KeyWrongLastSequenceError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise UnavailableError(f"store create {ns}/{key}: {exc!r}") from exc

    async def update(self, ns: Namespace, key: str, value: bytes, revision: int) -> int | None:
        return await self._write(ns, key, value, revision)

    async def delete(self, ns: Namespace, key: str) -> None:
        kv = await self._kv(ns)
        await kv.purge(key)

    async def keys(self, ns: Namespace) -> list[str]:
        # Not nats-py's kv.keys(): it decides it has seen everything from a race with its own
        # consumer and intermittently returned no keys for a bucket of 500. Here: the last
        # message of every subject, headers only, counted against the consumer's own pending.
        await self._kv(ns)
        prefix = f"$KV.{self.bucket_name(ns)}."
        sub = await self._js.pull_subscribe(
            prefix + ">",
            stream=f"KV_{self.bucket_name(ns)}",
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                headers_only=True,
                ack_policy=api.AckPolicy.NONE,
                inactive_threshold=30.0,
            ),
        )
        try:
            remaining = (await sub.consumer_info()).num_pending or 0
            keys: list[str] = []
            while remaining > 0:
                for msg in await sub.fetch(min(remaining, 512), timeout=10):
                    remaining -= 1
                    headers = msg.headers or {}
                    if not (headers.get("KV-Operation") or headers.get("Nats-Marker-Reason")):
                        keys.append(msg.subject[len(prefix) :])  # not deleted, purged or expired
            return keys
        finally:
            await sub.unsubscribe()

    async def watch(self, ns: Namespace) -> AsyncIterator[tuple[str, bytes]]:
        # An ordered consumer of new messages only: it sees the writes the bucket stored,
        # not the refused creates and updates a core subscription on its subjects also sees,
        # and it exists on the server once subscribe returns.
        await self._kv(ns)
        prefix = f"$KV.{self.bucket_name(ns)}."
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            if msg.headers and (msg.headers.get("KV-Operation") or msg.headers.get("Nats-Marker-Reason")):
                return  # a delete, purge or expiry marker
            queue.put_nowait((msg.subject[len(prefix) :], msg.data))

        sub = await self._js.subscribe(
            prefix + ">",
            stream=f"KV_{self.bucket_name(ns)}",
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.NEW,
        )
        try:
            while True:
                yield await queue.get()
        finally:
            await sub.unsubscribe()

    async def delete_buckets(self) -> None:
        """Remove every bucket of this prefix (test isolation)."""
        for ns in list(self._buckets):
            await self._js.delete_key_value(self.bucket_name(ns))
        self._buckets.clear()
