"""Payloads too large for the log through ``conveyor up``: the bundled NATS server's object store,
and S3 (moto's server) beside Kafka and Redis."""

from __future__ import annotations

import httpx
import pytest

from conveyor.blobs.base import BlobStore
from conveyor.blobs.nats import NatsBlobStore
from conveyor.blobs.object_storage import ObjectStorageBlobs
from conveyor.events import Topic
from conveyor.log.kafka import KafkaEventLog
from conveyor.log.nats import NatsEventLog
from conveyor.payloads import RequestAccepted, RequestPrepared, decode
from tests.conftest import s3_prefixed, unique_prefix
from tests.e2e.conftest import ConveyorFactory
from tests.helpers import read_sse, submit, wait_final

pytestmark = pytest.mark.timeout(120)

# ~1.4 MB: over what a NATS message (1 MB) or a Kafka record (1 MB by default) may carry.
PROMPT = "Summarise this document. " + "The queue absorbs the burst while workers drain it. " * 27_000


@pytest.mark.parametrize("backends", ["bundled-nats", "kafka+redis+s3"])
async def test_a_prompt_too_large_for_the_log_is_answered_through_the_blob_store(
    conveyor: ConveyorFactory, backends: str, request: pytest.FixtureRequest
) -> None:
    log: NatsEventLog | KafkaEventLog
    blobs: BlobStore
    if backends == "kafka+redis+s3":
        prefix, kafka_url = unique_prefix(), request.getfixturevalue("kafka_url")
        blob_url = s3_prefixed(request.getfixturevalue("s3_url"), prefix)
        options = ("--log-url", kafka_url, "--store-url", request.getfixturevalue("redis_url"))
        up = conveyor(*options, "--blob-url", blob_url, env={"CONVEYOR_PREFIX": prefix}).start()
        log = await KafkaEventLog.open(kafka_url, prefix=prefix)
        blobs = ObjectStorageBlobs(blob_url)
    else:
        up = conveyor().start()
        log = await NatsEventLog.open(up.log_url)
        blobs = await NatsBlobStore.open(up.log_url)
    try:
        async with httpx.AsyncClient(base_url=up.url, timeout=60) as client:
            rid = await submit(client, PROMPT, max_tokens=16)
            view = await wait_final(client, rid, wait=60)
            assert view["status"] == "completed", view
            assert view["usage"]["prompt_tokens"] > 100_000  # the model read all of it
            events = await read_sse(client, rid)
            assert "".join(data["text"] for _, kind, data in events if kind == "token") == view["output"]
            # Retried with an Idempotency-Key: the gateway keeps the event it published with the key
            # (to publish the very same one again), as the log has it: a reference, not 1.4 MB.
            retried = [
                await client.post(
                    "/v1/requests", json={"prompt": PROMPT}, headers={"Idempotency-Key": "doc-1"}
                )
                for _ in range(2)
            ]
            assert [r.status_code for r in retried] == [202, 200]
            assert retried[0].json()["id"] == retried[1].json()["id"]
            # The OpenAI API, as an SDK sends a long document: the same pipeline.
            chat = await client.post(
                "/v1/chat/completions",
                json={"model": "simulated", "messages": [{"role": "user", "content": PROMPT}]},
            )
            assert chat.status_code == 200, chat.text
            assert chat.json()["choices"][0]["message"]["content"]
        # On the log itself (read without the claim-check), the event carries a reference to the
        # blob that holds its payload, and an empty body; the redacted prompt of prepare's event too.
        accepted = await log.find(Topic.REQUESTS, rid)
        prepared = await log.find(Topic.PREPARED, rid)
        assert accepted is not None
        assert prepared is not None
        assert (accepted.data, prepared.data) == (b"", b"")
        assert accepted.dataref == f"events/{accepted.id}"
        stored = await blobs.get(accepted.dataref)
        assert stored is not None
        assert decode(RequestAccepted, stored).prompt == PROMPT
        stored = await blobs.get(prepared.dataref)
        assert stored is not None
        assert decode(RequestPrepared, stored).prompt == PROMPT
    finally:
        await log.close()
        await blobs.close()
