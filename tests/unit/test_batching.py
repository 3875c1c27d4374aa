"""Dynamic batching in the runtime: size and wait limits, the adaptive limit, failure isolation."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Sequence

from conveyor.errors import PermanentError, UnavailableError
from conveyor.events import Envelope, Topic, new_event
from conveyor.models.base import GenerationRequest, Token
from conveyor.models.simulated import SimulatedModel
from conveyor.observability.metrics import BATCH_LIMIT, BATCH_SIZE, BATCH_WAIT, REGISTRY
from conveyor.payloads import (
    DeadLetter,
    EventType,
    GenerationCompleted,
    RequestAccepted,
    RequestPrepared,
    TokenChunk,
    decode,
)
from conveyor.pipeline import BatchPolicy, Output, RetryPolicy, Stage, StageContext
from conveyor.runtime.batching import Batcher
from conveyor.runtime.worker import HandlerContext
from conveyor.stages import CancelWatch, generate_stage
from conveyor.testing import MemoryEventLog, MemoryStateStore, StageHarness

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002)
Results = AsyncGenerator[tuple[int, Sequence[Output] | Exception], None]


def accepted(prompt: str, key: str) -> Envelope:
    return new_event(type=EventType.ACCEPTED, source="test", payload=RequestAccepted(prompt=prompt), key=key)


def echo(ctx: StageContext, event: Envelope) -> Sequence[Output]:
    prompt = decode(RequestAccepted, event.data).prompt
    return [
        Output(
            Topic.PREPARED, ctx.derive(event, type=EventType.PREPARED, payload=RequestAccepted(prompt=prompt))
        )
    ]


def batching_stage(
    name: str, policy: BatchPolicy, batches: list[list[str]], *, poison: str = "", broken: bool = False
) -> tuple[Stage, list[str]]:
    """Echoes prompts; records each batch's prompts, and the prompts handled alone."""
    alone: list[str] = []

    async def handle_batch(ctx: StageContext, events: Sequence[Envelope]) -> Results:
        prompts = [decode(RequestAccepted, e.data).prompt for e in events]
        batches.append(prompts)
        if broken and len(events) > 1:
            raise RuntimeError("the whole batch failed")
        for index, event in enumerate(events):
            if prompts[index] == poison:
                yield index, PermanentError(f"cannot handle {poison}")
            else:
                yield index, echo(ctx, event)

    async def handle(ctx: StageContext, event: Envelope) -> Sequence[Output]:
        alone.append(decode(RequestAccepted, event.data).prompt)
        return echo(ctx, event)

    stage = Stage(
        name=name,
        consumes=(Topic.REQUESTS,),
        handler=handle,
        handle_batch=handle_batch,
        batching=policy,
        retry=FAST_RETRY,
        dedupe=False,
    )
    return stage, alone


async def test_events_of_different_keys_leave_in_batches_of_at_most_max_size() -> None:
    batches: list[list[str]] = []
    stage, alone = batching_stage("b-size", BatchPolicy(max_size=4, max_wait=0.0), batches)
    harness = StageHarness(stage)
    async with harness.running() as worker:
        await harness.log.publish(Topic.REQUESTS, [accepted(f"p{i}", key=f"k{i}") for i in range(10)])
        await worker.idle()
    assert sorted(p for batch in batches for p in batch) == sorted(f"p{i}" for i in range(10))
    assert max(len(batch) for batch in batches) == 4  # grouped, never above the limit
    assert alone == []
    assert sorted(
        decode(RequestAccepted, e.data).prompt for e in harness.published(Topic.PREPARED)
    ) == sorted(f"p{i}" for i in range(10))
    assert BATCH_SIZE.count(stage="b-size") == len(batches)
    assert BATCH_WAIT.count(stage="b-size") == 10
    assert 'conveyor_batch_size_bucket{stage="b-size",le="4"}' in REGISTRY.render()


async def test_a_batch_waits_to_fill_until_max_wait() -> None:
    batches: list[list[str]] = []
    # A long wait: the first event is held until a second one fills the batch.
    stage, _ = batching_stage("b-fill", BatchPolicy(max_size=2, max_wait=60.0), batches)
    assert stage.handle_batch is not None
    ctx = HandlerContext("b-fill", MemoryEventLog(), MemoryStateStore())
    batcher = Batcher("b-fill", stage.handle_batch, ctx, stage.batching, timeout=10)
    first = asyncio.create_task(batcher.submit(accepted("first", key="a")))
    done, _ = await asyncio.wait({first}, timeout=0.05)
    assert not done  # held, waiting for company
    await batcher.submit(accepted("second", key="b"))
    await first
    assert batches == [["first", "second"]]

    # A short wait: a lone event leaves on its own once it is over.
    lone: list[list[str]] = []
    stage, _ = batching_stage("b-lone", BatchPolicy(max_size=8, max_wait=0.01), lone)
    out = await StageHarness(stage).handle(accepted("alone", key="a"))
    assert lone == [["alone"]]
    assert len(out[Topic.PREPARED]) == 1


