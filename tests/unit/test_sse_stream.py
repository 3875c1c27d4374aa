"""A request's event stream rides out a token tail that fails, as during a broker node's failover."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator
from typing import Any

from conveyor.errors import UnavailableError
from conveyor.events import Topic, new_event
from conveyor.gateway.core import GatewayCore
from conveyor.gateway.sse import request_events
from conveyor.log.base import Tailed
from conveyor.payloads import EventType, TokenChunk
from conveyor.store.base import Namespace
from conveyor.testing import MemoryEventLog, MemoryStateStore
from conveyor.view import RequestView


class BrokenOnce(MemoryEventLog):
    """A memory log whose first tail breaks after its first event (a stream leader gone); later
    tails work, and are told where to resume."""

    def __init__(self) -> None:
        super().__init__()
        self.resumed_after: list[int] = []

    async def tail(self, topic: str, key: str | None, **options: Any) -> AsyncGenerator[Tailed, None]:
        self.resumed_after.append(options.get("after", 0))
        async with contextlib.aclosing(super().tail(topic, key, **options)) as tailed:
            async for item in tailed:
                yield item
                if len(self.resumed_after) == 1:
                    raise UnavailableError("the stream's leader is gone")


async def test_a_token_tail_that_fails_is_opened_again_after_the_last_chunk_read() -> None:
    log, store = BrokenOnce(), MemoryStateStore()
    rid = "r1"
    pieces = ["Hel", "lo ", "world"]
    offset = 0
    for i, piece in enumerate(pieces):
        chunk = TokenChunk(index=i, offset=offset, text=piece, final=i == len(pieces) - 1)
        offset += len(piece)
        event = new_event(type=EventType.TOKEN, source="test", payload=chunk, request_id=rid)
        await log.publish(Topic.STREAM, [dataclasses.replace(event, key=rid)])
    done = RequestView(id=rid, status="completed", output="Hello world", streamed_chars=offset)
    await store.put(Namespace.STATUS, rid, done.public_json())

    async with asyncio.timeout(10):
        updates = request_events(GatewayCore(log, store), rid, 0, tenant="default")
        events = [event async for batch in updates for event in batch or []]

    tokens = "".join(data["text"] for _, name, data in events if name == "token")
    assert tokens == "Hello world"  # each character once, none lost at the break
    assert [name for _, name, _ in events][-1] == "completed"
    assert log.resumed_after == [0, 1]  # opened again after the chunk it had read


class UnreadableOnce(MemoryStateStore):
    """A memory store whose first read of a status fails, as a Redis pool exhausted under overload."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def get(self, ns: Namespace, key: str) -> Any:
        if ns is Namespace.STATUS and not self.failed:
            self.failed = True
            raise UnavailableError("No connection available.")
        return await super().get(ns, key)


async def test_a_status_that_cannot_be_read_does_not_end_the_stream() -> None:
    log, store = MemoryEventLog(), UnreadableOnce()
    rid = "r2"
    core = GatewayCore(log, store)
    chunk = TokenChunk(index=0, offset=0, text="Hello", final=True)
    event = new_event(type=EventType.TOKEN, source="test", payload=chunk, request_id=rid)
    await log.publish(Topic.STREAM, [dataclasses.replace(event, key=rid)])
    watching = asyncio.create_task(core.watch.run())
    try:
        async with asyncio.timeout(10):
            updates = request_events(core, rid, 0, tenant="default")
            first = await anext(updates)  # the chunk, though the status read failed
            done = RequestView(id=rid, status="completed", output="Hello", streamed_chars=5)
            await store.put(Namespace.STATUS, rid, done.public_json())  # the watch brings it
            events = [*(first or []), *[event async for batch in updates for event in batch or []]]
    finally:
        watching.cancel()
    assert store.failed
    assert "".join(data["text"] for _, name, data in events if name == "token") == "Hello"
    assert [name for _, name, _ in events][-1] == "completed"
