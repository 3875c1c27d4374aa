"""Handler timeouts for many concurrent calls: a stage's limits are one ``Expiry``
(``conveyor.expiry``), so a call that overruns is cancelled and raises ``TimeoutError`` at most a
quarter of its timeout late (and never later than 0.1 s), without a loop timer per call.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from conveyor.expiry import Expiry


class Deadlines:
    """Time limits of one length for calls made in any task of the running loop."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed: Expiry[Limit] = Expiry(seconds, Limit.expire, max_late=0.1)

    def limit(self) -> Limit:
        """``async with deadlines.limit():`` raises TimeoutError if its body overruns."""
        return Limit(self)

    async def close(self) -> None:
        await self.armed.close()


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
        self._deadlines.armed.add(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._deadlines.armed.discard(self)
        assert self._task is not None
        if self._expired:
            # As asyncio.timeout does: only our own cancellation becomes a TimeoutError; one that
            # came from outside at the same time (a stopping worker) stays a cancellation.
            ours = self._task.uncancel() <= self._cancelling
            if ours and exc_type is asyncio.CancelledError:
                raise TimeoutError(f"exceeded {self._deadlines.seconds} s") from exc
