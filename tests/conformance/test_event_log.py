"""The EventLog contract, run against every backend (memory and real NATS JetStream)."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor.events import Envelope, new_event, prepared_topic
from conveyor.log.base import Delivery, EventLog, Subscription
from conveyor.payloads import RequestAccepted


def event(prompt: str, *, key: str = "k1", **attributes: Any) -> Envelope:
    return new_event(
        type="request.accepted", source="test", payload=RequestAccepted(prompt=prompt), key=key, **attributes
    )


async def drain(sub: Subscription, count: int, *, timeout: float = 10.0) -> list[Delivery]:
    """Fetch until ``count`` deliveries arrived (acking none of them)."""
    got: list[Delivery] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            got += await sub.fetch(count - len(got), timeout=0.5)
    return got


async def test_publish_then_consume_in_order_with_every_attribute(log: EventLog) -> None:
    events = [
        event(f"p{i}", tenant="acme", priority=3, deadline=1.5e9, model="m", traceparent="00-a-b-01")
        for i in range(5)
    ]
    await log.publish("requests", events)
    sub = await log.subscribe("requests", "g")
    got = await drain(sub, 5)
    assert [d.envelope() for d in got] == events
    assert all(d.attempt == 1 for d in got)
    assert [d.position for d in got] == sorted(d.position for d in got)
    for d in got:
        await d.ack()
    assert await sub.fetch(10, timeout=0.3) == []
    await sub.close()


async def test_an_event_published_twice_is_stored_once(log: EventLog) -> None:
    e = event("once")
    await log.publish("requests", [e])
    await log.publish("requests", [e, event("other")])
    sub = await log.subscribe("requests", "g")
    got = await drain(sub, 2)
    assert [d.envelope().id for d in got] == [e.id, got[1].envelope().id]
    assert got[1].envelope().id != e.id
    for d in got:
        await d.ack()
    assert await sub.fetch(10, timeout=0.3) == []


async def test_every_group_sees_every_event(log: EventLog) -> None:
    events = [event(f"p{i}") for i in range(3)]
    await log.publish("requests", events)
    for group in ("a", "b"):
        sub = await log.subscribe("requests", group)
        assert [d.envelope().id for d in await drain(sub, 3)] == [e.id for e in events]


async def test_members_of_a_group_share_the_events(log: EventLog) -> None:
    events = [event(f"p{i}", key=f"k{i}") for i in range(20)]
    first, second = await log.subscribe("requests", "g"), await log.subscribe("requests", "g")
    await log.publish("requests", events)
    seen: list[str] = []
    async with asyncio.timeout(10):
        while len(seen) < 20:
            for sub in (first, second):
                for d in await sub.fetch(5, timeout=0.1):
                    seen.append(d.envelope().id)
                    await d.ack()
    assert sorted(seen) == sorted(e.id for e in events)  # each exactly once


async def test_a_nacked_event_is_redelivered_with_a_higher_attempt(log: EventLog) -> None:
    e = event("again")
    await log.publish("requests", [e])
    sub = await log.subscribe("requests", "g")
    (first,) = await drain(sub, 1)
    await first.nak()
    (second,) = await drain(sub, 1)
    assert second.envelope().id == e.id
    assert second.attempt == 2


async def test_an_unacked_event_is_redelivered_after_the_ack_deadline(log: EventLog) -> None:
    await log.publish("requests", [event("lost worker")])
    sub = await log.subscribe("requests", "g")
    (first,) = await drain(sub, 1)
    (again,) = await drain(sub, 1, timeout=15)  # the fixture's ack deadline is 2 s
    assert again.envelope().id == first.envelope().id
    assert again.attempt == 2


async def test_a_foreign_message_is_delivered_and_fails_to_decode_clearly(log: EventLog) -> None:
    garbage = dataclasses.replace(event("x"), type="")  # encodes with an empty ce-type header
    await log.publish("requests", [garbage])
    sub = await log.subscribe("requests", "g")
    (d,) = await drain(sub, 1)
    assert d.try_envelope() is None


async def test_tail_reads_one_key_in_order_and_resumes_after_a_position(log: EventLog) -> None:
    mine = [event(f"m{i}", key="req-1") for i in range(4)]
    await log.publish("stream", [mine[0], event("other", key="req-2"), mine[1], mine[2]])
    seen = [t async for t in log.tail("stream", "req-1", follow=False)]
    assert [t.envelope.id for t in seen] == [e.id for e in mine[:3]]
    after = [t.envelope.id async for t in log.tail("stream", "req-1", after=seen[0].position, follow=False)]
    assert after == [mine[1].id, mine[2].id]

    async def follow() -> list[str]:
        ids = []
        async for t in log.tail("stream", "req-1", after=seen[-1].position):
            ids.append(t.envelope.id)
            return ids
        return ids

    waiting = asyncio.create_task(follow())
    await log.publish("stream", [mine[3]])
    async with asyncio.timeout(10):
        assert await waiting == [mine[3].id]


async def test_followers_that_join_while_their_keys_are_written_read_every_event_once(log: EventLog) -> None:
    """An SSE stream opens while its request is generating: whenever a follower of one key
    joins, it reads that key's events from the first, then each new one, once and in order."""
    keys = [f"req-{i}" for i in range(6)]
    rounds = 4
    published: dict[str, list[str]] = {key: [] for key in keys}

    async def follow(key: str) -> list[str]:
        ids: list[str] = []
        async for t in log.tail("stream", key):
            ids.append(t.envelope.id)
            if len(ids) == rounds:
                break
        return ids

    followers: dict[str, asyncio.Task[list[str]]] = {}
    for n in range(rounds):
        for i, key in enumerate(keys):
            if i == n or (n == rounds - 1 and key not in followers):  # joins before its n-th event
                followers[key] = asyncio.create_task(follow(key))
            written = event(f"{key}-{n}", key=key)
            await log.publish("stream", [written])
            published[key].append(written.id)
    async with asyncio.timeout(20):
        assert {key: await task for key, task in followers.items()} == published


