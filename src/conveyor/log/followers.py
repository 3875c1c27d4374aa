"""One read of a topic, shared by every tail that follows one of its keys.

An SSE stream follows its request's chunks. A broker consumer per stream costs the broker (and on
Kafka a client with threads of its own) for as long as the stream is open, so a log reads the
topic once per process and hands each record to the tails that follow its key. It also keeps
what it read for ``keep`` seconds: a key created after that read began, recently enough that none
of its records has been dropped since, has its whole history there (a stream opened as its
request runs), and its tail needs no read of its own (the Kafka log keeps 30 s: reading a key's
history there takes a consumer; the NATS log, whose lookups the server answers, keeps nothing).

A tail listens before it reads any history elsewhere: what is written after that reaches it here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
Arrivals = asyncio.Queue[R | Exception]  # a record, or the shared read's failure


class Followers(Generic[K, R]):
    """Records ``R`` by key ``K``, from a read that takes every record written since ``since_ms``.

    A record is written at most ``skew_ms`` before the time of the key it belongs to (a request
    id's time and the broker's or this process's clock are different clocks)."""

    def __init__(
        self,
        *,
        since_ms: int = 0,
        skew_ms: int = 0,
        keep: float = 0.0,  # seconds; 0 keeps nothing, and a tail always reads its own history
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._since_ms, self._skew_ms, self._keep, self._clock = since_ms, skew_ms, keep, clock
        self._listeners: dict[K, set[asyncio.Queue[R | Exception]]] = {}
        self._kept: dict[K, collections.deque[R]] = {}
        self._arrivals: collections.deque[tuple[float, K]] = collections.deque()  # to drop in order

    @contextlib.contextmanager
    def listen(self, key: K, created_ms: int | None) -> Iterator[tuple[Arrivals[R], list[R] | None]]:
        """The key's records from now on (or the read's failure), and those kept of it: all of its
        history when it was created at ``created_ms`` (None: unknown) after this read began and
        nothing of it was dropped yet; else None, and the caller reads the history itself."""
        queue: asyncio.Queue[R | Exception] = asyncio.Queue()
        self._listeners.setdefault(key, set()).add(queue)
        oldest_kept = int((self._clock() - self._keep) * 1000)
        whole = (
            self._keep > 0
            and created_ms is not None
            and created_ms - self._skew_ms >= max(self._since_ms, oldest_kept)
        )
        try:
            yield queue, list(self._kept.get(key, ())) if whole else None
        finally:
            listeners = self._listeners[key]
            listeners.discard(queue)
            if not listeners:
                del self._listeners[key]

    def deliver(self, key: K, record: R) -> None:
        """Keep ``record`` (unless ``keep`` is 0) and hand it to the key's listeners."""
        if self._keep:
            now = self._clock()
            self._kept.setdefault(key, collections.deque()).append(record)
            self._arrivals.append((now, key))
            while self._arrivals[0][0] < now - self._keep:
                _, old = self._arrivals.popleft()
                records = self._kept[old]
                records.popleft()
                if not records:
                    del self._kept[old]
        for queue in self._listeners.get(key, ()):
            queue.put_nowait(record)

    def fail(self, error: Exception) -> None:
        """The read broke: every listener gets ``error`` (and reads again, through another)."""
        for listeners in self._listeners.values():
            for queue in listeners:
                queue.put_nowait(error)
