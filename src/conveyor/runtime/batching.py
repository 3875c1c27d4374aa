"""Dynamic batching: gather the head events of several lanes into one ``handle_batch`` call.

Each lane still hands over one event at a time, so per-key order holds; the batcher only
decides when a group of lanes' events leaves together (size reached, or the first one has
waited ``max_wait``), and hands each lane its own event's result as soon as the batch
handler yields it, so a short request does not wait for the longest one of its batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from conveyor.errors import RetryableError
from conveyor.events import Envelope
from conveyor.observability.metrics import BATCH_LIMIT, BATCH_SIZE, BATCH_WAIT
from conveyor.pipeline import BatchHandler, BatchPolicy, Output, StageContext

logger = logging.getLogger("conveyor.runtime")


class BatchFailed(RetryableError):
    """The batch call failed as a whole: it does not say which event is to blame, so each
    event is tried again on its own (a poison event then fails alone)."""


@dataclasses.dataclass(slots=True)
class _Waiting:
    event: Envelope
    result: asyncio.Future[Sequence[Output]]
    since: float


class Batcher:
    """Collects events submitted by lanes and runs them through ``handle`` in batches."""

    def __init__(
        self,
        stage: str,
        handle: BatchHandler,
        ctx: StageContext,
        policy: BatchPolicy,
        *,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stage, self._handle, self._ctx, self._policy = stage, handle, ctx, policy
        self._timeout, self._clock = timeout, clock
        self._waiting: list[_Waiting] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.limit = 1 if policy.target_latency is not None else policy.max_size
        BATCH_LIMIT.set(self.limit, stage=stage)

    async def submit(self, event: Envelope) -> Sequence[Output]:
        """The outputs of ``event`` once its batch handled it; raises its error otherwise."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(event, loop.create_future(), self._clock())
        self._waiting.append(waiting)
        if len(self._waiting) >= self.limit:
            self._send()
        elif self._timer is None:
            self._timer = loop.call_later(self._policy.max_wait, self._send)
        return await waiting.result

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = [w for w in self._waiting if not w.result.done()]  # a lane may have been cancelled
        self._waiting = []
        if batch:
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Waiting]) -> None:
        started = self._clock()
        BATCH_SIZE.observe(len(batch), stage=self._stage)
        for waiting in batch:
            BATCH_WAIT.observe(started - waiting.since, stage=self._stage)
        try:
            async with asyncio.timeout(self._timeout):
                async for index, result in self._handle(self._ctx, [w.event for w in batch]):
                    future = batch[index].result
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        except asyncio.CancelledError:
            for waiting in batch:
                waiting.result.cancel()
            raise
        except Exception as exc:
            logger.warning("stage %s: a batch of %d failed: %r", self._stage, len(batch), exc)
            error = exc if len(batch) == 1 else BatchFailed(f"its batch failed: {exc!r}")
            for waiting in batch:
                if not waiting.result.done():
                    waiting.result.set_exception(error)
        finally:
            for waiting in batch:
                if not waiting.result.done():
                    waiting.result.set_exception(RuntimeError("the batch handler gave no result for it"))
        self._adapt(len(batch), self._clock() - started)

    def _adapt(self, size: int, took: float) -> None:
        """Additive increase while full batches meet the target, halve when one misses it."""
        target = self._policy.target_latency
        if target is None:
            return
        if took > target:
            self.limit = max(1, self.limit // 2)
        elif size >= self.limit:
            self.limit = min(self._policy.max_size, self.limit + 1)
        BATCH_LIMIT.set(self.limit, stage=self._stage)

    async def close(self) -> None:
        """Stop batches still running (the worker is shutting down and hands their events back)."""
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
