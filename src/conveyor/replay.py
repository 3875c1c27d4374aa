"""Replay: requests from the log's history answered again, by another model, beside their old answers.

The requests are read from [requests] (the log keeps every one, as it was accepted) and
each one's old answer from [completed]. They then go through the pipeline's own stages
(prepare, generate, finalize and the projector) in this process, on in-memory backends: the
running pipeline, its topics, views and usage ledger are not touched, nobody is billed
twice, and the model is whichever this process was given, whichever model a request named.
Deadlines are dropped (they belonged to the original callers).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from conveyor.events import Envelope, Topic
from conveyor.gateway.watch import StatusWatch
from conveyor.history import Window, each_request
from conveyor.log.base import EventLog
from conveyor.log.memory import MemoryEventLog
from conveyor.payloads import EventType, RequestCompleted, RequestFailed, RequestPrepared, decode
from conveyor.pipeline import Pipeline
from conveyor.runtime.worker import StageWorker
from conveyor.store.memory import MemoryStateStore
from conveyor.view import RequestView


@dataclasses.dataclass(frozen=True, slots=True)
class Replayed:
    """One request answered again: its prompt as the model saw it, the old answer and the new one."""

    request_id: str
    prompt: str
    before: dict[str, Any] | None  # None: the log holds no final answer for it
    after: RequestView

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "prompt": self.prompt,
            "before": self.before,
            "after": self.after.public(),
        }


async def history(log: EventLog, window: Window) -> list[Envelope]:
    """The requests accepted in ``window``, oldest first, each once."""
    return [e async for e in each_request(log, Topic.REQUESTS, EventType.ACCEPTED, window)]


async def answer(log: EventLog, request_id: str) -> dict[str, Any] | None:
    """The request's final answer on ``log`` (from [completed], by direct lookup)."""
    event = await log.find(Topic.COMPLETED, request_id)
    if event is None:
        return None
    if event.type == EventType.FAILED:
        failed = decode(RequestFailed, event.data)
        return {"status": "failed", "error": failed.message, "model": event.model or None}
    completed = decode(RequestCompleted, event.data)
    return {"status": "completed", "output": completed.output, "model": event.model or None}


async def replay(
    source: EventLog, requests: Sequence[Envelope], pipeline: Pipeline
) -> AsyncGenerator[Replayed, None]:
    """Run ``requests`` through ``pipeline`` (every stage, the projector among them) in this process;
    each result as its request ends, in the order they end."""
    log, store = MemoryEventLog(), MemoryStateStore()
    watch = StatusWatch(store)
    stop = asyncio.Event()
    workers = [StageWorker(stage, log, store) for stage in pipeline]
    tasks = [asyncio.create_task(worker.run(stop)) for worker in workers]
    tasks.append(asyncio.create_task(watch.run()))
    changes: asyncio.Queue[tuple[str, RequestView]] = asyncio.Queue()
    try:
        for worker in workers:
            await worker.ready.wait()
        with contextlib.ExitStack() as watching:
            for event in requests:  # before they are published: no change can slip by
                watching.enter_context(watch.subscribe(event.request_id, changes))
            await log.publish(
                Topic.REQUESTS, [dataclasses.replace(event, deadline=None, model="") for event in requests]
            )
            ended: set[str] = set()
            while len(ended) < len(requests):
                _, view = await changes.get()
                if not view.terminal or view.id in ended:
                    continue
                ended.add(view.id)
                prepared = await log.find(Topic.PREPARED, view.id)
                prompt = decode(RequestPrepared, prepared.data).prompt if prepared else ""
                yield Replayed(view.id, prompt, await answer(source, view.id), view)
    finally:
        stop.set()
        tasks[-1].cancel()  # the watch runs until cancelled; the stages drain and end
        await asyncio.gather(*tasks, return_exceptions=True)