async def a_moment_later() -> datetime:
    """A time after every timestamp the log gave so far and before any it gives next. Log
    timestamps come from the wall clock (Kafka's to the millisecond), so what this waits for is
    the clock itself to move on, a few milliseconds each side, not any event."""
    await asyncio.sleep(0.005)
    moment = datetime.now(UTC)
    await asyncio.sleep(0.005)
    return moment


async def test_tail_since_and_until_a_time_reads_only_what_the_log_stored_in_between(log: EventLog) -> None:
    old = [event(f"old{i}", key=f"k{i}") for i in range(3)]
    await log.publish("control", old)
    since = await a_moment_later()
    recent = [event(f"new{i}", key=f"k{i}") for i in range(3)]
    await log.publish("control", recent)

    read = [t.envelope.id async for t in log.tail("control", None, follow=False, since=since)]
    assert sorted(read) == sorted(e.id for e in recent)
    keyed = [t.envelope.id async for t in log.tail("control", "k1", follow=False, since=since)]
    assert keyed == [recent[1].id]
    later = await a_moment_later()
    assert [t async for t in log.tail("control", None, follow=False, since=later)] == []

    async def first_after(moment: datetime) -> str:
        async for t in log.tail("control", None, since=moment):
            return t.envelope.id
        raise AssertionError("a followed tail ended")

    waiting = asyncio.create_task(first_after(later))  # nothing is that recent yet: it waits
    late = event("late", key="k2")
    await log.publish("control", [late])
    async with asyncio.timeout(10):
        assert await waiting == late.id

    # Bounded at the other end too: what the log stamped from ``until`` on is not read.
    between = [t.envelope.id async for t in log.tail("control", None, follow=False, since=since, until=later)]
    assert sorted(between) == sorted(e.id for e in recent)
    before = [t.envelope.id async for t in log.tail("control", "k2", follow=False, until=since)]
    assert before == [old[2].id]
    assert [t.envelope.id async for t in log.tail("control", "k2", follow=False, until=later)] == [
        old[2].id,
        recent[2].id,
    ]
    with pytest.raises(ValueError, match="until ends a tail that does not follow"):
        await anext(log.tail("control", None, until=later))


async def test_tail_without_a_key_reads_every_key_and_an_empty_topic_ends(log: EventLog) -> None:
    assert [t async for t in log.tail("control", None, follow=False)] == []
    events = [event(f"{key}{i}", key=key) for i in range(3) for key in ("x", "y")]
    await log.publish("control", events)
    read = [t.envelope async for t in log.tail("control", None, follow=False)]
    # Each key in order; keys may interleave differently (Kafka orders within a partition only).
    for key in ("x", "y"):
        assert [e.id for e in read if e.key == key] == [e.id for e in events if e.key == key]
    assert len(read) == len(events)


async def test_find_returns_the_latest_event_of_a_request(log: EventLog) -> None:
    first = event("a", key="conversation-1")
    later = first.derive(type="request.prepared", source="t", payload=RequestAccepted(prompt="b"), label="x")
    await log.publish("requests", [first, event("other", key="conversation-1"), later])
    found = await log.find("requests", first.request_id)
    assert found == later
    assert await log.find("requests", "no-such-request") is None


async def test_lag_counts_undelivered_and_unacknowledged_events_per_group(log: EventLog) -> None:
    sub = await log.subscribe("requests", "workers")
    await log.publish("requests", [event(f"p{i}", key=f"k{i}") for i in range(5)])
    got = await drain(sub, 2)
    await got[0].ack()
    mine = [lag for lag in await log.lag() if (lag.topic, lag.group) == ("requests", "workers")]
    pending, in_flight = sum(lag.pending for lag in mine), sum(lag.in_flight for lag in mine)
    assert (pending + in_flight, in_flight >= 1) == (4, True)
    # Asked again (as admission control does, twice a second), it sees what came since.
    await log.publish("requests", [event(f"q{i}", key=f"k{i}") for i in range(3)])
    again = [lag for lag in await log.lag() if (lag.topic, lag.group) == ("requests", "workers")]
    assert sum(lag.pending + lag.in_flight for lag in again) == 7


async def test_lag_names_a_models_topic_as_it_was_published_to(log: EventLog) -> None:
    topic = prepared_topic("gpt-4o")  # a topic of one model of several: "prepared-gpt-4o"
    await log.subscribe(topic, "generate-gpt-4o")
    await log.publish(topic, [event("p", key="k")])
    mine = [lag for lag in await log.lag() if lag.topic == topic]
    assert [(lag.group, lag.pending + lag.in_flight) for lag in mine if lag.pending + lag.in_flight] == [
        ("generate-gpt-4o", 1)
    ]
