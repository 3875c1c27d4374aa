"""Claim-check: an event whose payload is over a size limit travels as a reference to a blob.

``ClaimCheckLog`` wraps any EventLog. On publish, a payload over ``limit`` bytes is written to the
blob store under the event's id, first (a reference is never published to a blob not yet
stored), and the event goes on with an empty body and a ``ce-dataref`` attribute (CloudEvents'
dataref extension) naming the blob. Every read (a group's deliveries, a tail, a lookup) puts the
payload back before anyone sees the event, so stages, the projector and the gateway never know.

Event ids are deterministic and events immutable, so a redelivered publish writes the same blob
again under the same name, and a dead letter sent back finds its payload where it was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, Sequence
from datetime import datetime

from conveyor.blobs.base import BlobStore
from conveyor.errors import UnavailableError
from conveyor.events import Envelope
from conveyor.log.base import Delivery, EventLog, Lag, Subscription, Tailed
from conveyor.observability.metrics import BLOB_BYTES

logger = logging.getLogger(__name__)

DATAREF = "ce-dataref"
# What a log comfortably carries in one message; every broker takes this much by default (NATS and
# Kafka refuse messages over 1 MB), and a large message slows every consumer of its topic.
DEFAULT_LIMIT = 64 * 1024
# How long an event waits for redelivery when its blob cannot be read now (the store is down).
_RETRY_AFTER = 1.0


def blob_name(event_id: str) -> str:
    return f"events/{event_id}"


class ClaimCheckLog:
    """An EventLog whose large payloads live in ``blobs``; the inner ``log`` carries the rest."""

    def __init__(self, log: EventLog, blobs: BlobStore, *, limit: int = DEFAULT_LIMIT) -> None:
        self.log = log
        self.blobs = blobs
        self.limit = limit

    async def publish(self, topic: str, events: Sequence[Envelope]) -> None:
        if any(len(event.data) > self.limit for event in events):
            events = await asyncio.gather(*(self.checked(event) for event in events))
        await self.log.publish(topic, events)

    async def checked(self, event: Envelope) -> Envelope:
        """``event`` as it goes on the broker: if its payload is over the limit, that is stored
        (now) and the event refers to it."""
        if len(event.data) <= self.limit:
            return event
        name = blob_name(event.id)
        await self.blobs.put(name, event.data)
        BLOB_BYTES.inc(len(event.data), op="written")
        return dataclasses.replace(event, data=b"", dataref=name)

    async def _claim(self, event: Envelope) -> Envelope:
        """``event`` with its payload back (unchanged if it has none stored, or the blob is gone:
        its ``dataref`` then says so to whoever decodes it)."""
        if not event.dataref:
            return event
        data = await self.blobs.get(event.dataref)
        if data is None:
            return event
        BLOB_BYTES.inc(len(data), op="read")
        return dataclasses.replace(event, data=data, dataref="")

    async def subscribe(self, topic: str, group: str) -> Subscription:
        return _Claiming(await self.log.subscribe(topic, group), self.blobs)

    async def tail(
        self,
        topic: str,
        key: str | None,
        *,
        after: int = 0,
        follow: bool = True,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> AsyncGenerator[Tailed, None]:
        async for tailed in self.log.tail(topic, key, after=after, follow=follow, since=since, until=until):
            if tailed.envelope.dataref:
                tailed = Tailed(tailed.position, await self._claim(tailed.envelope))
            yield tailed

    async def find(self, topic: str, request_id: str) -> Envelope | None:
        event = await self.log.find(topic, request_id)
        return None if event is None else await self._claim(event)

    async def lag(self) -> list[Lag]:
        return await self.log.lag()

    async def ping(self) -> None:
        await self.log.ping()
        await self.blobs.ping()

    async def close(self) -> None:
        try:
            await self.log.close()
        finally:
            await self.blobs.close()


async def as_published(log: EventLog, event: Envelope) -> Envelope:
    """``event`` as ``log`` puts it on the broker (a reference to its payload, stored, if that is too
    large): what to keep when a copy of an event is kept elsewhere (the gateway keeps an
    Idempotency-Key's event, to publish the very same one again), so no copy outgrows the log."""
    return await log.checked(event) if isinstance(log, ClaimCheckLog) else event


class _Claiming:
    """A group member's deliveries with their payloads back. A delivery whose blob cannot be read
    now is handed back to the broker for a moment later, rather than to a handler that would fail
    it; one whose blob is gone is handed over as it is, and decoding it fails (a dead letter)."""

    def __init__(self, subscription: Subscription, blobs: BlobStore) -> None:
        self._subscription = subscription
        self._blobs = blobs

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        deliveries = await self._subscription.fetch(max_messages, timeout)
        claimed = [d for d in deliveries if DATAREF in d.headers]
        if not claimed:
            return deliveries
        readable = await asyncio.gather(*(self._claim(d) for d in claimed))
        later = {id(d) for d, ok in zip(claimed, readable, strict=True) if not ok}
        return [d for d in deliveries if id(d) not in later]

    async def _claim(self, delivery: Delivery) -> bool:
        name = delivery.headers[DATAREF]
        try:
            data = await self._blobs.get(name)
        except UnavailableError as exc:
            logger.warning("event payload %s not readable now, redelivering: %s", name, exc)
            await delivery.nak(_RETRY_AFTER)
            return False
        if data is not None:
            del delivery.headers[DATAREF]
            delivery.body = data
            BLOB_BYTES.inc(len(data), op="read")
        return True

    async def close(self) -> None:
        await self._subscription.close()
