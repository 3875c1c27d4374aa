"""A slice of the log's history: the events of a time window and a tenant, each request's once.

The window's start and end are looked up by time in the log (``EventLog.tail(since=…,
until=…)``), so a report on last week reads last week, not the whole topic around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncGenerator
from datetime import datetime, timedelta

from conveyor.events import Envelope
from conveyor.log.base import EventLog

CLOCK_SKEW = timedelta(minutes=5)  # how far a producer's clock may be from the log's


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    """Events of [since, until) (by their time), of ``tenant``; the first ``limit`` requests."""

    since: datetime | None = None
    until: datetime | None = None
    tenant: str | None = None
    limit: int | None = None

    def admits(self, event: Envelope) -> bool:
        if self.tenant is not None and event.tenant != self.tenant:
            return False
        at = datetime.fromisoformat(event.time)
        return (self.since is None or at >= self.since) and (self.until is None or at < self.until)


async def each_request(
    log: EventLog, topic: str, event_type: str, window: Window
) -> AsyncGenerator[Envelope, None]:
    """The ``event_type`` events on ``topic`` in ``window``, oldest first, one per request: an event
    published again after the log's duplicate window (a retried submit, a redone stage) is stored
    twice, and only the first counts."""
    seen: set[str] = set()
    # The log finds the window's bounds by its own timestamps; an event's time is its producer's
    # clock, which may run ahead of the log's or behind it: read a little more on both sides.
    start = None if window.since is None else window.since - CLOCK_SKEW
    end = None if window.until is None else window.until + CLOCK_SKEW
    async with contextlib.aclosing(log.tail(topic, None, follow=False, since=start, until=end)) as tailed:
        async for item in tailed:
            event = item.envelope
            if event.type != event_type or event.request_id in seen or not window.admits(event):
                continue
            seen.add(event.request_id)
            yield event
            if window.limit is not None and len(seen) >= window.limit:
                return
