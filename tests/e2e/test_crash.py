"""Stopped in the middle of work (kill -9 or SIGTERM): every accepted request completes exactly once
after a restart on the same data dir."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import orjson
import pytest

from conveyor.models.simulated import SimulatedModel
from conveyor.store.base import Namespace
from conveyor.store.nats_kv import NatsStateStore
from tests.e2e.conftest import ConveyorFactory
from tests.helpers import read_sse, streamed_text, submit, wait_final

pytestmark = pytest.mark.slow

# A short ack deadline: events the killed process held are redelivered within 2 s.
SLOW_MODEL = ("--model-token-delay", "0.01", "--ack-wait", "2")
REQUESTS = 40


@pytest.mark.parametrize("stop", ["kill-9+nats-killed", "kill-9+nats-orphaned", "sigterm"])
async def test_stopped_with_requests_in_flight_then_restarted(conveyor: ConveyorFactory, stop: str) -> None:
    first = conveyor(*SLOW_MODEL).start()
    prompts = [f"crash test {i}" for i in range(REQUESTS)]
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
        rids = await asyncio.gather(*(submit(client, p, max_tokens=30) for p in prompts))
        await read_sse(client, rids[-1], stop_after=4)  # generation is under way
    nats_pid = first.nats_pid
    assert nats_pid is not None
    if stop == "sigterm":
        assert first.stop() == 0  # drains what it holds, stops the bundled server, exits cleanly
        assert first.nats_pid is None
    else:
        first.kill9()  # the stage worker processes die with it
        if stop == "kill-9+nats-killed":
            os.kill(nats_pid, signal.SIGKILL)

    second = conveyor(*SLOW_MODEL).start()
    if stop == "kill-9+nats-orphaned":
        assert (second.log_url, second.nats_pid) == (first.log_url, nats_pid)  # the orphan was adopted
    model = SimulatedModel()
    async with httpx.AsyncClient(base_url=second.url, timeout=60) as client:
        views = await asyncio.gather(*(wait_final(client, rid, wait=60) for rid in rids))
        streams = await asyncio.gather(*(read_sse(client, rid) for rid in rids))
    for prompt, view, events in zip(prompts, views, streams, strict=True):
        tokens, _ = model.answer(prompt, 30)
        assert view["status"] == "completed"
        assert view["output"] == "".join(tokens).strip()  # no duplicated or missing text
        assert streamed_text(events).strip() == view["output"]  # no second token sequence
        assert view["usage"]["completion_tokens"] == len(tokens)

    store = await NatsStateStore.open(second.log_url)
    try:
        records = {rid: await store.get(Namespace.USAGE, rid) for rid in rids}
    finally:
        await store.close()
    for rid, entry in records.items():
        assert entry is not None, f"no usage recorded for {rid}"
        assert orjson.loads(entry.value)["request_id"] == rid
    assert second.stop() == 0
