"""Test helpers that are part of the product: in-memory backends and a one-stage harness.

harness = StageHarness(prepare_stage())
outputs = await harness.handle(event)        # what the stage published, by topic
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from conveyor.events import Envelope
from conveyor.log.memory import MemoryEventLog
from conveyor.pipeline import Stage
from conveyor.runtime.worker import StageWorker
from conveyor.store.memory import MemoryStateStore


class StageHarness:
    """Runs one stage, with the real runtime, on in-memory backends."""

    def __init__(
        self, stage: Stage, *, log: MemoryEventLog | None = None, store: MemoryStateStore | None = None
    ) -> None:
        self.stage = stage
        self.log = log or MemoryEventLog()
        self.store = store or MemoryStateStore()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[StageWorker]:
        """The stage consuming its topics until the block ends (then it drains)."""
        stop = asyncio.Event()
        worker = StageWorker(self.stage, self.log, self.store)
        task = asyncio.create_task(worker.run(stop))
        await worker.ready.wait()
        try:
            yield worker
        finally:
            stop.set()
            await task

    def published(self, topic: str) -> list[Envelope]:
        """Every event on ``topic`` so far, in order."""
        return self.log.events(topic)

    async def handle(self, event: Envelope, *, topic: str | None = None) -> dict[str, list[Envelope]]:
        """Publish ``event`` to the stage's topic, wait until it is handled; the new events by topic."""
        topic = topic or self.stage.consumes[0]
        before = {name: len(self.log.events(name)) for name in self.log.topics()}
        async with self.running() as worker:
            await self.log.publish(topic, [event])
            await worker.idle()
        out: dict[str, list[Envelope]] = collections.defaultdict(list)
        for name in self.log.topics():
            out[name].extend(self.log.events(name)[before.get(name, 0) :])
        out[topic] = out[topic][1:] if out[topic][:1] == [event] else out[topic]
        return dict(out)
