"""The claim-check around the log: large payloads in the blob store, the contract unchanged (the
event-log conformance suite runs on it too), and what happens when a blob cannot be read."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import pytest

from conveyor.blobs.memory import MemoryBlobStore
from conveyor.config import Settings
from conveyor.errors import UnavailableError
from conveyor.events import Envelope, Topic, new_event
from conveyor.log.claim_check import ClaimCheckLog
from conveyor.log.memory import MemoryEventLog
from conveyor.observability.metrics import BLOB_BYTES
from conveyor.payloads import DeadLetter, EventType, RequestAccepted, decode
from conveyor.pipeline import Output, RetryPolicy, Stage, StageContext
from conveyor.runtime.worker import StageWorker
from conveyor.store.memory import MemoryStateStore
from tests.conftest import NodeFactory
from tests.helpers import read_sse, submit, wait_final

pytestmark = pytest.mark.timeout(30)

LIMIT = 1024


def accepted(prompt: str) -> Envelope:
    return new_event(type=EventType.ACCEPTED, source="test", payload=RequestAccepted(prompt=prompt))


def claim_check() -> tuple[ClaimCheckLog, MemoryEventLog, MemoryBlobStore]:
    inner, blobs = MemoryEventLog(ack_wait=2.0), MemoryBlobStore()
    return ClaimCheckLog(inner, blobs, limit=LIMIT), inner, blobs


async def test_a_large_payload_travels_as_a_reference_and_every_read_gets_it_back() -> None:
    log, inner, blobs = claim_check()
    large, small = accepted("x" * 5000), accepted("hi")
    written, read = BLOB_BYTES.value(op="written"), BLOB_BYTES.value(op="read")
    await log.publish(Topic.REQUESTS, [large, small])
    on_the_log = inner.events(Topic.REQUESTS)
    assert on_the_log[0] == dataclasses.replace(large, data=b"", dataref=f"events/{large.id}")
    assert on_the_log[1] == small  # under the limit: as it was, no blob
    assert blobs.blobs == {f"events/{large.id}": large.data}

    subscription = await log.subscribe(Topic.REQUESTS, "g")
    deliveries = await subscription.fetch(10, timeout=1)
    assert [d.envelope() for d in deliveries] == [large, small]
    assert [t.envelope async for t in log.tail(Topic.REQUESTS, None, follow=False)] == [large, small]
    assert await log.find(Topic.REQUESTS, large.request_id) == large
    # /metrics counts what went through the blob store: one write, three reads.
    assert BLOB_BYTES.value(op="written") - written == len(large.data)
    assert BLOB_BYTES.value(op="read") - read == 3 * len(large.data)


async def test_a_publish_again_of_the_same_event_stores_it_once() -> None:
    log, inner, blobs = claim_check()
    large = accepted("y" * 5000)
    await log.publish(Topic.REQUESTS, [large])
    await log.publish(Topic.REQUESTS, [large])  # a retried publish: the log's dedupe drops it
    assert len(inner.events(Topic.REQUESTS)) == 1
    assert list(blobs.blobs) == [f"events/{large.id}"]


def echo(seen: list[str]) -> Stage:
    async def handle(ctx: StageContext, event: Envelope) -> Sequence[Output]:
        prompt = decode(RequestAccepted, event.data).prompt
        seen.append(prompt)
        out = ctx.derive(event, type=EventType.PREPARED, payload=RequestAccepted(prompt=prompt))
        return [Output(Topic.PREPARED, out)]

    retry = RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.002)
    return Stage(name="echo", consumes=(Topic.REQUESTS,), handler=handle, retry=retry)


async def run_until_idle(stage: Stage, log: ClaimCheckLog, *events: Envelope) -> None:
    worker, stop = StageWorker(stage, log, MemoryStateStore()), asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await worker.ready.wait()
    await log.publish(Topic.REQUESTS, list(events))
    await worker.idle()
    stop.set()
    await task


async def test_a_stage_reads_a_large_event_whole_and_its_large_output_goes_to_the_blob_store() -> None:
    log, inner, blobs = claim_check()
    seen: list[str] = []
    await run_until_idle(echo(seen), log, accepted("z" * 5000))
    assert seen == ["z" * 5000]
    (out,) = inner.events(Topic.PREPARED)
    assert out.data == b""
    assert decode(RequestAccepted, blobs.blobs[out.dataref]).prompt == "z" * 5000


async def test_an_event_whose_blob_is_gone_is_dead_lettered_with_the_reason_and_the_rest_flows() -> None:
    log, inner, blobs = claim_check()
    lost, later = accepted("lost " * 1000), accepted("after it")
    await log.publish(Topic.REQUESTS, [lost])
    blobs.blobs.clear()  # expired, or deleted by hand
    seen: list[str] = []
    await run_until_idle(echo(seen), log, later)
    assert seen == ["after it"]
    (letter,) = [decode(DeadLetter, e.data) for e in inner.events(Topic.DLQ)]
    assert f"blob store as events/{lost.id}" in letter.error
    assert letter.original_headers["ce-dataref"] == f"events/{lost.id}"  # a redrive can find it again


async def test_an_unreadable_blob_store_hands_the_event_back_until_it_answers() -> None:
    class Flaky(MemoryBlobStore):
        failures = 2

        async def get(self, name: str) -> bytes | None:
            if self.failures:
                self.failures -= 1
                raise UnavailableError("connection refused")
            return await super().get(name)

    inner, blobs = MemoryEventLog(ack_wait=5.0), Flaky()
    log = ClaimCheckLog(inner, blobs, limit=LIMIT)
    handled: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handle(ctx: StageContext, event: Envelope) -> Sequence[Output]:
        handled.set_result(decode(RequestAccepted, event.data).prompt)
        return []

    stage = Stage(name="wait", consumes=(Topic.REQUESTS,), handler=handle)
    worker, stop = StageWorker(stage, log, MemoryStateStore()), asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await log.publish(Topic.REQUESTS, [accepted("w" * 5000)])
        assert await asyncio.wait_for(handled, 20) == "w" * 5000
    finally:
        stop.set()
        await task
    assert blobs.failures == 0
    assert inner.events(Topic.DLQ) == []


async def test_the_whole_pipeline_runs_with_every_payload_in_the_blob_store(node: NodeFactory) -> None:
    # A limit of one byte: every event of every stage, the stream's chunks and the projector's
    # reads go through the blob store; the client sees nothing different.
    async with node(settings={"blob_url": "memory://", "max_event_bytes": 1}) as client:
        rid = await submit(client, "Write a haiku about queues")
        view = await wait_final(client, rid)
        assert view["status"] == "completed"
        events = await read_sse(client, rid)
    assert "".join(data["text"] for _, kind, data in events if kind == "token") == view["output"]
    assert [kind for _, kind, _ in events][-1] == "completed"


async def test_the_gateway_takes_large_bodies_only_with_a_blob_store(node: NodeFactory) -> None:
    prompt = "a" * 300_000
    async with node() as client:  # the memory log and no blob store: 256 KiB
        response = await client.post("/v1/requests", json={"prompt": prompt})
        assert response.status_code == 413
        assert "262144 bytes" in response.json()["error"]["message"]
    async with node(settings={"blob_url": "memory://"}) as client:
        rid = await submit(client, prompt)
        assert (await wait_final(client, rid))["status"] == "completed"


def test_a_nats_log_brings_a_blob_store_and_a_kafka_log_needs_one_named() -> None:
    assert Settings().body_limit == 8 * 1024 * 1024  # the bundled NATS server's object store
    assert Settings(log_url="nats://127.0.0.1:4222").blobs_for("nats://127.0.0.1:4222") is not None
    kafka = Settings(log_url="kafka://127.0.0.1:9092")
    assert (kafka.blobs_for("kafka://127.0.0.1:9092"), kafka.body_limit) == (None, 256 * 1024)
    with_s3 = Settings(log_url="kafka://127.0.0.1:9092", blob_url="s3://bucket/conveyor")
    assert (with_s3.blobs_for("kafka://127.0.0.1:9092"), with_s3.body_limit) == (
        "s3://bucket/conveyor",
        8 * 1024 * 1024,
    )
