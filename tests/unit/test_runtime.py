"""The stage runtime on in-memory backends: ordering, retries, dead letters, effectively-once."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence

import pytest

from conveyor.errors import DeferredError, PermanentError, RetryableError, UnavailableError
from conveyor.events import Envelope, Topic, new_event
from conveyor.log.base import Delivery, Subscription
from conveyor.log.memory import MemoryEventLog
from conveyor.payloads import DeadLetter, EventType, RequestAccepted, decode
from conveyor.pipeline import Output, RetryPolicy, Stage, StageContext
from conveyor.runtime.worker import StageWorker
from conveyor.store.base import Namespace
from conveyor.store.memory import MemoryStateStore
from conveyor.testing import StageHarness

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002)


def accepted(prompt: str, key: str = "k") -> Envelope:
    return new_event(type=EventType.ACCEPTED, source="test", payload=RequestAccepted(prompt=prompt), key=key)


def echo_stage(handler_body: object = None, **options: object) -> tuple[Stage, list[str]]:
    """A stage that records the prompts it handled and echoes each to [prepared]."""
    seen: list[str] = []

    async def handle(ctx: StageContext, event: Envelope) -> Sequence[Output]:
        prompt = decode(RequestAccepted, event.data).prompt
        seen.append(prompt)
        if callable(handler_body):
            await handler_body(prompt)
        out = ctx.derive(event, type=EventType.PREPARED, payload=RequestAccepted(prompt=prompt))
        return [Output(Topic.PREPARED, out)]

    stage = Stage(name="echo", consumes=(Topic.REQUESTS,), handler=handle, retry=FAST_RETRY, **options)  # type: ignore[arg-type]
    return stage, seen


async def test_events_of_one_key_run_in_order_while_keys_run_concurrently() -> None:
    running, peak = 0, 0
    all_keys_in = asyncio.Event()

    async def slow(prompt: str) -> None:
        # Each handler holds its lane until one event of every key is in flight at once:
        # that can only happen if lanes run concurrently (and a lane never runs two at once).
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 4:
            all_keys_in.set()
        await all_keys_in.wait()
        running -= 1

    stage, seen = echo_stage(slow)
    harness = StageHarness(stage)
    events = [accepted(f"{key}-{i}", key=key) for i in range(10) for key in ("a", "b", "c", "d")]
    async with harness.running() as worker:
        await harness.log.publish(Topic.REQUESTS, events)
        await worker.idle()
    for key in "abcd":
        assert [p for p in seen if p.startswith(key)] == [f"{key}-{i}" for i in range(10)]
    assert peak == 4  # one per key, never two of the same key
    assert len(harness.published(Topic.PREPARED)) == 40


async def test_retryable_failures_are_retried_and_publish_once() -> None:
    failures = 2

    async def flaky(prompt: str) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise RetryableError("model server busy")

    stage, seen = echo_stage(flaky)
    out = await StageHarness(stage).handle(accepted("x"))
    assert seen == ["x", "x", "x"]
    assert len(out[Topic.PREPARED]) == 1
    assert Topic.DLQ not in out


async def test_a_permanent_error_dead_letters_at_once_with_its_reason_and_the_original() -> None:
    async def refuse(prompt: str) -> None:
        raise PermanentError("upstream said 400: prompt too long")

    stage, seen = echo_stage(refuse)
    event = accepted("bad")
    out = await StageHarness(stage).handle(event)
    assert seen == ["bad"]
    (letter,) = out[Topic.DLQ]
    dead = decode(DeadLetter, letter.data)
    assert dead.stage == "echo"
    assert dead.topic == Topic.REQUESTS
    assert "prompt too long" in dead.error
    assert [a.attempt for a in dead.attempts] == [1]
    assert Envelope.from_headers(dead.original_headers, dead.original_body.encode()) == event
    assert letter.request_id == event.request_id


async def test_exhausted_retries_dead_letter_with_the_attempt_history() -> None:
    async def always(prompt: str) -> None:
        raise ValueError("a bug in the handler")

    stage, seen = echo_stage(always)
    out = await StageHarness(stage).handle(accepted("x"))
    dead = decode(DeadLetter, out[Topic.DLQ][0].data)
    assert len(seen) == FAST_RETRY.max_attempts
    assert [a.attempt for a in dead.attempts] == [1, 2, 3]
    assert all("a bug in the handler" in a.error for a in dead.attempts)


async def test_an_unreachable_backend_hands_the_event_back_to_the_broker_instead_of_the_dlq() -> None:
    calls = 0

    async def broker_failing_over(prompt: str) -> None:
        nonlocal calls
        calls += 1
        if calls <= FAST_RETRY.max_attempts:  # longer than one delivery's retries
            raise UnavailableError("store create usage/x: NoStreamResponseError()")

    stage, seen = echo_stage(broker_failing_over)
    harness = StageHarness(stage)
    prepared = await harness.log.subscribe(Topic.PREPARED, "test")
    async with harness.running():
        await harness.log.publish(Topic.REQUESTS, [accepted("x")])
        (out,) = await prepared.fetch(1, timeout=10)  # after a redelivery
    assert out.envelope().type == EventType.PREPARED
    assert seen == ["x"] * (FAST_RETRY.max_attempts + 1)
    assert harness.published(Topic.DLQ) == []


async def test_a_stage_waits_for_a_log_it_cannot_subscribe_to_yet() -> None:
    class ElectingLog(MemoryEventLog):
        refusals = 2

        async def subscribe(self, topic: str, group: str) -> Subscription:
            if self.refusals:
                self.refusals -= 1
                raise UnavailableError("JetStream has no leader for the stream yet")
            return await super().subscribe(topic, group)

    stage, seen = echo_stage()
    out = await StageHarness(stage, log=ElectingLog()).handle(accepted("x"))
    assert seen == ["x"]
    assert len(out[Topic.PREPARED]) == 1


async def test_a_handler_that_hangs_times_out_and_is_dead_lettered() -> None:
    async def hang(prompt: str) -> None:
        await asyncio.Event().wait()

    stage, _ = echo_stage(hang, timeout=0.01)
    out = await StageHarness(stage).handle(accepted("x"))
    assert "exceeded its timeout" in decode(DeadLetter, out[Topic.DLQ][0].data).error


async def test_garbage_is_dead_lettered_and_the_partition_keeps_flowing() -> None:
    stage, seen = echo_stage()
    harness = StageHarness(stage)
    async with harness.running() as worker:
        harness.log.append_raw(Topic.REQUESTS, "k", {}, b"\x00not an event")
        harness.log.append_raw(Topic.REQUESTS, "k", {"ce-id": "1"}, b"{}")
        await harness.log.publish(Topic.REQUESTS, [accepted("after garbage")])
        await worker.idle()
    assert seen == ["after garbage"]
    letters = [decode(DeadLetter, e.data) for e in harness.published(Topic.DLQ)]
    assert [d.original_body for d in letters] == ["\x00not an event", "{}"]
    assert all("not a Conveyor event" in d.error for d in letters)


async def test_a_payload_that_fails_validation_is_dead_lettered_without_retries() -> None:
    stage, seen = echo_stage()
    bad = new_event(type=EventType.ACCEPTED, source="t", payload=RequestAccepted(prompt="x"))
    harness = StageHarness(stage)
    async with harness.running() as worker:
        harness.log.append_raw(Topic.REQUESTS, "k", bad.to_headers(), b'{"prompt": 42}')
        await worker.idle()
    (letter,) = harness.published(Topic.DLQ)
    dead = decode(DeadLetter, letter.data)
    assert seen == []
    assert "prompt: Input should be a valid string" in dead.error
    assert len(dead.attempts) == 1


async def test_a_redelivered_event_is_skipped_after_it_was_handled() -> None:
    stage, seen = echo_stage()
    harness = StageHarness(stage)
    event = accepted("once")
    async with harness.running() as worker:
        await harness.log.publish(Topic.REQUESTS, [event])
        await worker.idle()
        # The broker delivers the same event again (a copy beyond its dedupe window).
        harness.log.append_raw(Topic.REQUESTS, event.key, event.to_headers(), event.data)
        await worker.idle()
    assert seen == ["once"]
    assert len(harness.published(Topic.PREPARED)) == 1


class CrashingStore(MemoryStateStore):
    """Fails the first dedupe write: the worker 'dies' after publishing, before marking."""

    def __init__(self) -> None:
        super().__init__()
        self.crashes = 1

    async def put(self, ns: Namespace, key: str, value: bytes) -> int:
        if ns is Namespace.DEDUPE and self.crashes:
            self.crashes -= 1
            raise ConnectionError("store went away")
        return await super().put(ns, key, value)


async def test_a_crash_between_publish_and_mark_republishes_the_same_output_once() -> None:
    stage, seen = echo_stage()
    harness = StageHarness(stage, store=CrashingStore())
    async with harness.running() as worker:
        await harness.log.publish(Topic.REQUESTS, [accepted("x")])
        async with asyncio.timeout(10):
            while len(seen) < 2:  # handled, not acked, redelivered, handled again
                await worker.idle()
    assert seen == ["x", "x"]
    assert len(harness.published(Topic.PREPARED)) == 1
    assert harness.published(Topic.DLQ) == []


async def test_events_of_other_types_are_skipped() -> None:
    stage, seen = echo_stage(accepts=frozenset({EventType.ACCEPTED}))
    other = new_event(type="something.else", source="t", payload=RequestAccepted(prompt="x"))
    out = await StageHarness(stage).handle(other)
    assert seen == []
    assert out.get(Topic.PREPARED, []) == []


class HeartbeatCountingLog(MemoryEventLog):
    """Counts the heartbeats sent for the deliveries it hands out; ``beats`` is set at ``enough``."""

    def __init__(self, *, ack_wait: float, enough: int) -> None:
        super().__init__(ack_wait=ack_wait)
        self.count, self.enough, self.beats = 0, enough, asyncio.Event()

    async def subscribe(self, topic: str, group: str) -> Subscription:
        sub = await super().subscribe(topic, group)
        fetch = sub.fetch

        async def counting_fetch(max_messages: int, timeout: float) -> list[Delivery]:
            deliveries = await fetch(max_messages, timeout)
            for delivery in deliveries:
                beat = delivery._progress

                async def counted(beat: Callable[[], Awaitable[None]] = beat) -> None:
                    await beat()
                    self.count += 1
                    if self.count >= self.enough:
                        self.beats.set()

                delivery._progress = counted
            return deliveries

        sub.fetch = counting_fetch  # type: ignore[method-assign]
        return sub


async def test_heartbeats_keep_a_long_handler_from_being_redelivered() -> None:
    # The handler holds its event across several ack deadlines: it finishes only after the
    # worker has sent enough heartbeats to span three deadlines (0.3 s each, a beat per 0.1 s).
    log = HeartbeatCountingLog(ack_wait=0.3, enough=9)

    async def long_work(prompt: str) -> None:
        await log.beats.wait()

    stage, seen = echo_stage(long_work)
    harness = StageHarness(stage, log=log)
    worker = StageWorker(stage, harness.log, harness.store, heartbeat=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await harness.log.publish(Topic.REQUESTS, [accepted("x")])
    await worker.idle()
    stop.set()
    await task
    assert log.count >= 9
    assert seen == ["x"]  # never redelivered while it was held
    assert len(harness.published(Topic.PREPARED)) == 1


def lingering_stage() -> tuple[Stage, list[list[str]], asyncio.Event]:
    """A handle_many stage that holds its lane (for a minute) until an "end" event is in it."""
    batches: list[list[str]] = []
    held = asyncio.Event()

    async def handle_many(ctx: StageContext, events: Sequence[Envelope]) -> Sequence[Output]:
        batches.append([decode(RequestAccepted, e.data).prompt for e in events])
        return ()

    def linger(events: Sequence[Envelope]) -> float:
        prompts = [decode(RequestAccepted, e.data).prompt for e in events]
        if "end" in prompts:
            return 0.0
        if len(prompts) == 2:
            held.set()
        return 60.0

    async def handle(ctx: StageContext, event: Envelope) -> Sequence[Output]:
        return await handle_many(ctx, [event])

    stage = Stage(
        name="fold", consumes=(Topic.REQUESTS,), handler=handle, handle_many=handle_many, linger=linger
    )
    return stage, batches, held


async def test_a_lingering_lane_holds_its_events_until_one_settles_them_then_handles_all_at_once() -> None:
    stage, batches, held = lingering_stage()
    harness = StageHarness(stage)
    async with harness.running() as worker:
        await harness.log.publish(Topic.REQUESTS, [accepted("a"), accepted("b")])
        async with asyncio.timeout(10):  # the stage is asked whether to hold them
            await held.wait()
        assert batches == []  # held, not handled (nor acknowledged)
        await harness.log.publish(Topic.REQUESTS, [accepted("end")])
        await worker.idle()
    assert batches == [["a", "b", "end"]]


async def test_a_stopping_worker_handles_what_its_lanes_hold_without_waiting_out_the_linger() -> None:
    stage, batches, held = lingering_stage()
    harness = StageHarness(stage)
    stop = asyncio.Event()
    worker = StageWorker(stage, harness.log, harness.store)
    task = asyncio.create_task(worker.run(stop))
    await harness.log.publish(Topic.REQUESTS, [accepted("a"), accepted("b")])
    async with asyncio.timeout(10):
        await held.wait()
    stop.set()
    await task  # well before the minute the lane asked for (the test's timeout is shorter)
    assert batches == [["a", "b"]]


def test_linger_without_handle_many_is_refused_when_the_stage_is_declared() -> None:
    stage, _, _ = lingering_stage()
    with pytest.raises(ValueError, match="handle_many"):
        dataclasses.replace(stage, handle_many=None)


async def test_a_deferred_event_goes_back_to_the_broker_and_is_dead_lettered_after_its_deliveries() -> None:
    async def later(prompt: str) -> None:
        raise DeferredError(f"not now: {prompt}", delay=0.0)

    stage, seen = echo_stage(later, max_deliveries=3)
    out = await StageHarness(stage).handle(accepted("patience"))
    assert seen == ["patience"] * 3  # one try per delivery: no retries in the worker
    (letter,) = [decode(DeadLetter, e.data) for e in out[Topic.DLQ]]
    assert letter.error == "DeferredError: not now: patience (delivery 3 of 3)"
    assert out.get(Topic.PREPARED, []) == []


async def test_a_limited_topic_never_fills_the_stage_and_the_others_events_are_taken_at_once() -> None:
    background, handled, release = Topic.PREPARED, asyncio.Event(), asyncio.Event()
    held, most = [0], [0]

    async def handle(ctx: StageContext, event: Envelope) -> Sequence[Output]:
        if decode(RequestAccepted, event.data).prompt.startswith("background"):
            held[0] += 1
            most[0] = max(most[0], held[0])
            await release.wait()
            held[0] -= 1
        else:
            handled.set()
        return []

    stage = Stage(
        name="limited",
        consumes=(Topic.REQUESTS, background),
        handler=handle,
        concurrency=4,
        topic_limits={background: 2},
    )
    log = MemoryEventLog()
    async with StageHarness(stage, log=log).running():
        await log.publish(background, [accepted(f"background {i}", key=f"b{i}") for i in range(10)])
        await log.publish(Topic.REQUESTS, [accepted("interactive", key="i")])
        async with asyncio.timeout(10):
            await handled.wait()  # without the limit, four of the background events hold all four
        assert (most[0], held[0]) == (2, 2)
        release.set()
