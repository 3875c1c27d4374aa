"""Many time limits of one length, kept by one sweep instead of a loop timer each.

``asyncio.timeout`` and ``wait_for`` arm a loop timer per call; under uvloop each is a libuv
timer handle, and arming and disarming them cost more CPU than some of the calls they guarded
(a JetStream publish, a quick stage handler). When every item has the same limit, items added
in order fall due in order: one task that wakes a few times per limit and stops at the first
item not yet due does the work of all the timers, and sleeps while there is nothing to watch.
An item expires at most a quarter of the limit late (and never more than ``max_late``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Expiry(Generic[K]):
    """Keys that expire ``seconds`` after ``add`` unless discarded first; ``on_expire(key)`` is
    called, in the loop, for each one that does."""

    def __init__(self, seconds: float, on_expire: Callable[[K], None], *, max_late: float = math.inf) -> None:
        self.seconds = seconds
        self._on_expire = on_expire
        self._resolution = min(max_late, seconds / 4)
        self._due: dict[K, float] = {}  # in the order added, which with one length is the order due
        self._wake = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None

    def add(self, key: K) -> None:
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        if not self._due:
            self._wake.set()
        self._due[key] = loop.time() + self.seconds

    def discard(self, key: K) -> None:
        self._due.pop(key, None)

    def __len__(self) -> int:
        return len(self._due)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._due:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self._resolution)
            now, due = loop.time(), []
            for key, deadline in self._due.items():
                if deadline > now:
                    break
                due.append(key)
            for key in due:  # (not while iterating: on_expire may discard others)
                if self._due.pop(key, None) is not None:
                    self._on_expire(key)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
