"""What the Kafka log adds to the EventLog contract: partitions, commits, consume-side dedupe.

Runs against tansu (or CONVEYOR_TEST_KAFKA_URL), like the shared suite's kafka case.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import confluent_kafka
import pytest
from confluent_kafka.admin import AdminClient

from conveyor.backends import open_log
from conveyor.log import kafka as kafka_log
from conveyor.log.base import Delivery, Subscription
from conveyor.log.kafka import KafkaEventLog, partition_for
from tests.conformance.test_event_log import drain, event
from tests.conftest import open_test_kafka, unique_prefix


@pytest.fixture
async def kafka(kafka_url: str) -> AsyncIterator[KafkaEventLog]:
    log = await open_test_kafka(kafka_url, ack_wait=5.0)
    try:
        yield log
    finally:
        await log.close()
        await log.delete_topics()


async def test_a_key_lands_where_kafkas_murmur2_partitioner_puts_it(kafka_url: str) -> None:
    bootstrap = kafka_url.removeprefix("kafka://")
    log = await open_log(f"{kafka_url}?partitions=5", prefix=unique_prefix())
    assert isinstance(log, KafkaEventLog)
    try:
        await log.publish("requests", [event("p")])  # creates the topic with 5 partitions
        producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
        landed: dict[str, int] = {}

        def delivered(_err: object, msg: confluent_kafka.Message) -> None:
            landed[(msg.key() or b"").decode()] = msg.partition() or 0

        keys = [f"conversation-{i}" for i in range(40)]
        for key in keys:
            producer.produce(log.topic_name("requests"), b"", key.encode(), on_delivery=delivered)
        assert await asyncio.to_thread(producer.flush, 10) == 0
        producer.close()
        assert landed == {key: partition_for(key, 5) for key in keys}
        assert len(set(landed.values())) == 5
        metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(log.topic_name("requests"), 10)
        assert len(metadata.topics[log.topic_name("requests")].partitions) == 5
    finally:
        await log.close()
        await log.delete_topics()


async def fetch_all(sub: Subscription, count: int) -> list[Delivery]:
    got = await drain(sub, count)
    assert await sub.fetch(10, timeout=0.3) == []  # nothing more, nothing twice
    return got


async def test_a_commit_stops_at_the_lowest_unacked_offset(kafka: KafkaEventLog) -> None:
    events = [event(f"p{i}", key="one-key") for i in range(5)]
    await kafka.publish("requests", events)
    first = await kafka.subscribe("requests", "g")
    got = await fetch_all(first, 5)
    for d in (got[0], got[1], got[3], got[4]):  # out of order, the third one never
        await d.ack()
    await first.close()  # commits what is done, leaves the group

    second = await kafka.subscribe("requests", "g")
    again = await fetch_all(second, 3)
    assert [d.envelope().id for d in again] == [e.id for e in events[2:]]
    # A new owner cannot know earlier deliveries: Kafka keeps no per-message attempt count.
    assert [d.attempt for d in again] == [1, 1, 1]
    for d in again:
        await d.ack()
    await second.close()

    third = await kafka.subscribe("requests", "g")
    assert await third.fetch(10, timeout=1.5) == []


async def test_a_copy_published_by_another_producer_is_delivered_once(kafka_url: str) -> None:
    prefix = unique_prefix()
    gateway = await open_test_kafka(kafka_url, prefix=prefix)
    replayed = await open_test_kafka(kafka_url, prefix=prefix)
    try:
        original, later = event("original"), event("later")
        await gateway.publish("requests", [original])
        await replayed.publish("requests", [original, later])  # another process: not deduped there
        sub = await gateway.subscribe("requests", "g")
        got = await fetch_all(sub, 2)
        assert [d.envelope().id for d in got] == [original.id, later.id]
        for d in got:
            await d.ack()
        lags = [lag for lag in await gateway.lag() if lag.group == "g"]
        assert sum(lag.pending + lag.in_flight for lag in lags) == 0  # the skipped copy is committed too
    finally:
        for log in (gateway, replayed):
            await log.close()
        await gateway.delete_topics()


async def test_lag_is_reported_per_partition(kafka: KafkaEventLog) -> None:
    keys = [f"user-{i}" for i in range(12)]
    await kafka.publish("requests", [event(k, key=k) for k in keys])
    sub = await kafka.subscribe("requests", "workers")
    got = await fetch_all(sub, 12)
    acked = [d for d in got if d.envelope().key in keys[:6]]
    for d in acked:
        await d.ack()
    lags = {lag.partition: lag for lag in await kafka.lag() if lag.group == "workers"}
    assert set(lags) == {0, 1, 2, 3}
    for partition, lag in lags.items():
        expected = sum(1 for k in keys[6:] if partition_for(k, 4) == partition)
        assert (lag.pending, lag.in_flight) == (0, expected)


async def test_tail_resumes_after_a_delivered_position_and_find_uses_the_request_time(
    kafka: KafkaEventLog,
) -> None:
    request = event("r", key="")  # keyed by its own id, a UUIDv7, as the stream topic is
    chunks = [event(f"c{i}", key=request.request_id, request_id=request.request_id) for i in range(3)]
    await kafka.publish("stream", [request, *chunks])
    sub = await kafka.subscribe("stream", "g")
    positions = {d.envelope().id: d.position for d in await fetch_all(sub, 4)}
    after = positions[chunks[0].id]
    resumed = [
        t.envelope.id async for t in kafka.tail("stream", request.request_id, after=after, follow=False)
    ]
    assert resumed == [chunks[1].id, chunks[2].id]
    assert await kafka.find("stream", request.request_id) == chunks[2]
    assert await kafka.find("stream", str(uuid.uuid4())) is None  # not a UUIDv7: no cheap lookup


async def test_tails_following_keys_of_a_topic_share_one_reader(
    kafka: KafkaEventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader is a librdkafka consumer with threads of its own: one per open SSE stream would
    not scale. Each follower reads its key's history with a reader it closes at the history's end."""
    open_readers: set[int] = set()
    closed = asyncio.Event()

    class Counted(kafka_log._Reader):
        def __init__(self, conf: dict[str, Any]) -> None:
            super().__init__(conf)
            open_readers.add(id(self))

        def close(self) -> concurrent.futures.Future[None]:
            open_readers.discard(id(self))
            closed.set()
            return super().close()

    monkeypatch.setattr(kafka_log, "_Reader", Counted)
    keys = [f"req-{i}" for i in range(6)]
    await kafka.publish("stream", [event(f"{k} before", key=k) for k in keys])  # history for each
    read: dict[str, list[str]] = {key: [] for key in keys}
    both = {key: asyncio.Event() for key in keys}

    async def follow(key: str) -> None:
        async for tailed in kafka.tail("stream", key):  # open, as a stream is, until cancelled
            read[key].append(tailed.envelope.id)
            if len(read[key]) == 2:
                both[key].set()

    followers = [asyncio.create_task(follow(key)) for key in keys]
    after = [event(f"{k} after", key=k) for k in keys]
    await kafka.publish("stream", after)
    async with asyncio.timeout(30):
        for key in keys:
            await both[key].wait()
        while len(open_readers) > 1:  # the last history reads reaching their end
            closed.clear()
            await closed.wait()
    assert len(open_readers) == 1  # the shared reader
    assert [ids[1] for ids in read.values()] == [e.id for e in after]
    for follower in followers:
        follower.cancel()
    await asyncio.gather(*followers, return_exceptions=True)


