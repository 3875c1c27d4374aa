"""Handler timeouts for many concurrent calls, kept by one sweep instead of a timer each.

``asyncio.timeout`` arms a loop timer per call; under uvloop each is a libuv timer
handle, and a stage spent more CPU arming and disarming them than running some of its
handlers. A handler's timeout is seconds long, so checking a few times per timeout is
precise enough: a call that overruns is cancelled and raises ``TimeoutError`` at most a
quarter of its timeout late (and never later than 0.1 s).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class Deadlines:
    """Time limits of one length for calls made in any task of the running loop."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._resolution = min(0.1, seconds / 4)
        # Armed in the order entered, which with one length is the order they fall due.
        self._armed: dict[Limit, float] = {}
        self._wake = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None

    def limit(self) -> Limit:
        """``async with deadlines.limit():`` raises TimeoutError if its body overruns."""
        return Limit(self)

    def _arm(self, limit: Limit) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        if not self._armed:
            self._wake.set()
        self._armed[limit] = asyncio.get_running_loop().time() + self.seconds

    def _disarm(self, limit: Limit) -> None:
        self._armed.pop(limit, None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._armed:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self._resolution)
            now, due = loop.time(), []
            for limit, deadline in self._armed.items():
                if deadline > now:
                    break
                due.append(limit)
            for limit in due:
                del self._armed[limit]
                limit.expire()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None


class Limit:
    """One call's time limit (see ``Deadlines.limit``)."""

    __slots__ = ("_cancelling", "_deadlines", "_expired", "_task")

    def __init__(self, deadlines: Deadlines) -> None:
        self._deadlines = deadlines
        self._expired = False
        self._cancelling = 0
        self._task: asyncio.Task[object] | None = None

    def expire(self) -> None:
        if self._task is not None and not self._task.done():
            self._expired = True
            self._task.cancel()

    async def __aenter__(self) -> Limit:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a time limit needs a running task")
        self._task, self._cancelling = task, task.cancelling()
        self._deadlines._arm(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._deadlines._disarm(self)
        assert self._task is not None
        if self._expired:
            # As asyncio.timeout does: only our own cancellation becomes a TimeoutError; one that
            # came from outside at the same time (a stopping worker) stays a cancellation.
            ours = self._task.uncancel() <= self._cancelling
            if ours and exc_type is asyncio.CancelledError:
                raise TimeoutError(f"exceeded {self._deadlines.seconds} s") from exc
