"""The broker fails under load: a single NATS server restarted, one node of a three-node
JetStream cluster killed. Producers and consumers reconnect, submissions made while the
log cannot take them are refused with a retryable 503, and every accepted request
completes exactly once."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx
import nats
import pytest

from conveyor.cluster import NatsCluster
from conveyor.embedded import EmbeddedNats, port_accepts
from conveyor.errors import UnavailableError
from conveyor.jetstream import parse_url
from conveyor.log.nats import NatsEventLog
from conveyor.store.base import Namespace
from conveyor.store.nats_kv import NatsStateStore
from tests.conformance.test_event_log import drain, event
from tests.conftest import unique_prefix
from tests.e2e.conftest import ConveyorFactory
from tests.helpers import assert_completed_exactly_once, read_sse, wait_final

pytestmark = pytest.mark.slow

T = TypeVar("T")

# Slow enough that requests are generating when the broker fails; a short ack deadline so
# events whose acks died with a server are redelivered within 2 s.
SLOW_MODEL = ("--model-token-delay", "0.01", "--ack-wait", "2")
MAX_TOKENS = 20
PER_PHASE = 20  # requests accepted before the fault, and again after it


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    started = NatsCluster.launch(tmp_path / "cluster")
    try:
        yield started
    finally:
        started.terminate()


class Load:
    """Clients submitting prompts concurrently, retrying a 503 as its Retry-After asks."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.accepted: dict[str, str] = {}  # prompt -> request id
        self.statuses: collections.Counter[int] = collections.Counter()
        self.refused = asyncio.Event()  # a 503 was seen

    async def serving(self) -> None:
        """Return once a request went through every stage: ``conveyor up`` prints its banner
        before its worker process has subscribed to every topic."""
        await self.submit(["warm-up"])
        assert (await wait_final(self.client, self.accepted["warm-up"]))["status"] == "completed"

    async def submit(self, prompts: Iterable[str], *, within: float = 30) -> None:
        """Submit every prompt at once; return when all are accepted (fail after ``within`` s)."""
        async with asyncio.timeout(within):
            await asyncio.gather(*(self._until_accepted(prompt) for prompt in prompts))

    async def _until_accepted(self, prompt: str) -> None:
        while True:
            response = await self.client.post(
                "/v1/requests", json={"prompt": prompt, "max_tokens": MAX_TOKENS}
            )
            self.statuses[response.status_code] += 1
            if response.status_code == 202:
                self.accepted[prompt] = response.json()["id"]
                return
            # Anything but "unavailable, retry" (a 500, a hang) would fail the test here.
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"] == "1"
            self.refused.set()
            await asyncio.sleep(0.05)  # a client's retry pause (shorter than Retry-After, to be quick)

    async def assert_completed_exactly_once(self, store_url: str) -> None:
        store = await NatsStateStore.open(store_url)
        try:
            prompts, rids = list(self.accepted), list(self.accepted.values())
            await assert_completed_exactly_once(self.client, store, prompts, rids, max_tokens=MAX_TOKENS)
        finally:
            await store.close()


def phase(name: str) -> list[str]:
    return [f"{name} {i}" for i in range(PER_PHASE)]


async def test_a_restarted_broker_loses_nothing_accepted(conveyor: ConveyorFactory, tmp_path: Path) -> None:
    server = EmbeddedNats.launch(tmp_path / "nats")
    servers = [server]
    try:
        up = conveyor(*SLOW_MODEL, "--log-url", server.url).start()
        async with httpx.AsyncClient(base_url=up.url, timeout=30) as client:
            load = Load(client)
            await load.serving()
            await load.submit(phase("before"))
            await read_sse(client, load.accepted["before 19"], stop_after=4)  # generation is under way

            os.kill(server.pid, signal.SIGKILL)  # the file store keeps what it acknowledged
            assert server.process is not None
            server.process.wait()
            during = asyncio.create_task(load.submit(phase("during")))
            async with asyncio.timeout(10):
                await load.refused.wait()  # the gateway says "retry" while the log is down
            assert not load.accepted.keys() & set(phase("during"))
            # The same port and store, as a supervisor restarting the server would.
            servers.append(await asyncio.to_thread(EmbeddedNats.launch, server.data_dir, port=server.port))
            await during  # producers reconnected: every refused submission went through on retry

            assert set(load.statuses) == {202, 503}
            await load.assert_completed_exactly_once(up.log_url)
        assert up.stop() == 0
    finally:
        for started in servers:
            if started.process is not None and started.process.poll() is None:
                started.terminate()


async def stream_leader(cluster: NatsCluster, stream: str) -> str:
    """The name of the node that leads ``stream`` (read from the stream's info)."""
    nc = await nats.connect(cluster.url.split(","))
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    assert info.cluster is not None
    assert info.cluster.leader
    return str(info.cluster.leader)


