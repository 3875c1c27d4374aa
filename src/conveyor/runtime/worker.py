"""The stage runtime: consume → decode → dedupe → handle → publish → mark → ack.

Ordering: deliveries are split into lanes by ``Stage.lane`` (the partition key by
default). A lane handles its events one at a time in log order; lanes run
concurrently, up to ``Stage.concurrency`` events in flight, and the worker stops
fetching while it is full (back-pressure reaches the broker, which holds the rest).

Effectively-once: a handler's outputs have ids derived from its input, so when an
input is redelivered (crash, ack timeout) the outputs repeat with the same ids and
the log drops them; the dedupe record is written only after the outputs are durable
and before the ack, so a crash anywhere leaves either "redo, same outputs" or "skip".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from pydantic import BaseModel

from conveyor.errors import DeferredError, InvalidEventError, PermanentError, RejectedError, UnavailableError
from conveyor.events import Envelope, Topic, new_event, now_rfc3339
from conveyor.log.base import Delivery, EventLog, Subscription
from conveyor.observability import tracing
from conveyor.observability.metrics import DEAD_LETTERS, EVENTS_HANDLED, HANDLE_SECONDS, RETRIES
from conveyor.payloads import Attempt, DeadLetter, EventType
from conveyor.pipeline import Output, Stage
from conveyor.runtime.batching import Batcher
from conveyor.runtime.deadlines import Deadlines
from conveyor.store.base import Namespace, StateStore

logger = logging.getLogger("conveyor.runtime")


class HandlerContext:
    """The StageContext handed to handlers."""

    def __init__(self, stage: str, log: EventLog, store: StateStore) -> None:
        self._stage, self._log, self._store = stage, log, store
        self._source = f"conveyor/{stage}"

    @property
    def stage(self) -> str:
        return self._stage

    @property
    def log(self) -> EventLog:
        return self._log

    @property
    def store(self) -> StateStore:
        return self._store

    def derive(self, event: Envelope, *, type: str, payload: BaseModel, label: str = "") -> Envelope:
        return event.derive(
            type=type, source=self._source, payload=payload, label=f"{self._stage}:{label or type}"
        )


class StageWorker:
    """Runs one stage against the log until ``stop`` is set, then drains."""

    def __init__(
        self,
        stage: Stage,
        log: EventLog,
        store: StateStore,
        *,
        group: str | None = None,
        fetch_batch: int = 256,
        drain_timeout: float = 10.0,
        heartbeat: float = 3.0,
    ) -> None:
        self.stage = stage
        self._log, self._store = log, store
        self._group = group or stage.name
        self._fetch_batch = fetch_batch
        self._drain_timeout = drain_timeout
        self._heartbeat = heartbeat
        self._active: dict[int, tuple[Delivery, float]] = {}
        self._ctx = HandlerContext(stage.name, log, store)
        self._tracer = tracing.tracer() if stage.traced else None
        self._deadlines = Deadlines(stage.timeout)
        self._batcher = (
            Batcher(stage.name, stage.handle_batch, self._ctx, stage.batching, timeout=stage.timeout)
            if stage.handle_batch is not None
            else None
        )
        self._lanes: dict[str, collections.deque[Delivery]] = {}
        self._arrivals: dict[str, asyncio.Event] = {}  # lanes lingering for more events
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._room = asyncio.Event()
        self._room.set()
        # Per limited topic (Stage.topic_limits): its events in flight, and room for more.
        self._topic_in_flight: collections.Counter[str] = collections.Counter()
        self._topic_room = {topic: asyncio.Event() for topic in stage.topic_limits}
        for room in self._topic_room.values():
            room.set()
        self.ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._empty_since_busy: set[int] = set()

    async def run(self, stop: asyncio.Event) -> None:
        subs = [await self._subscribe(topic, stop) for topic in self.stage.consumes]
        self.ready.set()
        heartbeats = asyncio.create_task(self._send_heartbeats())
        try:
            await asyncio.gather(
                *(
                    self._fetch_loop(topic, sub, stop)
                    for topic, sub in zip(self.stage.consumes, subs, strict=True)
                )
            )
        finally:
            self._stopping = True
            for arrived in self._arrivals.values():
                arrived.set()
            await self._drain()
            if self._batcher is not None:
                await self._batcher.close()
            await self._deadlines.close()
            heartbeats.cancel()
            for sub in subs:
                await sub.close()

    async def _subscribe(self, topic: str, stop: asyncio.Event) -> Subscription:
        # A log that is down or failing over (a cluster electing a leader) must not end the
        # stage while its process lives on: wait for the log, as the fetch loop does.
        while True:
            try:
                return await self._log.subscribe(topic, self._group)
            except UnavailableError:
                if stop.is_set():
                    raise
                logger.exception("stage %s: subscribing to %s failed; retrying", self.stage.name, topic)
                await asyncio.sleep(0.5)

    async def _fetch_loop(self, topic: str, sub: Subscription, stop: asyncio.Event) -> None:
        limit, room = self.stage.topic_limits.get(topic), self._topic_room.get(topic)
        while not stop.is_set():
            await self._room.wait()
            free = self.stage.concurrency - self._in_flight
            if limit is not None and room is not None:
                await room.wait()
                free = min(free, limit - self._topic_in_flight[topic])
            try:
                batch = await sub.fetch(min(free, self._fetch_batch), timeout=0.25)
            except Exception:  # the log is down: keep trying, never exit the loop
                logger.exception("stage %s: fetch failed; retrying", self.stage.name)
                await asyncio.sleep(0.5)
                continue
            for delivery in batch:
                self._dispatch(delivery)
            self._note_fetch(id(sub), empty=not batch, of=len(self.stage.consumes))

    def _note_fetch(self, sub: int, *, empty: bool, of: int) -> None:
        if not empty:
            self._empty_since_busy.clear()
            return
        self._empty_since_busy.add(sub)
        if len(self._empty_since_busy) == of and self._in_flight == 0:
            self._idle.set()

    async def idle(self) -> None:
        """Wait until every subscription came back empty with nothing in flight (for tests)."""
        self._idle.clear()
        self._empty_since_busy.clear()
        await self._idle.wait()

    def _dispatch(self, delivery: Delivery) -> None:
        self._in_flight += 1
        self._active[id(delivery)] = (delivery, time.monotonic())
        if self._in_flight >= self.stage.concurrency:
            self._room.clear()
        if (room := self._topic_room.get(delivery.topic)) is not None:
            self._topic_in_flight[delivery.topic] += 1
            if self._topic_in_flight[delivery.topic] >= self.stage.topic_limits[delivery.topic]:
                room.clear()
        event = delivery.try_envelope()
        lane = self.stage.lane(event) if event else f"undecodable:{delivery.position}"
        queue = self._lanes.get(lane)
        if queue is not None:
            queue.append(delivery)
            if (arrived := self._arrivals.get(lane)) is not None:
                arrived.set()
            return
        self._lanes[lane] = collections.deque([delivery])
        task = asyncio.create_task(self._run_lane(lane))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_lane(self, lane: str) -> None:
        queue = self._lanes[lane]
        try:
            while queue:
                if self.stage.linger is not None:
                    await self._linger(lane, queue)
                # A stage with ``handle_many`` takes everything its lane has queued at once.
                batch = list(queue) if self.stage.handle_many is not None else [queue[0]]
                try:
                    await self._process(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:  # the log or store failed mid-way: let the broker redeliver
                    logger.exception("stage %s: events not finished, to be redelivered", self.stage.name)
                    for delivery in batch:
                        await _quietly_nak(delivery, 1.0)
                for _ in batch:
                    self._released(queue.popleft())
        finally:
            if self._lanes.get(lane) is queue:
                del self._lanes[lane]
            for delivery in queue:  # cancelled during drain: hand the rest back
                self._released(delivery)
                await _quietly_nak(delivery, 0.0)

    async def _linger(self, lane: str, queue: collections.deque[Delivery]) -> None:
        """Hold the lane while the stage expects more of its events soon (a read model then
        writes once for several), at most as long as the stage first said."""
        assert self.stage.linger is not None
        deadline = math.inf
        arrived = self._arrivals[lane] = asyncio.Event()
        try:
            while not self._stopping:
                events = [e for d in queue if (e := d.try_envelope()) is not None]
                wait = self.stage.linger(events) if len(events) == len(queue) else 0.0
                now = time.monotonic()
                deadline = min(deadline, now + wait)
                if deadline <= now:
                    return
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline - now):
                        await arrived.wait()
        finally:
            del self._arrivals[lane]

    async def _send_heartbeats(self) -> None:
        """Tell the broker about events held (handled or queued in a lane) for longer than a
        heartbeat, so only a dead worker's events are redelivered: the ack deadline can stay
        short and recovery fast."""
        while True:
            await asyncio.sleep(self._heartbeat)
            due = time.monotonic() - self._heartbeat
            for delivery, started in list(self._active.values()):
                if started <= due:
                    with contextlib.suppress(Exception):
                        await delivery.in_progress()

    def _released(self, delivery: Delivery) -> None:
        self._active.pop(id(delivery), None)
        self._in_flight -= 1
        if self._in_flight < self.stage.concurrency:
            self._room.set()
        if (room := self._topic_room.get(delivery.topic)) is not None:
            self._topic_in_flight[delivery.topic] -= 1
            room.set()

    async def _process(self, batch: list[Delivery]) -> None:
        admitted = [(d, e) for d in batch if (e := await self._admit(d)) is not None]
        if self._tracer is None or not admitted:
            await self._handle(admitted)
            return
        with tracing.stage_spans(self._tracer, self.stage.name, [e for _, e in admitted]) as events:
            await self._handle([(d, e) for (d, _), e in zip(admitted, events, strict=True)])

    async def _handle(self, admitted: list[tuple[Delivery, Envelope]]) -> None:
        many = self.stage.handle_many
        if many is not None and len(admitted) > 1:
            events = [e for _, e in admitted]
            if await self._attempt(lambda: many(self._ctx, events), admitted, dead_letter=False):
                return
            # The batch failed for good: one at a time, so only the poison event is dead-lettered.
        for delivery, event in admitted:
            alone = functools.partial(self.stage.handler, self._ctx, event)
            # A batching stage's first try goes through the batcher; retries go alone.
            first = alone if self._batcher is None else functools.partial(self._batcher.submit, event)
            await self._attempt(first, [(delivery, event)], dead_letter=True, retry=alone)

    async def _admit(self, delivery: Delivery) -> Envelope | None:
        """The event to handle, or None when it was settled here (skipped, duplicate, dead letter)."""
        stage = self.stage
        try:
            event = delivery.envelope()
        except InvalidEventError as exc:
            await self._dead_letter(delivery, None, str(exc), [])
            return None
        not_ours = bool(event.redrive) and event.redrive != stage.name  # sent back to another stage
        if (stage.accepts and event.type not in stage.accepts) or not_ours:
            EVENTS_HANDLED.inc(stage=stage.name, outcome="skipped")
            await delivery.ack()
            return None
        if delivery.attempt > stage.max_deliveries:
            reason = f"delivered {delivery.attempt} times without being acknowledged (did it crash a worker?)"
            await self._dead_letter(delivery, event, reason, [])
            return None
        if stage.dedupe and await self._store.get(Namespace.DEDUPE, self._dedupe_key(event)) is not None:
            EVENTS_HANDLED.inc(stage=stage.name, outcome="duplicate")
            await delivery.ack()
            return None
        return event

    def _dedupe_key(self, event: Envelope) -> str:
        return f"{self.stage.name}.{event.id}"

    async def _attempt(
        self,
        call: Callable[[], Awaitable[Sequence[Output]]],
        items: list[tuple[Delivery, Envelope]],
        *,
        dead_letter: bool,
        retry: Callable[[], Awaitable[Sequence[Output]]] | None = None,
    ) -> bool:
        """Run ``call`` (then ``retry``, if given, for later attempts) with retries; on success
        publish, mark and ack. False if it failed for good and ``dead_letter`` is off (the caller
        decides what to do with the items)."""
        stage = self.stage
        attempts: list[Attempt] = []
        while True:
            started = time.perf_counter()
            try:
                async with self._deadlines.limit():
                    outputs = await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempts.append(Attempt(attempt=len(attempts) + 1, error=_describe(exc), at=now_rfc3339()))
                if self._tracer is not None:
                    tracing.attempt_failed(exc)
                if isinstance(exc, DeferredError) and dead_letter:
                    await self._defer(exc, items, attempts)
                    return True
                spent = len(attempts) >= stage.retry.max_attempts
                if (
                    (spent or isinstance(exc, PermanentError))
                    and dead_letter
                    and await self._fall_back(exc, items)
                ):
                    return True
                if isinstance(exc, UnavailableError) and spent:
                    # A backend that cannot be reached (a broker failing over) is not the event's
                    # fault: back to the broker for a later delivery, bounded by max_deliveries.
                    raise
                if isinstance(exc, PermanentError) or spent:
                    if not dead_letter:
                        return False
                    for delivery, event in items:
                        code = exc.code if isinstance(exc, RejectedError) else ""
                        await self._dead_letter(delivery, event, _describe(exc), attempts, code)
                    return True
                RETRIES.inc(stage=stage.name)
                await asyncio.sleep(stage.retry.backoff(len(attempts)))
                call = retry or call
                continue
            await self._publish(outputs)
            if stage.dedupe:
                await _all(self._store.put(Namespace.DEDUPE, self._dedupe_key(e), b"1") for _, e in items)
            for delivery, _ in items:
                await delivery.ack()
            HANDLE_SECONDS.observe(time.perf_counter() - started, stage=stage.name)
            EVENTS_HANDLED.inc(len(items), stage=stage.name, outcome="ok")
            return True

    async def _fall_back(self, exc: Exception, items: list[tuple[Delivery, Envelope]]) -> bool:
        """Publish the stage's fallback for ``items`` instead of giving up on them, if it has one."""
        fallback = self.stage.fallback
        outputs = [o for _, event in items for o in await fallback(self._ctx, event, exc)] if fallback else []
        if not outputs:
            return False
        await self._publish(outputs)
        for delivery, _ in items:
            await delivery.ack()
        EVENTS_HANDLED.inc(len(items), stage=self.stage.name, outcome="fallback")
        return True

    async def _defer(
        self, exc: DeferredError, items: list[tuple[Delivery, Envelope]], attempts: list[Attempt]
    ) -> None:
        """Hand ``items`` back to the broker for a later delivery, or dead-letter them once they
        have had ``max_deliveries``."""
        stage = self.stage
        for delivery, event in items:
            if delivery.attempt >= stage.max_deliveries:
                error = f"{_describe(exc)} (delivery {delivery.attempt} of {stage.max_deliveries})"
                await self._dead_letter(delivery, event, error, attempts)
                continue
            RETRIES.inc(stage=stage.name)
            EVENTS_HANDLED.inc(stage=stage.name, outcome="deferred")
            delay = exc.delay if exc.delay is not None else stage.retry.backoff(delivery.attempt)
            await delivery.nak(delay)

    async def _publish(self, outputs: Sequence[Output]) -> None:
        # One batch per topic, in order within the topic; topics are independent (no consumer
        # can rely on an order across topics), so they go out concurrently.
        by_topic: dict[str, list[Envelope]] = {}
        for output in outputs:
            by_topic.setdefault(output.topic, []).append(output.event)
        await _all(self._log.publish(topic, events) for topic, events in by_topic.items())

    async def _dead_letter(
        self, delivery: Delivery, event: Envelope | None, error: str, attempts: list[Attempt], code: str = ""
    ) -> None:
        payload = DeadLetter(
            stage=self.stage.name,
            topic=delivery.topic,
            error=error,
            code=code,
            attempts=attempts,
            original_headers=delivery.headers,
            original_body=delivery.body.decode("utf-8", "backslashreplace"),
        )
        if event is not None:
            letter = self._ctx.derive(event, type=EventType.DEAD_LETTER, payload=payload, label="dlq")
        else:
            letter = new_event(
                type=EventType.DEAD_LETTER,
                source=f"conveyor/{self.stage.name}",
                payload=payload,
                request_id=f"undecodable-{delivery.topic}-{delivery.position}",
            )
        await self._log.publish(Topic.DLQ, [letter])
        await delivery.ack()
        if self._tracer is not None:
            tracing.failed(error)
        DEAD_LETTERS.inc(stage=self.stage.name)
        EVENTS_HANDLED.inc(stage=self.stage.name, outcome="dead_lettered")
        logger.warning(
            "stage %s: dead-lettered event at %s: %s",
            self.stage.name,
            delivery.position,
            error,
            extra={
                "stage": self.stage.name,
                "topic": delivery.topic,
                "event_id": event.id if event is not None else None,
                "request_id": letter.request_id,
            },
        )

    async def _drain(self) -> None:
        """Let in-flight events finish (bounded), then hand unfinished ones back to the broker."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self._drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def _all(calls: Iterable[Awaitable[object]]) -> None:
    """Await every call concurrently; a lone call directly (gather costs a task per call)."""
    pending = list(calls)
    if len(pending) == 1:
        await pending[0]
    elif pending:
        await asyncio.gather(*pending)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "TimeoutError: the handler exceeded its timeout"
    return f"{type(exc).__name__}: {exc}"


async def _quietly_nak(delivery: Delivery, delay: float) -> None:
    try:
        await delivery.nak(delay)
    except Exception:  # the message will be redelivered after its ack deadline anyway
        logger.debug("nak failed for %s", delivery.position, exc_info=True)
