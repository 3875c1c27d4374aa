"""An in-process EventLog for unit tests and the stage harness (not durable)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import datetime

from conveyor.errors import InvalidEventError
from conveyor.events import Envelope
from conveyor.log.base import Delivery, Lag, Subscription, Tailed, check_bounds


@dataclasses.dataclass(slots=True)
class _Record:
    position: int
    key: str
    headers: dict[str, str]
    body: bytes
    stored: float  # the log's timestamp


@dataclasses.dataclass(slots=True)
class _Group:
    next_index: int = 0
    # position -> (attempt, monotonic time at which it is due again unless acked)
    in_flight: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)


class _Topic:
    def __init__(self) -> None:
        self.records: list[_Record] = []
        self.ids: set[str] = set()
        self.groups: dict[str, _Group] = {}
        self.changed = asyncio.Condition()


class MemoryEventLog:
    """Every topic is a list; groups keep a cursor and an ack deadline per delivered message."""

    def __init__(self, *, ack_wait: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self._topics: dict[str, _Topic] = {}
        self._ack_wait = ack_wait
        self._clock = clock  # the log's timestamps (a test builds a history of past days with it)

    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = _Topic()
        return topic

    async def publish(self, topic: str, events: Sequence[Envelope]) -> None:
        t = self._topic(topic)
        for event in events:
            self.append_raw(topic, event.key, event.to_headers(), event.data, dedupe_id=event.id)
        async with t.changed:
            t.changed.notify_all()

    def append_raw(
        self, topic: str, key: str, headers: dict[str, str], body: bytes, *, dedupe_id: str = ""
    ) -> None:
        """Append a message as any producer could, valid envelope or not (for bad-input tests)."""
        t = self._topic(topic)
        if dedupe_id and dedupe_id in t.ids:
            return
        if dedupe_id:
            t.ids.add(dedupe_id)
        t.records.append(_Record(len(t.records) + 1, key, dict(headers), body, self._clock()))

    def topics(self) -> list[str]:
        return list(self._topics)

    def events(self, topic: str) -> list[Envelope]:
        """The decodable events of ``topic`` in order (for assertions in tests)."""
        out = []
        for record in self._topic(topic).records:
            with contextlib.suppress(InvalidEventError):
                out.append(Envelope.from_headers(record.headers, record.body))
        return out

    async def subscribe(self, topic: str, group: str) -> Subscription:
        t = self._topic(topic)
        return _MemorySubscription(topic, t, t.groups.setdefault(group, _Group()), self._ack_wait)

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
        check_bounds(follow, until)
        t = self._topic(topic)
        index = after
        if since is not None:
            index = max(index, bisect.bisect_left(t.records, since.timestamp(), key=lambda r: r.stored))
        while True:
            end = len(t.records)
            if until is not None:
                end = bisect.bisect_left(t.records, until.timestamp(), key=lambda r: r.stored)
            while index < end:
                record = t.records[index]
                index += 1
                if key is None or record.key == key:
                    yield Tailed(record.position, Envelope.from_headers(record.headers, record.body))
            if not follow:
                return
            async with t.changed:
                while index >= len(t.records):
                    await t.changed.wait()

    async def find(self, topic: str, request_id: str) -> Envelope | None:
        found = None
        for event in self.events(topic):
            if event.request_id == request_id:
                found = event
        return found

    async def lag(self) -> list[Lag]:
        return [
            Lag(name, group, len(t.records) - g.next_index, len(g.in_flight))
            for name, t in sorted(self._topics.items())
            for group, g in sorted(t.groups.items())
        ]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class _MemorySubscription:
    def __init__(self, topic: str, t: _Topic, group: _Group, ack_wait: float) -> None:
        self._name, self._t, self._g, self._ack_wait = topic, t, group, ack_wait

    def _take(self, limit: int) -> list[Delivery]:
        now = time.monotonic()
        out: list[Delivery] = []
        for position, (attempt, due) in list(self._g.in_flight.items()):
            if len(out) < limit and due <= now:
                out.append(self._deliver(position, attempt + 1))
        while len(out) < limit and self._g.next_index < len(self._t.records):
            self._g.next_index += 1
            out.append(self._deliver(self._g.next_index, 1))
        return out

    def _deliver(self, position: int, attempt: int) -> Delivery:
        self._g.in_flight[position] = (attempt, time.monotonic() + self._ack_wait)
        record = self._t.records[position - 1]

        async def ack() -> None:
            self._g.in_flight.pop(position, None)

        async def nak(delay: float) -> None:
            if position in self._g.in_flight:
                self._g.in_flight[position] = (attempt, time.monotonic() + delay)

        async def progress() -> None:
            await nak(self._ack_wait)

        return Delivery(
            topic=self._name,
            headers=dict(record.headers),
            body=record.body,
            attempt=attempt,
            position=position,
            _ack=ack,
            _nak=nak,
            _progress=progress,
        )

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            taken = self._take(max_messages)
            if taken:
                return taken
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            async with self._t.changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._t.changed.wait(), timeout=min(remaining, 0.05))

    async def close(self) -> None:
        return None