async def test_a_cluster_node_killed_under_load_loses_nothing_accepted(
    conveyor: ConveyorFactory, cluster: NatsCluster
) -> None:
    up = conveyor(*SLOW_MODEL, "--log-url", cluster.log_url(replicas=3)).start()
    assert up.log_url == cluster.log_url(replicas=3)
    async with httpx.AsyncClient(base_url=up.url, timeout=30) as client:
        load = Load(client)
        await load.serving()
        await load.submit(phase("before"))
        await read_sse(client, load.accepted["before 19"], stop_after=4)  # generation is under way

        # The node leading the requests stream: the gateway's own appends must fail over.
        cluster.kill(await stream_leader(cluster, "CONVEYOR_REQUESTS"))
        killed_at = time.monotonic()
        await load.submit(phase("after"))  # still accepting (after a 503 or two during the election)
        accepted_after = time.monotonic() - killed_at

        assert set(load.statuses) <= {202, 503}
        await load.assert_completed_exactly_once(up.log_url)
    assert up.stop() == 0
    assert accepted_after < 20, f"new requests were refused for {accepted_after:.1f} s after the node died"


async def test_cluster_streams_and_buckets_keep_three_copies_and_survive_a_node(
    cluster: NatsCluster,
) -> None:
    prefix = unique_prefix()
    log = await NatsEventLog.open(cluster.log_url(), prefix=prefix, ack_wait=2.0)
    store = await NatsStateStore.open(cluster.log_url(), prefix=prefix)
    nc = await nats.connect(cluster.url.split(","))
    try:
        first = [event(f"first {i}", key=f"k{i}") for i in range(5)]
        await log.publish("requests", first)
        sub = await log.subscribe("requests", "workers")
        for delivery in await drain(sub, 5):
            await delivery.ack()
        assert await store.create(Namespace.USAGE, "before", b"1") is not None

        js = nc.jetstream()
        await acked_on_every_replica(js, log.stream_name("requests"), "workers", upto=5)
        streams = {
            "log": await js.stream_info(log.stream_name("requests")),
            "bucket": await js.stream_info(f"KV_{store.bucket_name(Namespace.USAGE)}"),
        }
        consumer = await js.consumer_info(log.stream_name("requests"), "workers")
        placements = {kind: info.cluster for kind, info in streams.items()} | {"consumer": consumer.cluster}
        for kind, placement in placements.items():
            assert placement is not None, kind
            assert placement.leader, kind
            assert len(placement.replicas or []) == 2, kind  # besides the leader
        assert [info.config.num_replicas for info in streams.values()] == [3, 3]

        leader = placements["log"]
        assert leader is not None
        assert leader.leader is not None
        cluster.kill(leader.leader)  # the stream's leader (and maybe the consumer's and the bucket's)

        # Writes wait for a new leader (nats-server elects one within seconds): retried, as
        # the stage runtime retries a failed publish.
        second = [event(f"second {i}", key=f"k{i}") for i in range(5)]
        await retry_unavailable(lambda: log.publish("requests", second))
        got = await drain(sub, 5, timeout=20)  # the open subscription moved to the new leader
        assert sorted(d.envelope().id for d in got) == sorted(e.id for e in second)
        for delivery in got:
            await delivery.ack()
        assert await retry_unavailable(lambda: store.create(Namespace.USAGE, "after", b"2")) is not None
        before = await store.get(Namespace.USAGE, "before")
        assert before is not None
        assert before.value == b"1"
        assert await store.create(Namespace.USAGE, "before", b"again") is None  # still create-only
        assert await sub.fetch(10, timeout=0.3) == []  # nothing acknowledged came back
        await sub.close()
    finally:
        await nc.close()
        await log.close()
        await store.close()


async def test_conveyor_cluster_serves_until_sigterm_then_stops_every_node(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "conveyor", "cluster", "--data-dir", str(tmp_path)]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(30):
            assert process.stdout is not None
            banner = [(await process.stdout.readline()).decode() for _ in range(3)]
        found = re.search(r'--log-url "(\S+)"', banner[1])
        assert found, banner
        target = parse_url(found.group(1))
        assert (len(target.servers), target.replicas) == (3, 3)
        log = await NatsEventLog.open(found.group(1))
        try:
            await log.ping()  # JetStream answers: the meta leader is elected
        finally:
            await log.close()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
        ports = [urlsplit(server).port for server in target.servers]
        assert not any(port_accepts(port) for port in ports if port is not None)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def acked_on_every_replica(
    js: nats.js.JetStreamContext, stream: str, consumer: str, *, upto: int, within: float = 10
) -> None:
    """Until the consumer's acks up to ``upto`` are on every replica. An ack is not confirmed to
    the client: one still on its way when the leader dies is lost, and at-least-once delivery
    then rightly delivers the message again, which is not what the test is about."""
    deadline = time.monotonic() + within
    while True:
        info = await js.consumer_info(stream, consumer)
        replicas = (info.cluster.replicas if info.cluster else None) or []
        floor = (info.ack_floor.stream_seq if info.ack_floor else 0) or 0
        caught_up = all(r.current and not r.lag for r in replicas)
        if floor >= upto and not info.num_ack_pending and caught_up:
            return
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.05)  # a poll of the consumer's state, which sends no event


async def retry_unavailable(call: Callable[[], Awaitable[T]], *, within: float = 20) -> T:
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except UnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # a retry pause; the deadline bounds it