async def test_a_key_created_since_the_shared_reader_started_reads_its_history_from_it(
    kafka: KafkaEventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SSE stream opened as its request runs: the request's chunks so far are kept by the
    shared reader, and reading them opens no reader of its own."""
    monkeypatch.setattr(kafka_log, "_CLOCK_SKEW_MS", 0)  # the clocks here are one clock
    opened: list[str] = []

    class Counted(kafka_log._Reader):
        def __init__(self, conf: dict[str, Any]) -> None:
            super().__init__(conf)
            opened.append("reader")

    monkeypatch.setattr(kafka_log, "_Reader", Counted)
    warm_up = event("starts the shared reader", key="req-0")
    await kafka.publish("stream", [warm_up])
    async with contextlib.aclosing(kafka.tail("stream", "req-0")) as first:
        assert (await anext(first)).envelope.id == warm_up.id
    before = len(opened)

    request = event("r", key="")  # keyed by its own id, a UUIDv7 made just now, as requests are
    chunks = [event(f"c{i}", key=request.request_id, request_id=request.request_id) for i in range(4)]
    await kafka.publish("stream", chunks[:3])  # written before anyone follows it
    read = []
    async with asyncio.timeout(30), contextlib.aclosing(kafka.tail("stream", request.request_id)) as tail:
        async for tailed in tail:
            read.append(tailed.envelope.id)
            if len(read) == 3:
                await kafka.publish("stream", chunks[3:])
            if len(read) == 4:
                break
    assert read == [c.id for c in chunks]
    assert len(opened) == before  # no reader of its own for the history