async def test_events_of_one_key_are_never_in_the_same_batch() -> None:
    batches: list[list[str]] = []
    stage, _ = batching_stage("b-key", BatchPolicy(max_size=8, max_wait=0.0), batches)
    harness = StageHarness(stage)
    async with harness.running() as worker:
        await harness.log.publish(Topic.REQUESTS, [accepted(f"p{i}", key="same") for i in range(5)])
        await worker.idle()
    assert batches == [["p0"], ["p1"], ["p2"], ["p3"], ["p4"]]  # one lane: one at a time, in order


async def test_an_event_failing_in_its_batch_is_dead_lettered_alone() -> None:
    batches: list[list[str]] = []
    stage, alone = batching_stage("b-poison", BatchPolicy(max_size=8), batches, poison="p2")
    harness = StageHarness(stage)
    async with harness.running() as worker:
        await harness.log.publish(Topic.REQUESTS, [accepted(f"p{i}", key=f"k{i}") for i in range(4)])
        await worker.idle()
    (letter,) = harness.published(Topic.DLQ)
    assert "cannot handle p2" in decode(DeadLetter, letter.data).error
    published = sorted(decode(RequestAccepted, e.data).prompt for e in harness.published(Topic.PREPARED))
    assert published == ["p0", "p1", "p3"]
    assert alone == []  # a permanent error of its own is not retried


async def test_when_a_whole_batch_fails_each_event_is_retried_alone() -> None:
    batches: list[list[str]] = []
    stage, alone = batching_stage("b-broken", BatchPolicy(max_size=8), batches, broken=True)
    harness = StageHarness(stage)
    async with harness.running() as worker:
        await harness.log.publish(Topic.REQUESTS, [accepted(f"p{i}", key=f"k{i}") for i in range(3)])
        await worker.idle()
    assert any(len(batch) > 1 for batch in batches)
    assert sorted(alone) == ["p0", "p1", "p2"]
    assert Topic.DLQ not in harness.log.topics() or harness.published(Topic.DLQ) == []
    assert len(harness.published(Topic.PREPARED)) == 3


async def test_the_adaptive_limit_grows_while_the_target_holds_and_halves_when_missed() -> None:
    now = 0.0
    work = 0.005  # how long a batch "takes": the handler moves the clock

    async def handle_batch(ctx: StageContext, events: Sequence[Envelope]) -> Results:
        nonlocal now
        now += work
        for index, event in enumerate(events):
            yield index, echo(ctx, event)

    ctx = HandlerContext("b-adapt", MemoryEventLog(), MemoryStateStore())
    policy = BatchPolicy(max_size=4, max_wait=0.0, target_latency=0.01)
    batcher = Batcher("b-adapt", handle_batch, ctx, policy, timeout=10, clock=lambda: now)

    async def wave(n: int) -> None:
        await asyncio.gather(*(batcher.submit(accepted(f"p{i}", key=f"k{i}")) for i in range(n)))

    assert batcher.limit == 1  # adaptive: starts small
    for expected in (2, 3, 4, 4):
        await wave(batcher.limit)  # a full batch within the target
        assert batcher.limit == expected
        assert BATCH_LIMIT.value(stage="b-adapt") == expected
    work = 0.02  # longer than the target
    await wave(4)
    assert batcher.limit == 2
    await wave(2)
    assert batcher.limit == 1
    await batcher.close()


async def test_generate_batches_requests_and_each_gets_its_own_answer() -> None:
    model = SimulatedModel()
    log = MemoryEventLog()
    stage = generate_stage(model, CancelWatch(log), batching=BatchPolicy(max_size=8))
    harness = StageHarness(stage, log=log)
    prompts = [f"question {i}" for i in range(6)]
    events = [
        new_event(
            type=EventType.PREPARED,
            source="test",
            payload=RequestPrepared(prompt=p, max_tokens=16),
            key=f"user{i}",
        )
        for i, p in enumerate(prompts)
    ]
    before = BATCH_SIZE.count(stage="generate")
    async with harness.running() as worker:
        await log.publish(Topic.PREPARED, events)
        await worker.idle()
    answers = {
        e.request_id: decode(GenerationCompleted, e.data).text for e in harness.published(Topic.GENERATED)
    }
    expected = {e.request_id: "".join(model.answer(p, 16)[0]) for e, p in zip(events, prompts, strict=True)}
    assert answers == expected
    assert BATCH_SIZE.count(stage="generate") - before < len(events)  # some requests shared a batch


class _RefusesOne(SimulatedModel):
    """Fails the request whose prompt is ``refuse`` on its own, as a real backend would."""

    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        fine = [r for r in requests if r.prompt != "refuse"]
        for r in requests:
            if r.prompt == "refuse":
                yield Token(r.id, "", error=PermanentError("the upstream refused it"))
        async for token in super().generate(fine):
            yield token


