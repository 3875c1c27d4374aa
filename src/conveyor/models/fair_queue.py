"""Requests waiting for a model's slots: the most urgent first, and tenants taking turns.

Within one priority, the tenant served longest ago goes next, and each tenant's requests go in the
order they came: a tenant with hundreds queued does not make another tenant's one request wait for
all of them. Thread-safe: the event loop puts, the engine's thread gets.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._waiting: dict[tuple[float, str], collections.deque[tuple[int, T]]] = {}
        self._served: dict[str, int] = {}  # tenant -> the turn it was last served at
        self._arrivals, self._turns = itertools.count(), itertools.count()
        self._closed = False

    def put(self, item: T, *, priority: float, tenant: str) -> None:
        with self._ready:
            self._waiting.setdefault((priority, tenant), collections.deque()).append(
                (next(self._arrivals), item)
            )
            self._ready.notify()

    def close(self) -> None:
        """No more puts: ``get`` returns None once what was put before is taken."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def get(self, *, block: bool) -> T | None:
        """The next item; None once closed and empty; queue.Empty if empty and not ``block``."""
        with self._ready:
            while not self._waiting:
                if self._closed:
                    return None
                if not block:
                    raise queue.Empty
                self._ready.wait()
            urgent = min(priority for priority, _ in self._waiting)
            key = min(
                (key for key in self._waiting if key[0] == urgent),
                key=lambda key: (self._served.get(key[1], -1), self._waiting[key][0][0]),
            )
            waiting = self._waiting[key]
            _, item = waiting.popleft()
            if not waiting:
                del self._waiting[key]
            self._served[key[1]] = next(self._turns)
            return item
