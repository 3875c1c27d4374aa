"""The EventLog seam: a durable, partitioned, replayable log of envelopes."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Protocol

from conveyor.errors import InvalidEventError
from conveyor.events import Envelope


@dataclasses.dataclass(slots=True, kw_only=True)
class Delivery:
    """One message handed to a consumer group member; it must be acked or nacked.

    ``attempt`` is 1 on the first delivery and grows on every redelivery by the
    broker (after a crash or an expired ack deadline).
    """

    topic: str
    headers: dict[str, str]
    body: bytes
    attempt: int
    position: int
    _ack: Callable[[], Awaitable[None]]
    _nak: Callable[[float], Awaitable[None]]
    _progress: Callable[[], Awaitable[None]]

    _decoded: Envelope | InvalidEventError | None = None

    def envelope(self) -> Envelope:
        """Decode the envelope (once); raises InvalidEventError for a foreign or malformed message."""
        if self._decoded is None:
            try:
                self._decoded = Envelope.from_headers(self.headers, self.body)
            except InvalidEventError as exc:
                self._decoded = exc
            else:
                if self._decoded.dataref:  # log/claim_check.py puts the payload back when it can
                    self._decoded = InvalidEventError(
                        f"its payload is in the blob store as {self._decoded.dataref}, and"
                        " that blob is gone (or this process has no blob store: --blob-url)"
                    )
        if isinstance(self._decoded, InvalidEventError):
            raise self._decoded
        return self._decoded

    def try_envelope(self) -> Envelope | None:
        try:
            return self.envelope()
        except InvalidEventError:
            return None

    async def ack(self) -> None:
        await self._ack()

    async def nak(self, delay: float = 0.0) -> None:
        """Give the message back for redelivery, after ``delay`` seconds."""
        await self._nak(delay)

    async def in_progress(self) -> None:
        """Still working on it: restart the ack deadline so the broker does not redeliver."""
        await self._progress()


@dataclasses.dataclass(frozen=True, slots=True)
class Tailed:
    """An event read by ``tail`` with its position in the topic (resume after it)."""

    position: int
    envelope: Envelope


@dataclasses.dataclass(frozen=True, slots=True)
class Lag:
    """How far a consumer group is behind on a topic: what autoscaling watches."""

    topic: str
    group: str
    pending: int  # in the topic, not yet delivered to the group
    in_flight: int  # delivered, not yet acknowledged
    partition: int | None = None  # set by partitioned logs (Kafka), which report each partition


def check_bounds(follow: bool, until: datetime | None) -> None:
    """A tail that follows waits for new events and has no end: ``until`` is refused there."""
    if follow and until is not None:
        raise ValueError("until ends a tail that does not follow; pass follow=False")


class Subscription(Protocol):
    """A member of a durable consumer group on one topic."""

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries; an empty list if none arrive within ``timeout``."""
        ...

    async def close(self) -> None: ...


class EventLog(Protocol):
    """Append-only topics of envelopes, partitioned by ``Envelope.key``.

    Contract (checked by tests/conformance/test_event_log.py against every backend):
    * ``publish`` returns once every event is durably stored, in order;
      an event whose ``id`` was already published recently is stored only once.
    * members of one ``group`` share a topic's messages; every group sees every message;
      an unacked message is redelivered (to any member) with a higher ``attempt`` once
      its ack deadline passes; ``in_progress`` restarts that deadline.
    * ``tail`` reads the events of one key (or of all keys, for None), in order, from
      just after position ``after``, without joining any group; with ``follow`` it
      waits for new events, without it it stops at the current end. With ``since`` it
      starts at the first event the log stored at or after that time (by the log's own
      timestamps), found by lookup rather than by reading what came before; with ``until``
      (not following) it stops before the first one stored at or after that time.
    * ``find`` returns a request's latest event on a topic (or None) by direct lookup.
    """

    async def publish(self, topic: str, events: Sequence[Envelope]) -> None: ...

    async def subscribe(self, topic: str, group: str) -> Subscription: ...

    def tail(
        self,
        topic: str,
        key: str | None,
        *,
        after: int = 0,
        follow: bool = True,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> AsyncGenerator[Tailed, None]: ...

    async def find(self, topic: str, request_id: str) -> Envelope | None:
        """The latest event of ``request_id`` on ``topic``, without scanning the topic."""
        ...

    async def lag(self) -> list[Lag]:
        """Every consumer group's backlog on every topic of this log."""
        ...

    async def ping(self) -> None:
        """Raise UnavailableError if the log cannot be reached."""
        ...

    async def close(self) -> None: ...