async def test_a_request_refused_inside_a_generate_batch_is_dead_lettered_and_its_batch_mates_finish() -> (
    None
):
    log = MemoryEventLog()
    harness = StageHarness(generate_stage(_RefusesOne(), CancelWatch(log)), log=log)
    events = [
        new_event(type=EventType.PREPARED, source="test", payload=RequestPrepared(prompt=p), key=p)
        for p in ("hello", "refuse", "world")
    ]
    async with harness.running() as worker:
        await log.publish(Topic.PREPARED, events)
        await worker.idle()
    (letter,) = harness.published(Topic.DLQ)
    assert "the upstream refused it" in decode(DeadLetter, letter.data).error
    assert letter.request_id == events[1].request_id
    assert {e.request_id for e in harness.published(Topic.GENERATED)} == {
        events[0].request_id,
        events[2].request_id,
    }


class _StreamFailsOnce(MemoryEventLog):
    """The first chunk of one request cannot be published (the broker hiccups)."""

    def __init__(self, request_id: str) -> None:
        super().__init__()
        self.request_id, self.failed = request_id, False

    async def publish(self, topic: str, events: Sequence[Envelope]) -> None:
        if topic == Topic.STREAM and not self.failed and events[0].request_id == self.request_id:
            self.failed = True
            raise UnavailableError("stream publish failed")
        await super().publish(topic, events)


class _Recording(SimulatedModel):
    def __init__(self) -> None:
        super().__init__(ttft=0.02, token_delay=0.005)
        self.cancelled: list[str] = []

    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        async for token in super().generate(requests):
            if token.finish_reason == "cancelled":
                self.cancelled.append(token.request_id)
            yield token


async def test_a_request_whose_chunk_cannot_be_published_stops_and_is_retried_alone() -> None:
    events = [
        new_event(type=EventType.PREPARED, source="test", payload=RequestPrepared(prompt=p), key=p)
        for p in ("alpha", "beta", "gamma")
    ]
    log = _StreamFailsOnce(events[1].request_id)
    model = _Recording()
    stage = dataclasses.replace(generate_stage(model, CancelWatch(log)), retry=FAST_RETRY)
    harness = StageHarness(stage, log=log)
    async with harness.running() as worker:
        await log.publish(Topic.PREPARED, events)
        await worker.idle()
    assert log.failed
    assert model.cancelled == [events[1].request_id]  # its first run stopped at once...
    finished = [e.request_id for e in harness.published(Topic.GENERATED)]
    assert sorted(finished) == sorted(e.request_id for e in events)  # ...and its retry finished it
    assert Topic.DLQ not in log.topics()


class _StreamStalls(MemoryEventLog):
    """One request's chunks wait for ``release`` (a broker slow to answer that publish);
    ``others_done`` is set once every other request's [generated] is on the log."""

    def __init__(self, stalled: str, others: set[str]) -> None:
        super().__init__()
        self.stalled, self.others = stalled, others
        self.release, self.others_done = asyncio.Event(), asyncio.Event()

    async def publish(self, topic: str, events: Sequence[Envelope]) -> None:
        if topic == Topic.STREAM and events[0].request_id == self.stalled:
            await self.release.wait()
        await super().publish(topic, events)
        done = {e.request_id for e in self.events(Topic.GENERATED)}
        if self.others <= done:
            self.others_done.set()


async def test_a_chunk_slow_to_publish_holds_up_only_its_own_request() -> None:
    events = [
        new_event(type=EventType.PREPARED, source="test", payload=RequestPrepared(prompt=p), key=p)
        for p in ("alpha", "beta", "gamma")
    ]
    stalled = events[0].request_id
    log = _StreamStalls(stalled, {e.request_id for e in events[1:]})
    # The first token takes longer than ChunkPolicy.first_delay: each request's leaves alone.
    model = SimulatedModel(ttft=0.02, token_delay=0.001)
    stage = generate_stage(model, CancelWatch(log), batching=BatchPolicy(max_size=3, max_wait=0.05))
    harness = StageHarness(stage, log=log)
    async with harness.running() as worker:
        await log.publish(Topic.PREPARED, events)
        async with asyncio.timeout(10):
            await log.others_done.wait()  # its batch mates finished while its first chunk hung
        assert stalled not in {e.request_id for e in harness.published(Topic.GENERATED)}
        log.release.set()
        await worker.idle()
    # Once the broker answers, the stalled request's chunks are on the log in order, whole,
    # and its [generated] comes after the last of them.
    chunks = [decode(TokenChunk, e.data) for e in harness.published(Topic.STREAM) if e.request_id == stalled]
    tokens, _ = model.answer("alpha", 256)
    assert [c.offset for c in chunks] == sorted(c.offset for c in chunks)
    assert "".join(c.text for c in chunks) == "".join(tokens)
    assert chunks[-1].final
    generated = [e for e in harness.published(Topic.GENERATED) if e.request_id == stalled]
    assert len(generated) == 1
