"""What the NATS log adds to the EventLog contract: one consumer on the server follows a topic
for every tail that follows one of its keys, through a server restart too.

Runs against the bundled nats-server (or CONVEYOR_TEST_NATS_URL), like the shared suite's nats case.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from conveyor.embedded import EmbeddedNats
from conveyor.log.nats import NatsEventLog
from tests.conformance.test_event_log import event
from tests.conftest import unique_prefix


@pytest.fixture
async def nats_log(nats_url: str) -> AsyncIterator[NatsEventLog]:
    log = await NatsEventLog.open(nats_url, prefix=unique_prefix())
    try:
        yield log
    finally:
        await log.delete_streams()
        await log.close()


async def first_of(log: NatsEventLog, key: str, arrived: asyncio.Event) -> str:
    async for tailed in log.tail("stream", key):
        arrived.set()
        return tailed.envelope.id
    raise AssertionError("a followed tail ended")


async def consumers(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return len(await nc.jetstream().consumers_info(stream))
    finally:
        await nc.close()


async def test_tails_following_keys_of_a_topic_share_one_consumer_on_the_server(
    nats_log: NatsEventLog, nats_url: str
) -> None:
    await nats_log.publish("stream", [event("before anyone follows", key="req-0")])
    for wave in range(2):  # the second wave finds the consumer the first one started
        keys = [f"req-{wave}-{i}" for i in range(5)]
        arrived = {key: asyncio.Event() for key in keys}
        tails = {key: asyncio.create_task(first_of(nats_log, key, arrived[key])) for key in keys}
        written = {key: event(key, key=key) for key in keys}
        await nats_log.publish("stream", list(written.values()))
        async with asyncio.timeout(10):
            assert {key: await tail for key, tail in tails.items()} == {k: e.id for k, e in written.items()}
        assert await consumers(nats_url, nats_log.stream_name("stream")) == 1


async def test_a_followed_key_keeps_coming_after_the_server_restarts(tmp_path: Path) -> None:
    server = await EmbeddedNats.start(tmp_path)
    log = await NatsEventLog.open(server.url)
    try:
        before, after = event("before", key="req-1"), event("after", key="req-1")
        await log.publish("stream", [before])
        read: asyncio.Queue[str] = asyncio.Queue()

        async def follow() -> None:
            async for tailed in log.tail("stream", "req-1"):
                read.put_nowait(tailed.envelope.id)

        follower = asyncio.create_task(follow())
        async with asyncio.timeout(10):
            assert await read.get() == before.id
        await server.stop()
        server = await EmbeddedNats.start(tmp_path, port=server.port)
        # Another client writes it: the follower's own may not have reconnected yet.
        writer = await NatsEventLog.open(server.url)
        try:
            await writer.publish("stream", [after])
        finally:
            await writer.close()
        async with asyncio.timeout(30):
            # The server lost the follower's consumer (it keeps no state): the client's ordered
            # consumer notices the missing heartbeats and starts a new one after what it read.
            assert await read.get() == after.id
        assert read.empty()
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    finally:
        await log.close()
        await server.stop()
