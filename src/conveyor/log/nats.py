"""EventLog on NATS JetStream: a stream per topic, durable pull consumers per group.

Subjects are ``<prefix>.<topic>.<key>.<request id>`` (unsafe characters hashed), so
one key's events can be read alone (``tail``), one request's events found without a
scan (``find``), and a partitioned deployment can map subjects to partitions.
Publishing sets ``Nats-Msg-Id`` to the event id: JetStream drops a second copy
published within the stream's duplicate window, which is what makes a redelivered
stage input produce its (deterministic) outputs only once.

On a cluster (``?replicas=3``) every stream and its consumers keep three copies, so
the log keeps serving when one node dies; the client moves to another node by itself.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import re
import time
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError as JsNotFound

from conveyor.errors import UnavailableError
from conveyor.events import Envelope
from conveyor.jetstream import JetStreamBackend, stored
from conveyor.log.base import Delivery, Lag, Tailed, check_bounds
from conveyor.log.followers import Followers

_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DAY = 86_400.0


def key_token(key: str) -> str:
    """A subject token for a partition key: the key itself when safe, else a stable hash."""
    if _SAFE_TOKEN.match(key):
        return key
    return "h" + hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


class NatsEventLog(JetStreamBackend):
    """One JetStream stream per topic (``<PREFIX>_<TOPIC>``) on file storage."""

    client_name = "conveyor-log"

    def __init__(
        self,
        nc: Client,
        *,
        prefix: str = "conveyor",
        duplicate_window: float = 600.0,
        ack_wait: float = 30.0,
        max_ack_pending: int = 2000,
        retention: float = 7 * _DAY,
        replicas: int = 1,
    ) -> None:
        super().__init__(nc, replicas=replicas)
        self._prefix = prefix
        self._duplicate_window = duplicate_window
        self._ack_wait = ack_wait
        self._max_ack_pending = max_ack_pending
        self._retention = retention
        self._ready: set[str] = set()
        self._lock = asyncio.Lock()
        self._shared: dict[str, _SharedConsumer] = {}

    def stream_name(self, topic: str) -> str:
        return f"{self._prefix}_{topic}".upper().replace("-", "_").replace(".", "_")

    def subject(self, topic: str, key: str, request_id: str) -> str:
        return f"{self._prefix}.{topic}.{key_token(key)}.{key_token(request_id)}"

    def _filter(self, topic: str, key: str | None) -> str:
        return f"{self._prefix}.{topic}.>" if key is None else f"{self._prefix}.{topic}.{key_token(key)}.*"

    async def _ensure(self, topic: str) -> str:
        name = self.stream_name(topic)
        if topic in self._ready:
            return name
        async with self._lock:
            if topic not in self._ready:
                config = api.StreamConfig(
                    name=name,
                    subjects=[f"{self._prefix}.{topic}.>"],
                    storage=api.StorageType.FILE,
                    retention=api.RetentionPolicy.LIMITS,
                    max_age=self._retention,
                    duplicate_window=self._duplicate_window,
                    allow_direct=True,
                    num_replicas=self.replicas,
                )
                try:
                    await self._js.add_stream(config)
                except nats.js.errors.BadRequestError:
                    await self._js.update_stream(config)
                self._ready.add(topic)
        return name

    async def publish(self, topic: str, events: Sequence[Envelope]) -> None:
        if not events:
            return
        if not self._nc.is_connected:
            # Buffered while reconnecting, it could still be stored after the caller was told
            # it failed: refuse it now, so "unavailable" means "not on the log".
            raise UnavailableError(f"publish to {topic} failed: not connected to NATS")
        try:
            # Each ack is awaited at most ``timeout`` (Replies): one lost with a dying server
            # must not hang the gateway's submit, or a stage's event, for good.
            stream = await self._ensure(topic)
            requests = []
            for event in events:
                headers = event.to_headers()
                headers["Nats-Msg-Id"] = event.id
                headers["Nats-Expected-Stream"] = stream
                requests.append((self.subject(topic, event.key, event.request_id), event.data, headers))
            for ack in await self._heard(requests):
                stored(ack)
        except (nats.errors.Error, TimeoutError) as exc:
            raise UnavailableError(f"publish to {topic} failed: {exc!r}") from exc

    async def publish_raw(self, topic: str, key: str, headers: dict[str, str] | None, body: bytes) -> None:
        """Publish bytes as any producer could (used to prove garbage cannot stall a stage)."""
        stream = await self._ensure(topic)
        await self._js.publish(self.subject(topic, key, key), body, headers=headers, stream=stream)

    async def subscribe(self, topic: str, group: str) -> _PullConsumer:
        config = api.ConsumerConfig(
            durable_name=group,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self._ack_wait,
            max_ack_pending=self._max_ack_pending,
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subject=f"{self._prefix}.{topic}.>",
        )
        try:
            stream = await self._ensure(topic)
            await self._js.add_consumer(stream, config)
            consumer = _PullConsumer(self._nc, topic, stream, group)
            await consumer.start()
        except (nats.errors.Error, TimeoutError) as exc:
            raise UnavailableError(f"subscribe to {topic} as {group} failed: {exc!r}") from exc
        return consumer

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
        stream = await self._ensure(topic)
        subject = self._filter(topic, key)
        if follow and key is not None and since is None:
            async for tailed in self._follow_key(topic, stream, key, subject, after):
                yield tailed
            return
        start = after + 1
        newest = None
        if since is not None:
            newest = await self._last_position(stream, None, subject)  # first: no event slips between
            first = await self._first_stored(stream, since)
            start = max(start, newest + 1 if first is None else first)
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        end = None
        if not follow and key is None and newest is not None:
            end = newest  # the stream's end, read just now for ``since``
        elif not follow:
            end = await self._last_position(stream, key, subject)
        if end is not None and until is not None:
            beyond = await self._first_stored(stream, until)
            # Cut short by the bound, the key still has a later event: its delivery ends the read.
            end = end if beyond is None else min(end, beyond - 1)
        if end is not None and end < start:
            return
        sub = await self._js.subscribe(subject, stream=stream, ordered_consumer=True, config=config)
        try:
            while True:
                msg = await sub.next_msg(timeout=None)
                position = _delivered(msg.reply)[1]
                if end is not None and position > end:
                    return
                yield Tailed(position, Envelope.from_headers(msg.headers, msg.data))
                if end is not None and position >= end:
                    return
        finally:
            await sub.unsubscribe()

    async def _follow_key(
        self, topic: str, stream: str, key: str, subject: str, after: int
    ) -> AsyncGenerator[Tailed, None]:
        """Follow one key (an SSE stream follows its request's chunks) through the topic's shared
        consumer: its history first, one lookup an event, then what the consumer brings.

        The tail listens before it reads where the key's history ends, and the shared consumer
        already runs then: an event stored after that read reaches the listener, one stored
        before it is in the history, and one that is both is sent once (by position)."""
        shared = await self._shared_consumer(topic, stream)
        with shared.followers.listen(key_token(key), None) as (arrivals, _):
            end = await self._last_position(stream, key, subject)
            position = after
            while position < end:
                found = await self._stored(stream, {"seq": position + 1, "next_by_subj": subject})
                if found is None or int(found["seq"]) > end:
                    break
                position = int(found["seq"])
                data = base64.b64decode(found.get("data") or "")
                yield Tailed(position, Envelope.from_headers(_header_block(found.get("hdrs")), data))
            while True:
                arrival = await arrivals.get()
                if isinstance(arrival, Exception):
                    raise arrival
                arrived, headers, data = arrival
                if arrived > position:
                    position = arrived
                    yield Tailed(position, Envelope.from_headers(headers, data))

    async def _shared_consumer(self, topic: str, stream: str) -> _SharedConsumer:
        async with self._lock:
            shared = self._shared.get(topic)
            if shared is None:
                try:
                    last = await self._last_position(stream, None, "")
                    subject = f"{self._prefix}.{topic}.>"
                    shared = await _SharedConsumer.start(self._js, stream, subject, last)
                except (nats.errors.Error, TimeoutError) as exc:
                    raise UnavailableError(f"following {topic} failed: {exc!r}") from exc
                self._shared[topic] = shared
        return shared

    async def _stored(self, stream: str, query: dict[str, Any]) -> dict[str, Any] | None:
        """The message of ``stream`` that ``query`` names (by ``seq``, ``next_by_subj``,
        ``last_by_subj`` or ``start_time``) as the stream's leader has it (a replica may lag behind
        it); None if there is none."""
        try:
            (reply,) = await self._heard([(f"$JS.API.STREAM.MSG.GET.{stream}", orjson.dumps(query), None)])
            answer = orjson.loads(reply.data)
        except (nats.errors.Error, TimeoutError, orjson.JSONDecodeError) as exc:
            raise UnavailableError(f"reading {stream} failed: {exc!r}") from exc
        error = answer.get("error")
        if error is not None and error.get("code") == 404:
            return None
        if error is not None or not isinstance(answer.get("message"), dict):
            raise UnavailableError(f"reading {stream} failed: {error or answer}")
        found: dict[str, Any] = answer["message"]
        return found

    async def _first_stored(self, stream: str, since: datetime) -> int | None:
        """The position of the stream's first message stored at or after ``since``; None if none is.
        One lookup by time, without reading the messages before it."""
        found = await self._stored(
            stream, {"start_time": since.astimezone(UTC).isoformat().replace("+00:00", "Z")}
        )
        # Asked for a time after its last message, the server answers with its first one.
        if found is None or datetime.fromisoformat(found["time"]) < since:
            return None
        return int(found["seq"])

    async def _last_position(self, stream: str, key: str | None, subject: str) -> int:
        """The position of the last event of ``key`` (of any key for None); 0 if there is none."""
        if key is None:
            return int((await self._js.stream_info(stream)).state.last_seq)
        found = await self._stored(stream, {"last_by_subj": subject})
        return 0 if found is None else int(found["seq"])

    async def find(self, topic: str, request_id: str) -> Envelope | None:
        stream = await self._ensure(topic)
        subject = f"{self._prefix}.{topic}.*.{key_token(request_id)}"
        try:
            msg = await self._js.get_last_msg(stream, subject, direct=True)
        except JsNotFound:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise UnavailableError(f"find in {topic} failed: {exc!r}") from exc
        return Envelope.from_headers(dict(msg.headers or {}), msg.data or b"")

    async def lag(self) -> list[Lag]:
        out = []
        try:
            for stream in await self._js.streams_info():
                name, subjects = stream.config.name or "", stream.config.subjects or []
                if not name.startswith(self.stream_name("")) or not subjects:
                    continue
                # As its subjects spell it: the stream's name has "_" for a "-".
                topic = subjects[0].removeprefix(f"{self._prefix}.").removesuffix(".>")
                for consumer in await self._js.consumers_info(name):
                    if consumer.config.durable_name:  # ordered (tail) consumers have no group
                        pending, in_flight = consumer.num_pending or 0, consumer.num_ack_pending or 0
                        out.append(Lag(topic, consumer.name, pending, in_flight))
        except (nats.errors.Error, TimeoutError) as exc:
            raise UnavailableError(f"reading consumer lag failed: {exc!r}") from exc
        return sorted(out, key=lambda lag: (lag.topic, lag.group))

    async def delete_streams(self) -> None:
        """Remove every stream of this prefix (test isolation)."""
        for shared in self._shared.values():
            await shared.close()
        self._shared.clear()
        for topic in list(self._ready):
            with contextlib.suppress(JsNotFound):
                await self._js.delete_stream(self.stream_name(topic))
        self._ready.clear()


_Arrival = tuple[int, dict[str, str] | None, bytes]  # position, headers, body
_FOLLOWERS_HEARTBEAT = 1.0


class _SharedConsumer:
    """The topic's one ordered consumer for the tails that follow its keys (``Followers``). A
    consumer per followed key cost the server a consumer created, fed and expired per SSE stream,
    and the gateway a subscription with its own timers (benchmarks/README.md). It keeps nothing:
    a tail's history is a few lookups the server answers, and keeping 30 s of events, as the
    Kafka log does, saved no measurable CPU here (benchmarks/README.md)."""

    def __init__(self) -> None:
        self.followers: Followers[str, _Arrival] = Followers()
        self._sub: JetStreamContext.PushSubscription | None = None

    @classmethod
    async def start(cls, js: JetStreamContext, stream: str, subject: str, last: int) -> _SharedConsumer:
        shared = cls()
        # From the last stored event rather than after it: the first delivery then tells nats-py's
        # ordered consumer where to resume after a reset (before any, it would start at 1).
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, last)
        )
        shared._sub = await js.subscribe(
            subject,
            stream=stream,
            ordered_consumer=True,
            config=config,
            cb=shared._on_msg,
            # Missing two in a row, the client starts the consumer again (a restarted server has
            # lost it): one shared consumer can afford frequent ones, and streams resume sooner.
            idle_heartbeat=_FOLLOWERS_HEARTBEAT,
        )
        return shared

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 2)[-2]  # <prefix>.<topic>.<key>.<id>
        self.followers.deliver(token, (_delivered(msg.reply)[1], msg.headers, msg.data))


def _header_block(encoded: str | None) -> dict[str, str]:
    """Headers as the stream stores them: base64 of a ``NATS/1.0`` line, then ``Name: value`` lines."""
    if not encoded:
        return {}
    fields = (line.partition(":") for line in base64.b64decode(encoded).decode().split("\r\n")[1:])
    return {name: value.removeprefix(" ") for name, sep, value in fields if sep}


class _PullConsumer:
    """A continuous pull from a durable consumer into a local buffer.

    nats-py's ``fetch(n)`` returns only when n messages arrived or the timeout
    passed, which adds the whole timeout to the latency of a lone message. Here pull
    requests stay open and keep the buffer topped up; ``fetch`` returns as soon as
    anything is buffered. Outstanding requests are bounded by what the caller asks
    for, so the broker (``max_ack_pending``) holds the rest of a burst.
    """

    _EXPIRES = 5.0

    def __init__(self, nc: Client, topic: str, stream: str, group: str) -> None:
        self._nc, self._topic = nc, topic
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{group}"
        self._inbox = nc.new_inbox()
        self._buffer: collections.deque[Msg] = collections.deque()
        self._arrived = asyncio.Event()
        self._outstanding = 0
        self._requests_expire = 0.0
        self._reconnects = nc.stats["reconnects"]
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None and msg.reply:
            self._buffer.append(msg)
            self._outstanding = max(0, self._outstanding - 1)
            self._arrived.set()
        elif status in ("404", "408", "409"):
            # A pull request ended (no messages / expired / limits): what it still had is not coming.
            if msg.headers and "Nats-Pending-Messages" in msg.headers:
                self._outstanding = max(0, self._outstanding - int(msg.headers["Nats-Pending-Messages"]))
            elif status == "409":  # e.g. the consumer's leader moved: every open request is void
                self._requests_expire = 0.0
        # "100" idle heartbeats need nothing.

    async def _top_up(self, wanted: int) -> None:
        now = time.monotonic()
        if self._nc.stats["reconnects"] != self._reconnects:
            # Pull requests die with the server (or cluster node) that held them.
            self._reconnects = self._nc.stats["reconnects"]
            self._requests_expire = 0.0
        if now >= self._requests_expire:
            # Renew a little before the server expires the last request, so there is never
            # a moment without a pull outstanding (overlap is bounded by ``wanted``).
            self._outstanding = 0
        missing = wanted - len(self._buffer) - self._outstanding
        if missing <= 0 or (self._outstanding and missing < wanted // 2):
            return  # top up in large steps, not one pull request per delivered message
        request = {"batch": missing, "expires": int(self._EXPIRES * 1e9)}
        await self._nc.publish(self._next_subject, orjson.dumps(request), reply=self._inbox)
        self._outstanding += missing
        self._requests_expire = now + self._EXPIRES * 0.8

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        try:
            await self._top_up(max_messages)
            if not self._buffer:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._arrived.wait()
        except nats.errors.Error as exc:
            raise UnavailableError(f"fetch from {self._topic} failed: {exc!r}") from exc
        out: list[Delivery] = []
        while self._buffer and len(out) < max_messages:
            out.append(self._delivery(self._buffer.popleft()))
        return out

    def _delivery(self, msg: Msg) -> Delivery:
        attempt, position = _delivered(msg.reply)

        async def nak(delay: float) -> None:
            await msg.nak(delay=delay or None)

        return Delivery(
            topic=self._topic,
            headers=dict(msg.headers or {}),
            body=msg.data,
            attempt=attempt,
            position=position,
            _ack=msg.ack,
            _nak=nak,
            _progress=msg.in_progress,
        )

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
        # Buffered but unhandled messages are redelivered after their ack deadline.
        for msg in self._buffer:
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()
        self._buffer.clear()


def _delivered(reply: str) -> tuple[int, int]:
    """(times delivered, stream position) from a delivery's ack subject,
    ``$JS.ACK[.<domain>.<account hash>].<stream>.<consumer>.<delivered>.<stream seq>...``:
    read directly, as nats-py's ``Msg.metadata`` builds datetimes and dataclasses per message."""
    tokens = reply.split(".")
    first = 4 if len(tokens) == 9 else 6
    return int(tokens[first]), int(tokens[first + 1])
