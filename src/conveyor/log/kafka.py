"""EventLog on Apache Kafka (``pip install 'conveyor[kafka]'``), through confluent-kafka (librdkafka).

Why librdkafka and not aiokafka: measured in benchmarks/README.md (3x the produce rate, its
idempotent producer works on every broker we test against, typed). Its calls block, so each
consumer lives on a thread of its own and hands batches to the event loop; the producer is
called from the loop (``produce`` only enqueues) and a thread serves its delivery reports.

Layout: topic ``<prefix>.<topic>`` with ``partitions`` partitions (created on first use),
group ``<prefix>.<group>``. The partition of an event is ``murmur2(key) % partitions``, the
Java client's (and aiokafka's) default partitioner, computed here so ``tail`` knows where a
key lives. A position is ``partition << 40 | offset + 1``: unique in the topic, ordered
within a key, and resumable by ``tail`` for that key.

How the EventLog contract maps onto Kafka:

* Acks come out of order (keys are handled concurrently), Kafka commits one offset per
  partition: a subscription commits each partition up to its lowest unacked offset, every
  ``commit_interval``, and before giving a partition up in a rebalance. A crash redelivers
  what was not committed; the runtime acks only after its outputs are durable.
* Kafka does not redeliver single messages: ``nak(delay)`` and an expired ``ack_wait``
  redeliver locally, on the same member, with ``attempt + 1``. After a crash or a rebalance
  the new owner starts again at the committed offset with ``attempt`` 1: the count of earlier
  deliveries is not stored in Kafka (commit metadata could carry it, but tansu drops it), so a
  message that kills its worker every time is not caught by ``max_deliveries`` on Kafka.
* Dedupe of re-published ids: the idempotent producer drops its own retries; ids published
  by this process within ``duplicate_window`` are not sent again; and a subscription skips
  (and acks) a message whose id it already saw at another offset of the partition (the last
  ``dedupe_ids`` ids per partition). A copy whose original was committed before a rebalance
  is delivered again: consumers stay idempotent, as on every backend.
* ``tail`` of one key reads the key's partition only, starting at the offset of the key's
  UUIDv7 time (``offsets_for_times``) when the key is such an id (request ids are), so a
  request's stream is not searched from the start of the topic. Following one key (an SSE
  stream follows its request's chunks) takes the key's records from one reader per topic and
  process that every such tail shares (a librdkafka consumer, and its threads, per open stream
  would not scale), and the history before them from what that reader kept (its last 30 s) when
  the key is a request created since it started, else reads it to the partition's end with a
  reader of its own. ``tail`` of every key
  ``since`` a time starts each partition at that time the same way. ``find`` reads every
  partition from the request id's time, for at most ``find_window`` seconds of records.
* ``lag`` is high watermark minus committed offset, per group and partition; the high
  watermark comes from a fetch response, which every broker gets right.

tansu (the broker the tests run on) differs from Apache Kafka, and the code is written for
Kafka: ListOffsets LATEST is wrong there (hence the watermark from a fetch), and
``offsets_for_times`` answers 0 (so ``tail`` and ``find`` read from the start of the
partition there, skipping by record time what is too old: fine for tests, which is all tansu is for).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from conveyor.errors import MissingExtraError, UnavailableError
from conveyor.events import Envelope
from conveyor.ids import CLOCK_SKEW_MS, created_ms
from conveyor.log.base import Delivery, Lag, Tailed, check_bounds
from conveyor.log.followers import Followers

try:
    import confluent_kafka
    from confluent_kafka import (
        ConsumerGroupTopicPartitions,
        KafkaError,
        KafkaException,
        Message,
        TopicPartition,
    )
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("confluent-kafka", "kafka") from exc

logger = logging.getLogger("conveyor.log.kafka")
T = TypeVar("T")

_OFFSET_BITS = 40
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1
_CLOCK_SKEW_MS = CLOCK_SKEW_MS
_KEEP_FOLLOWED = 30.0  # seconds a shared reader keeps records: streams opened sooner read no history


def partition_for(key: str, partitions: int) -> int:
    """The partition of ``key``: Kafka's murmur2, as Java clients, aiokafka and librdkafka's
    ``murmur2_random`` partitioner pick it (librdkafka's default, CRC32, would not agree)."""
    return confluent_kafka.murmur2(key.encode(), partitions)


def position(partition: int, offset: int) -> int:
    return partition << _OFFSET_BITS | (offset + 1)


Headers = list[tuple[str, str | bytes | None]]


def _headers(message: Message) -> dict[str, str]:
    raw = message.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return {k: v.decode(errors="replace") if isinstance(v, bytes) else v or "" for k, v in pairs}


def _unavailable(what: str, exc: BaseException) -> UnavailableError:
    return UnavailableError(f"{what} failed: {exc!r}")


class KafkaEventLog:
    """Topics ``<prefix>.<topic>`` with ``partitions`` partitions; one idempotent producer per log."""

    def __init__(
        self,
        bootstrap: str,
        *,
        prefix: str = "conveyor",
        partitions: int = 8,
        replication: int = 1,
        ack_wait: float = 30.0,
        session_timeout: float = 10.0,
        fetch_wait: float = 0.05,
        commit_interval: float = 0.2,
        duplicate_window: float = 600.0,
        dedupe_ids: int = 10_000,
        find_window: float = 60.0,
        max_buffered: int = 1000,
        config: dict[str, Any] | None = None,
    ) -> None:
        self._bootstrap, self._prefix = bootstrap, prefix
        self._partitions, self._replication = partitions, replication
        self._ack_wait, self._commit_interval = ack_wait, commit_interval
        self._session_timeout, self._fetch_wait = session_timeout, fetch_wait
        self._duplicate_window, self._dedupe_ids = duplicate_window, dedupe_ids
        self._find_window, self._max_buffered = find_window, max_buffered
        self._config = {"bootstrap.servers": bootstrap, "logger": logger, **(config or {})}
        self._admin_client: AdminClient | None = AdminClient(self._config)
        self._producer = confluent_kafka.Producer(
            {
                **self._config,
                "enable.idempotence": True,  # retries inside a session are deduped by the broker
                "linger.ms": 1,
                "partitioner": "murmur2_random",  # only for records produced without a partition
                "message.timeout.ms": 30_000,
            }
        )
        self._counts: dict[str, int] = {}
        self._topics_lock = asyncio.Lock()
        self._recent: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()
        self._subscriptions: set[_Subscription] = set()
        self._watermark_reader: _Reader | None = None
        self._watermark_partitions: set[tuple[str, int]] = set()
        self._watermark_lock = asyncio.Lock()
        self._shared: dict[str, _SharedReader] = {}
        self._shared_lock = asyncio.Lock()
        self._serving = True
        self._server = threading.Thread(target=self._serve_deliveries, name="conveyor-kafka-producer")
        self._server.start()

    @classmethod
    async def open(cls, url: str, **options: Any) -> KafkaEventLog:
        """``kafka://HOST:PORT[,HOST:PORT…][?partitions=N&replication=N&session_timeout=S]``.

        ``session_timeout``: seconds before the group gives a silent member's partitions to the
        others (how fast a killed worker's share moves on)."""
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        for name in ("partitions", "replication"):
            if name in query:
                options.setdefault(name, int(query[name]))
        if "session_timeout" in query:
            options.setdefault("session_timeout", float(query["session_timeout"]))
        log = cls(parts.netloc, **options)
        try:
            await log.ping()
        except UnavailableError:
            await log.close()
            raise
        return log

    @property
    def _admin(self) -> AdminClient:
        if self._admin_client is None:
            raise UnavailableError("the Kafka event log is closed")
        return self._admin_client

    def topic_name(self, topic: str) -> str:
        return f"{self._prefix}.{topic}"

    def group_name(self, group: str) -> str:
        return f"{self._prefix}.{group}"

    def _serve_deliveries(self) -> None:
        while self._serving:
            self._producer.poll(0.05)

    async def _topic(self, topic: str) -> int:
        """Create the topic if needed; its partition count (an existing topic keeps its own)."""
        count = self._counts.get(topic)
        if count is not None:
            return count
        name = self.topic_name(topic)
        async with self._topics_lock:
            if topic not in self._counts:
                new = NewTopic(name, num_partitions=self._partitions, replication_factor=self._replication)
                try:
                    await asyncio.wrap_future(self._admin.create_topics([new])[name])
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise _unavailable(f"creating topic {name}", exc) from exc
                metadata = await asyncio.to_thread(self._admin.list_topics, name, 10)
                self._counts[topic] = len(metadata.topics[name].partitions)
        return self._counts[topic]

    def _seen_recently(self, topic: str, event_id: str, now: float) -> bool:
        while self._recent and next(iter(self._recent.values())) < now - self._duplicate_window:
            self._recent.popitem(last=False)
        return (topic, event_id) in self._recent

    async def publish(self, topic: str, events: Sequence[Envelope]) -> None:
        now = time.monotonic()
        fresh: dict[str, Envelope] = {}
        for event in events:
            if event.id not in fresh and not self._seen_recently(topic, event.id, now):
                fresh[event.id] = event
        if not fresh:
            return
        count = await self._topic(topic)
        name = self.topic_name(topic)
        batch = _DeliveryBatch(asyncio.get_running_loop(), len(fresh))
        for event in fresh.values():
            headers: Headers = [*event.to_headers().items()]
            await self._produce(name, event.key, headers, event.data, count, batch.delivered)
        await batch.done
        for event_id in batch.stored:
            self._recent[(topic, event_id)] = now
        if batch.error is not None:
            raise UnavailableError(f"publish to {topic} failed: {batch.error}")

    async def publish_raw(self, topic: str, key: str, headers: dict[str, str] | None, body: bytes) -> None:
        """Publish bytes as any producer could (used to prove garbage cannot stall a stage)."""
        count = await self._topic(topic)
        batch = _DeliveryBatch(asyncio.get_running_loop(), 1)
        pairs: Headers = [*(headers or {}).items()]
        await self._produce(self.topic_name(topic), key, pairs, body, count, batch.delivered)
        await batch.done
        if batch.error is not None:
            raise UnavailableError(f"publish to {topic} failed: {batch.error}")

    async def _produce(
        self,
        name: str,
        key: str,
        headers: Headers,
        body: bytes,
        partitions: int,
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    name,
                    body,
                    key.encode(),
                    partition=partition_for(key, partitions),
                    headers=headers,
                    on_delivery=on_delivery,
                )
                return
            except BufferError:  # librdkafka's queue is full: let deliveries drain it
                await asyncio.sleep(0.005)
            except KafkaException as exc:
                raise _unavailable(f"publish to {name}", exc) from exc

    async def subscribe(self, topic: str, group: str) -> _Subscription:
        await self._topic(topic)
        conf = {
            **self._config,
            "group.id": self.group_name(group),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",  # a new group reads the topic from its start
            "session.timeout.ms": int(self._session_timeout * 1000),
            "heartbeat.interval.ms": max(100, int(self._session_timeout * 1000 / 3)),
            "fetch.wait.max.ms": int(self._fetch_wait * 1000),
        }
        sub = _Subscription(self, topic, group, conf)
        self._subscriptions.add(sub)
        sub.start()
        return sub

    def _reader(self, **conf: Any) -> _Reader:
        return _Reader(
            {
                **self._config,
                "group.id": self.group_name("_reader"),  # required by librdkafka, never joined
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": int(self._fetch_wait * 1000),
                **conf,
            }
        )

    async def tail(
        self,
        topic: str,
        key: str | None,
        *,
        after: int = 0,
        follow: bool = True,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> AsyncGenerator[Tailed, None]:
        check_bounds(follow, until)
        if key is None and after:
            raise ValueError("tail of every key starts at the beginning: resume a position with its key")
        seen: collections.OrderedDict[str, int] = collections.OrderedDict()
        reading = (
            self._follow(topic, key, after, seen)
            if follow and key is not None and since is None
            else self._read(topic, key, after, follow, since, until, seen)
        )
        async with contextlib.aclosing(reading):
            async for tailed in reading:
                yield tailed

    async def _follow(
        self, topic: str, key: str, after: int, seen: collections.OrderedDict[str, int]
    ) -> AsyncGenerator[Tailed, None]:
        """Follow one key: its history (kept by the topic's shared reader, or read to the
        partition's end), then its records as the shared reader brings them. It listens before it
        reads that history, and the shared reader was there first: what is written after the end
        reaches the listener, the rest is history, and what is both is sent once (by position)."""
        shared = await self._shared_reader(topic)
        with shared.followers.listen(key.encode(), created_ms(key)) as (arrivals, kept):
            position = after
            if kept is None:  # not all of it kept by the shared reader: read it
                async for past in self._read(topic, key, after, False, None, None, seen):
                    position = past.position
                    yield past
            first: collections.deque[Message] = collections.deque(kept or ())
            while True:
                arrival = first.popleft() if first else await arrivals.get()
                if isinstance(arrival, Exception):
                    raise arrival
                tailed = self._tailed(arrival, seen)
                if tailed is not None and tailed.position > position:
                    position = tailed.position
                    yield tailed

    async def _read(
        self,
        topic: str,
        key: str | None,
        after: int,
        follow: bool,
        since: datetime | None,
        until: datetime | None,
        seen: collections.OrderedDict[str, int],
    ) -> AsyncGenerator[Tailed, None]:
        """``tail`` with a reader of its own; ``seen``: the event ids read so far, with their offsets."""
        count = await self._topic(topic)
        name = self.topic_name(topic)
        wanted = key.encode() if key is not None else None
        since_ms = None if since is None else int(since.timestamp() * 1000)
        until_ms = None if until is None else int(until.timestamp() * 1000)
        reader = self._reader()
        try:
            if key is None:
                partitions = list(range(count))
                starts = [confluent_kafka.OFFSET_BEGINNING] * count
                if since_ms is not None:  # each partition from its first record stamped since then
                    asked = [TopicPartition(name, p, since_ms) for p in partitions]
                    found = [(tp.partition, tp.offset) for tp in await reader.offsets_for_times(asked)]
                    if not follow:  # -1: no record that recent, nothing to read there
                        found = [(p, o) for p, o in found if o >= 0]
                    if not found:
                        return
                    partitions = [p for p, _ in found]
                    starts = [o if o >= 0 else confluent_kafka.OFFSET_END for _, o in found]
            else:
                partitions = [partition_for(key, count)]
                start = (after & _OFFSET_MASK) if after else await self._key_start(reader, name, key, count)
                starts = [start]
            await reader.assign([TopicPartition(name, p, o) for p, o in zip(partitions, starts, strict=True)])
            ended: set[int] = set()
            past: set[int] = set()  # partitions read up to ``until``
            while follow or len(ended) < len(partitions):
                for message in await reader.read(500, 0.5):
                    error = message.error()
                    partition = message.partition() or 0
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            ended.add(partition)
                        continue
                    if until_ms is not None and (partition in past or message.timestamp()[1] >= until_ms):
                        if partition not in past:  # the partition's end: later records are not read
                            past.add(partition)
                            ended.add(partition)
                            await reader.pause([TopicPartition(name, partition)])
                        continue
                    if wanted is not None and message.key() != wanted:
                        continue  # another key of the same partition
                    if since_ms is not None and message.timestamp()[1] < since_ms:
                        continue  # a broker that cannot look up by time (tansu answers 0) reads these
                    tailed = self._tailed(message, seen)
                    if tailed is not None:
                        yield tailed
        finally:
            reader.close()

    async def _shared_reader(self, topic: str) -> _SharedReader:
        async with self._shared_lock:
            shared = self._shared.get(topic)
            if shared is None or shared.broken:
                count = await self._topic(topic)
                name = self.topic_name(topic)
                reader = self._reader()
                try:
                    # From the first record stamped a little before now, or (none is) from the
                    # end as it was before looking: every record written from now on is read. A
                    # broker that cannot look up by time (tansu answers 0) costs a longer read.
                    now = int(time.time() * 1000)
                    ends = [await reader.high_watermark(TopicPartition(name, p)) for p in range(count)]
                    asked = [TopicPartition(name, p, now - _CLOCK_SKEW_MS) for p in range(count)]
                    found = {tp.partition: tp.offset for tp in await reader.offsets_for_times(asked)}
                    starts = [TopicPartition(name, p, o if o >= 0 else ends[p]) for p, o in found.items()]
                    await reader.assign(starts)
                except KafkaException as exc:
                    reader.close()
                    raise _unavailable(f"following {topic}", exc) from exc
                shared = self._shared[topic] = _SharedReader(reader, now)
        return shared

    def _tailed(self, message: Message, seen: collections.OrderedDict[str, int]) -> Tailed | None:
        """The record as an event; None for a foreign message or a re-published copy."""
        offset, partition = message.offset() or 0, message.partition() or 0
        try:
            envelope = Envelope.from_headers(_headers(message), message.value() or b"")
        except ValueError:
            logger.debug("skipping an undecodable record at %s/%s", partition, offset)
            return None
        if seen.setdefault(envelope.id, offset) != offset:
            return None
        if len(seen) > self._dedupe_ids:
            seen.popitem(last=False)
        return Tailed(position(partition, offset), envelope)

    async def _key_start(self, reader: _Reader, name: str, key: str, count: int) -> int:
        """Where a key's events can start: at its UUIDv7 time when it is one (request ids are)."""
        created = created_ms(key)
        if created is None:
            return confluent_kafka.OFFSET_BEGINNING
        (found,) = await reader.offsets_for_times([TopicPartition(name, partition_for(key, count), created)])
        return found.offset if found.offset >= 0 else confluent_kafka.OFFSET_END

    async def find(self, topic: str, request_id: str) -> Envelope | None:
        created = created_ms(request_id)
        if created is None:
            return None  # no time to start from: finding it would mean reading whole partitions
        count = await self._topic(topic)
        name = self.topic_name(topic)
        since, until = created - _CLOCK_SKEW_MS, created + int(self._find_window * 1000)
        reader = self._reader()
        found: tuple[int, Envelope] | None = None
        try:
            starts = await reader.offsets_for_times([TopicPartition(name, p, since) for p in range(count)])
            live = {tp.partition for tp in starts if tp.offset >= 0}
            await reader.assign([tp for tp in starts if tp.partition in live])
            while live:
                for message in await reader.read(500, 0.5):
                    partition = message.partition() or 0
                    error = message.error()
                    if error is not None or message.timestamp()[1] > until:
                        if error is None or error.code() == KafkaError._PARTITION_EOF:
                            live.discard(partition)
                            await reader.pause([TopicPartition(name, partition)])
                        continue
                    headers = _headers(message)
                    if partition in live and headers.get("ce-subject") == request_id:
                        with contextlib.suppress(ValueError):
                            event = Envelope.from_headers(headers, message.value() or b"")
                            if found is None or message.timestamp()[1] >= found[0]:
                                found = (message.timestamp()[1], event)
        except KafkaException as exc:
            raise _unavailable(f"find in {topic}", exc) from exc
        finally:
            reader.close()
        return found[1] if found else None

    async def lag(self) -> list[Lag]:
        try:
            for sub in list(self._subscriptions):
                await sub.commit_now()
            topics = await self._topics_with_partitions()
            groups = await self._groups_with_offsets(topics)
            watermarks = await self._watermarks(topics)
        except KafkaException as exc:
            raise _unavailable("reading consumer lag", exc) from exc
        in_flight: collections.Counter[tuple[str, str, int]] = collections.Counter()
        for sub in self._subscriptions:
            in_flight.update(sub.in_flight())
        out = []
        for (topic, group), committed in sorted(groups.items()):
            for partition in range(topics[topic]):
                low, high = watermarks.get((topic, partition), (0, 0))
                held = in_flight[(topic, group, partition)]
                done = committed.get(partition, -1)
                behind = max(0, high - (done if done >= 0 else low))
                out.append(Lag(topic, group, max(0, behind - held), held, partition=partition))
        return out

    async def _topics_with_partitions(self) -> dict[str, int]:
        metadata = await asyncio.to_thread(self._admin.list_topics, None, 10)
        start = self.topic_name("")
        return {
            name[len(start) :]: len(meta.partitions)
            for name, meta in metadata.topics.items()
            if name.startswith(start)
        }

    async def _groups_with_offsets(self, topics: dict[str, int]) -> dict[tuple[str, str], dict[int, int]]:
        """Committed offsets of every group of this prefix on every topic it committed to, and of
        this process's subscriptions (which may not have committed yet)."""
        listing = await asyncio.wrap_future(self._admin.list_consumer_groups())
        start = self.group_name("")
        groups = {g.group_id for g in listing.valid if g.group_id.startswith(start)}
        groups.discard(self.group_name("_reader"))
        out: dict[tuple[str, str], dict[int, int]] = {
            (sub.topic, sub.group): {} for sub in self._subscriptions
        }
        everything = [TopicPartition(self.topic_name(t), p) for t, n in topics.items() for p in range(n)]
        for group in sorted(groups):
            request = [ConsumerGroupTopicPartitions(group, everything)]
            result = await asyncio.wrap_future(self._admin.list_consumer_group_offsets(request)[group])
            for tp in result.topic_partitions or []:
                if tp.offset >= 0:
                    key = (tp.topic[len(self.topic_name("")) :], group[len(start) :])
                    out.setdefault(key, {})[tp.partition] = tp.offset
        return out

    async def _watermarks(self, topics: dict[str, int]) -> dict[tuple[str, int], tuple[int, int]]:
        """(low, high) per partition from a fetch response: ListOffsets LATEST is wrong on tansu.

        One reader is kept for it, paused between calls: making a consumer per call cost ~100 ms
        of CPU and ~0.6 s each time, and admission control asks twice a second."""
        wanted = {(self.topic_name(t), p) for t, n in topics.items() for p in range(n)}
        partitions = [TopicPartition(t, p, confluent_kafka.OFFSET_END) for t, p in sorted(wanted)]
        async with self._watermark_lock:
            reader = self._watermark_reader
            if reader is None or wanted != self._watermark_partitions:
                if reader is not None:
                    reader.close()
                # Only the watermark is wanted: small fetches, a small queue.
                conf = {"max.partition.fetch.bytes": 1024, "queued.max.messages.kbytes": 64}
                reader = self._watermark_reader = self._reader(**conf)
                self._watermark_partitions = set(wanted)  # (wanted is emptied below)
                await reader.assign(partitions)
            else:
                await reader.resume(partitions)
            out: dict[tuple[str, int], tuple[int, int]] = {}
            try:
                await reader.read(1000, self._fetch_wait * 2)  # one fetch round: fresh watermarks
                deadline = time.monotonic() + 5.0
                while wanted and time.monotonic() < deadline:
                    for topic, partition in list(wanted):
                        low, high = await reader.cached_watermarks(TopicPartition(topic, partition))
                        if high >= 0:
                            wanted.discard((topic, partition))
                            out[(topic[len(self.topic_name("")) :], partition)] = (max(low, 0), high)
                    if wanted:
                        await reader.read(1000, 0.05)
            finally:
                await reader.pause(partitions)  # no fetching between calls
        return out

    async def ping(self) -> None:
        try:
            await asyncio.to_thread(self._admin.list_topics, None, 2.0)
        except KafkaException as exc:
            raise _unavailable("reaching Kafka", exc) from exc

    async def delete_topics(self) -> None:
        """Remove every topic this log used (test isolation); call it after ``close``: a client
        still holding a deleted topic can crash in librdkafka on tansu's next metadata answer."""
        names = [self.topic_name(t) for t in self._counts]
        self._counts.clear()
        if names:
            admin = AdminClient(self._config)
            for future in admin.delete_topics(names).values():
                with contextlib.suppress(KafkaException):
                    await asyncio.wrap_future(future)

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.close()
        if self._serving:
            await asyncio.to_thread(self._producer.flush, 10)
            self._serving = False
            await asyncio.to_thread(self._server.join)
            self._producer.close()
        if self._watermark_reader is not None:
            self._watermark_reader.close()
            self._watermark_reader = None
        for shared in self._shared.values():
            await shared.close()
        self._shared.clear()
        # Dropping the admin client closes its connections (it has no close of its own); a
        # broker shutting down gracefully waits for its clients to go.
        self._admin_client = None

    def _forget(self, sub: _Subscription) -> None:
        self._subscriptions.discard(sub)


class _DeliveryBatch:
    """Collects one publish call's delivery reports (on the producer's thread) into one future."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self._loop, self._left = loop, count
        self.done: asyncio.Future[None] = loop.create_future()
        self.stored: list[str] = []
        self.error: KafkaError | None = None

    def delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.stored.append(_headers(message).get("ce-id", ""))
        elif self.error is None:
            self.error = error
        self._left -= 1
        if self._left == 0:
            self._loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _Reader:
    """A consumer outside any group, assigned to chosen partitions (``tail``, ``find``, ``lag``).

    Every call runs on the reader's own thread, in order: librdkafka calls block, and a
    cancelled read must finish before the consumer is closed.
    """

    def __init__(self, conf: dict[str, Any]) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="conveyor-kafka-reader")
        self._consumer = self._pool.submit(confluent_kafka.Consumer, conf)

    async def _call(self, call: Callable[[confluent_kafka.Consumer], T]) -> T:
        consumer = await asyncio.wrap_future(self._consumer)
        return await asyncio.wrap_future(self._pool.submit(call, consumer))

    async def offsets_for_times(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return await self._call(lambda c: c.offsets_for_times(partitions, 10))

    async def assign(self, partitions: list[TopicPartition]) -> None:
        await self._call(lambda c: c.assign(partitions))

    async def pause(self, partitions: list[TopicPartition]) -> None:
        await self._call(lambda c: c.pause(partitions))

    async def resume(self, partitions: list[TopicPartition]) -> None:
        await self._call(lambda c: c.resume(partitions))

    async def high_watermark(self, partition: TopicPartition) -> int:
        """The partition's end, asked of the broker (ListOffsets: right on Kafka, not on tansu)."""
        _, high = await self._call(lambda c: c.get_watermark_offsets(partition, 10, cached=False) or (-1, -1))
        return int(high)

    async def cached_watermarks(self, partition: TopicPartition) -> tuple[int, int]:
        low, high = await self._call(lambda c: c.get_watermark_offsets(partition, cached=True) or (-1, -1))
        return int(low), int(high)

    async def read(self, limit: int, wait: float) -> list[Message]:
        """What arrived: waits up to ``wait`` for a first message, then takes what else is queued."""
        return await self._call(lambda c: _poll_batch(c, limit, wait))

    def close(self) -> concurrent.futures.Future[None]:
        """Close on the reader's thread after any read still running (callable from a finally);
        done once the consumer is closed."""
        closed = self._pool.submit(lambda: self._consumer.result().close())
        self._pool.shutdown(wait=False)
        return closed


class _SharedReader:
    """The topic's one reader for the tails that follow its keys (``Followers``). A read that
    fails hands the error to every follower (each then reads its key again from where it was,
    through another reader) and ends this one."""

    def __init__(self, reader: _Reader, since_ms: int) -> None:
        self._reader = reader
        self.followers: Followers[bytes, Message] = Followers(
            since_ms=since_ms, skew_ms=_CLOCK_SKEW_MS, keep=_KEEP_FOLLOWED
        )
        self.broken = False
        self._closed: concurrent.futures.Future[None] | None = None
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                for message in await self._reader.read(500, 0.5):
                    if message.error() is None:
                        self.followers.deliver(message.key() or b"", message)
        except Exception as exc:  # the reader failed: its followers read again, through another
            self.broken = True
            logger.warning("the shared reader of a followed topic failed: %r", exc)
            self.followers.fail(UnavailableError(f"following a topic failed: {exc!r}"))
        finally:
            self._closed = self._reader.close()

    async def close(self) -> None:
        """Stop reading; returns once the reader is closed (its topic may be deleted then)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._closed is None:  # cancelled before it ever ran
            self._closed = self._reader.close()
        await asyncio.wrap_future(self._closed)


def _poll_batch(consumer: confluent_kafka.Consumer, limit: int, wait: float) -> list[Message]:
    # consume(n, timeout) waits for n messages or the timeout: poll wakes on the first one.
    first = consumer.poll(wait)
    if first is None:
        return []
    return [first, *consumer.consume(limit - 1, 0)] if limit > 1 else [first]


@dataclasses.dataclass(slots=True)
class _Partition:
    """What a member knows of one assigned partition; ``generation`` tells assignments apart."""

    generation: int
    pending: collections.deque[int] = dataclasses.field(default_factory=collections.deque)
    acked: set[int] = dataclasses.field(default_factory=set)
    next_offset: int = -1  # one past the last offset received in this assignment
    committed: int = -1

    def committable(self) -> int:
        """The offset to commit: the lowest not acked yet (acks arrive out of order)."""
        while self.pending and self.pending[0] in self.acked:
            self.acked.discard(self.pending.popleft())
        return self.pending[0] if self.pending else self.next_offset


@dataclasses.dataclass(slots=True)
class _Record:
    partition: int
    offset: int
    generation: int
    headers: dict[str, str]
    body: bytes


@dataclasses.dataclass(slots=True)
class _Held:
    record: _Record
    attempt: int
    due: float


class _Subscription:
    """One member of a consumer group; its consumer runs on a thread, deliveries on the loop.

    The thread polls (which also serves rebalances and heartbeats), commits, and pauses its
    partitions while ``max_buffered`` records wait; the loop side hands records out, tracks
    acks, and redelivers what was nacked or not acked within ``ack_wait``. Partition state is
    shared under a lock.
    """

    def __init__(self, log: KafkaEventLog, topic: str, group: str, conf: dict[str, Any]) -> None:
        self._log, self.topic, self.group = log, topic, group
        self._name = log.topic_name(topic)
        self._loop = asyncio.get_running_loop()
        self._consumer = confluent_kafka.Consumer(conf)
        self._lock = threading.Lock()
        self._parts: dict[int, _Partition] = {}
        self._generations = 0
        self._buffer: collections.deque[_Record] = collections.deque()
        self._held: dict[tuple[int, int], _Held] = {}
        self._seen: dict[int, collections.OrderedDict[str, int]] = {}
        self._arrived = asyncio.Event()
        self._commit_waiters: list[concurrent.futures.Future[None]] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"conveyor-kafka-{self._name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- the consumer's thread

    def _run(self) -> None:
        consumer = self._consumer
        consumer.subscribe(
            [self._name], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        next_commit = 0.0
        try:
            while not self._closing.is_set():
                if self._commit_waiters or time.monotonic() >= next_commit:
                    self._commit(None)
                    next_commit = time.monotonic() + self._log._commit_interval
                room = self._log._max_buffered - len(self._buffer)  # read across threads: a hint
                if room <= 0:
                    consumer.pause(consumer.assignment())  # keeps polling (the group) without fetching
                    consumer.poll(0.05)
                    consumer.resume(consumer.assignment())
                    continue
                batch = _poll_batch(consumer, room, 0.1)
                if batch:
                    self._hand_over(batch)
        except Exception:
            logger.exception("consumer of %s (%s) stopped", self._name, self.group)
        finally:
            self._commit(None)
            with contextlib.suppress(Exception):
                consumer.close()  # leaves the group: the others take its partitions at once
            self._answer_commit_waiters()

    def _hand_over(self, batch: list[Message]) -> None:
        records = []
        with self._lock:
            for message in batch:
                part = self._parts.get(message.partition() or 0)
                if message.error() is not None or part is None:
                    if message.error() is not None:
                        logger.warning("consumer of %s: %s", self._name, message.error())
                    continue
                offset = message.offset() or 0
                part.pending.append(offset)
                part.next_offset = offset + 1
                partition = message.partition() or 0
                headers, body = _headers(message), message.value() or b""
                records.append(_Record(partition, offset, part.generation, headers, body))
        if records:
            self._loop.call_soon_threadsafe(self._receive, records)

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                self._generations += 1
                self._parts[tp.partition] = _Partition(self._generations)

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # Still the owner here: commit what is done, then forget (the next owner redelivers the rest).
        self._commit({tp.partition for tp in partitions})
        self._on_lost(_consumer, partitions)

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                self._parts.pop(tp.partition, None)

    def _commit(self, only: set[int] | None) -> None:
        with self._lock:
            offsets = {
                p: offset
                for p, part in self._parts.items()
                if (only is None or p in only) and (offset := part.committable()) > part.committed
            }
        if offsets:
            tps = [TopicPartition(self._name, p, o) for p, o in offsets.items()]
            try:
                self._consumer.commit(offsets=tps, asynchronous=False)
            except KafkaException as exc:
                logger.warning("commit on %s failed (retried): %s", self._name, exc)
            else:
                with self._lock:
                    for p, offset in offsets.items():
                        if (part := self._parts.get(p)) is not None:
                            part.committed = max(part.committed, offset)
        self._answer_commit_waiters()

    def _answer_commit_waiters(self) -> None:
        with self._lock:
            waiters, self._commit_waiters = self._commit_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- the event loop

    def _receive(self, records: list[_Record]) -> None:
        self._buffer.extend(records)
        self._arrived.set()

    def _current(self, record: _Record) -> bool:
        with self._lock:
            part = self._parts.get(record.partition)
            return part is not None and part.generation == record.generation

    def _duplicate(self, record: _Record) -> bool:
        """A re-published copy of an event this member saw at another offset of the partition."""
        event_id = record.headers.get("ce-id")
        if not event_id:
            return False
        seen = self._seen.setdefault(record.partition, collections.OrderedDict())
        if seen.setdefault(event_id, record.offset) != record.offset:
            return True
        if len(seen) > self._log._dedupe_ids:
            seen.popitem(last=False)
        return False

    def _take(self, limit: int) -> list[Delivery]:
        now = time.monotonic()
        out: list[Delivery] = []
        for key, held in list(self._held.items()):
            if len(out) >= limit:
                break
            if not self._current(held.record):
                del self._held[key]  # the partition moved to another member, which redelivers it
            elif held.due <= now:
                out.append(self._deliver(held.record, held.attempt + 1))
        while self._buffer and len(out) < limit:
            record = self._buffer.popleft()
            if not self._current(record):
                continue
            if self._duplicate(record):
                self._settle(record)
                continue
            out.append(self._deliver(record, 1))
        return out

    def _deliver(self, record: _Record, attempt: int) -> Delivery:
        key = (record.partition, record.offset)
        self._held[key] = held = _Held(record, attempt, time.monotonic() + self._log._ack_wait)

        async def ack() -> None:
            if self._held.get(key) is held:
                del self._held[key]
            self._settle(record)

        async def nak(delay: float) -> None:
            if self._held.get(key) is held:
                held.due = time.monotonic() + delay
                self._arrived.set()  # a waiting fetch recomputes when to wake

        async def progress() -> None:
            if self._held.get(key) is held:
                held.due = time.monotonic() + self._log._ack_wait

        return Delivery(
            topic=self.topic,
            headers=record.headers,
            body=record.body,
            attempt=attempt,
            position=position(record.partition, record.offset),
            _ack=ack,
            _nak=nak,
            _progress=progress,
        )

    def _settle(self, record: _Record) -> None:
        with self._lock:
            part = self._parts.get(record.partition)
            if part is not None and part.generation == record.generation:
                part.acked.add(record.offset)

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            if not self._thread.is_alive() and not self._closing.is_set():
                raise UnavailableError(f"the consumer of {self._name} stopped")
            taken = self._take(max_messages)
            if taken or (remaining := deadline - time.monotonic()) <= 0:
                return taken
            due = min((h.due for h in self._held.values()), default=deadline) - time.monotonic()
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(remaining, due))):
                    await self._arrived.wait()

    def in_flight(self) -> Iterable[tuple[str, str, int]]:
        """(topic, group, partition) of every delivery not acked yet, once each."""
        return [(self.topic, self.group, partition) for partition, _ in self._held]

    async def commit_now(self) -> None:
        """Commit what is acked now rather than at the next interval (``lag`` reads commits)."""
        if not self._thread.is_alive():
            return
        waiter: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            self._commit_waiters.append(waiter)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await asyncio.wrap_future(waiter)

    async def close(self) -> None:
        """Commit what is acked and leave the group; unacked records go to the next owner."""
        self._closing.set()
        await asyncio.to_thread(self._thread.join, self._log._session_timeout + 10)
        self._buffer.clear()
        self._held.clear()
        self._log._forget(self)
