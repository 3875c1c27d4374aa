"""What both HTTP APIs (the job API and the OpenAI-compatible one) do with requests."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import time
from typing import Any

import orjson

from conveyor.events import Envelope, Topic, new_event
from conveyor.gateway.watch import StatusWatch
from conveyor.log.base import EventLog
from conveyor.observability.metrics import REQUESTS_ACCEPTED
from conveyor.payloads import CancelRequested, EventType, RequestAccepted
from conveyor.projector import read_view
from conveyor.store.base import Namespace, StateStore
from conveyor.view import RequestView

SOURCE = "conveyor/gateway"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GatewayLimits:
    max_body_bytes: int = 256 * 1024
    max_prompt_chars: int = 100_000
    max_tokens: int = 8192
    default_max_tokens: int = 256
    max_wait_seconds: float = 60.0  # the status long poll
    max_completion_seconds: float = 600.0  # a non-streaming chat completion


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different body."""


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    replayed: bool  # an Idempotency-Key retry: the request was accepted earlier
    status: str


class GatewayCore:
    def __init__(self, log: EventLog, store: StateStore) -> None:
        self.log, self.store = log, store
        self.watch = StatusWatch(store)
        # Read-your-writes: a request accepted here is "accepted" even before the projector
        # has written its view (a few milliseconds later).
        self._recent: collections.OrderedDict[str, RequestView] = collections.OrderedDict()

    async def accept(
        self,
        payload: RequestAccepted,
        *,
        key: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        fingerprint: Any = None,
    ) -> Accepted:
        """Put the request on the log (durably, when this returns)."""
        event = new_event(
            type=EventType.ACCEPTED,
            source=SOURCE,
            payload=payload,
            deadline=time.time() + timeout if timeout else None,
        )
        rid = event.id
        if key:
            event = dataclasses.replace(event, key=key)
        idem = ""
        if idempotency_key:
            idem = hashlib.sha256(f"default\x00{idempotency_key}".encode()).hexdigest()
            digest = hashlib.sha256(orjson.dumps(fingerprint, option=orjson.OPT_SORT_KEYS)).hexdigest()
            # The event itself is kept with the key: a retry after a failed or timed-out publish
            # (which may have been stored after all) publishes the very same event again, and the
            # log drops it if the first one made it. Deleting the key instead could bill twice.
            record = orjson.dumps(
                {"id": rid, "fingerprint": digest, "headers": event.to_headers(), "body": event.data.decode()}
            )
            if await self.store.create(Namespace.IDEMPOTENCY, idem, record) is None:
                existing = await self.store.get(Namespace.IDEMPOTENCY, idem)
                if existing is not None:
                    return await self._replay(orjson.loads(existing.value), digest)
        await self.log.publish(Topic.REQUESTS, [event])
        REQUESTS_ACCEPTED.inc()
        self._recent[rid] = RequestView(id=rid, stages={"gateway": {"accepted_at": event.time}})
        if len(self._recent) > 10_000:
            self._recent.popitem(last=False)
        return Accepted(rid, False, "accepted")

    async def _replay(self, previous: dict[str, Any], digest: str) -> Accepted:
        """An Idempotency-Key seen before: the same request, published again unless it is known."""
        if previous["fingerprint"] != digest:
            raise IdempotencyConflict
        view = await self.view(previous["id"])
        if view is None:  # its publish failed or is in doubt: the same event again (deduplicated)
            event = Envelope.from_headers(previous["headers"], previous["body"].encode())
            await self.log.publish(Topic.REQUESTS, [event])
        return Accepted(previous["id"], True, view.status if view else "accepted")

    async def view(self, rid: str) -> RequestView | None:
        view = await read_view(self.store, rid) or self._recent.get(rid)
        if view is not None:
            return view
        # Accepted (maybe by another gateway, maybe before a restart) but not projected yet?
        accepted = await self.log.find(Topic.REQUESTS, rid)
        if accepted is None:
            return None
        return RequestView(id=rid, tenant=accepted.tenant, stages={"gateway": {"accepted_at": accepted.time}})

    async def wait(self, rid: str, seconds: float) -> RequestView | None:
        """The view once the request has ended, or as it is after ``seconds``; None if unknown."""
        deadline = time.monotonic() + seconds
        queue: asyncio.Queue[Any] = asyncio.Queue()
        with self.watch.subscribe(rid, queue):  # before the read, so no change can slip between
            view = await self.view(rid)
            while view is not None and not view.terminal and (left := deadline - time.monotonic()) > 0:
                try:
                    async with asyncio.timeout(min(left, 1.0)):
                        _, view = await queue.get()
                except TimeoutError:
                    view = await self.view(rid)  # a safety net for a missed notification
        return view

    async def cancel(self, view: RequestView, reason: str = "client") -> None:
        event = new_event(
            type=EventType.CANCEL, source=SOURCE, payload=CancelRequested(reason=reason), request_id=view.id
        )
        await self.log.publish(Topic.CONTROL, [dataclasses.replace(event, tenant=view.tenant)])
