"""Stopped in the middle of work (kill -9 or SIGTERM): every accepted request completes exactly once
after a restart on the same data dir."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from conveyor.backends import open_store
from conveyor.store.base import StateStore
from conveyor.store.nats_kv import NatsStateStore
from conveyor.testing import UpProcess
from tests.conftest import unique_prefix
from tests.e2e.conftest import ConveyorFactory
from tests.helpers import assert_completed_exactly_once, read_sse, submit

pytestmark = pytest.mark.slow

# A short ack deadline: events the killed process held are redelivered within 2 s.
SLOW_MODEL = ("--model-token-delay", "0.01", "--ack-wait", "2")
REQUESTS = 40


async def check_after_restart(up: UpProcess, store: StateStore, prompts: list[str], rids: list[str]) -> None:
    """Every request completes exactly once on the restarted ``up``, which then stops cleanly."""
    try:
        async with httpx.AsyncClient(base_url=up.url, timeout=60) as client:
            await assert_completed_exactly_once(client, store, prompts, rids, max_tokens=30)
    finally:
        await store.close()
    assert up.stop() == 0


@pytest.mark.parametrize("stop", ["kill-9+nats-killed", "kill-9+nats-orphaned", "sigterm"])
async def test_stopped_with_requests_in_flight_then_restarted(conveyor: ConveyorFactory, stop: str) -> None:
    first = conveyor(*SLOW_MODEL).start()
    # Every tenth prompt is over the log's 64 KiB event limit: its events' payloads are in the
    # bundled server's object store, which must survive the crash as the streams do.
    prompts = [
        f"crash test {i}" + (" and a long document" * 5000 if i % 10 == 0 else "") for i in range(REQUESTS)
    ]
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
    store = await NatsStateStore.open(second.log_url)
    await check_after_restart(second, store, prompts, rids)


async def test_killed_on_kafka_and_redis_with_requests_in_flight_then_restarted(
    conveyor: ConveyorFactory, kafka_url: str, redis_url: str
) -> None:
    # A short group session: the restarted workers get the dead members' partitions after ~3 s.
    backends = ("--log-url", f"{kafka_url}?session_timeout=3", "--store-url", redis_url)
    env = {"CONVEYOR_PREFIX": unique_prefix()}
    first = conveyor(*SLOW_MODEL, *backends, env=env).start()
    prompts = [f"crash test on kafka {i}" for i in range(REQUESTS)]
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
        rids = await asyncio.gather(
            *(submit(client, p, max_tokens=30, key=f"k{i}") for i, p in enumerate(prompts))
        )
        await read_sse(client, rids[-1], stop_after=4)  # generation is under way
    first.kill9()  # the broker and the store live on elsewhere, as in production

    second = conveyor(*SLOW_MODEL, *backends, env=env).start()
    store = await open_store(redis_url, prefix=env["CONVEYOR_PREFIX"])
    await check_after_restart(second, store, prompts, rids)
