"""Declaring stages: a handler, the topics it consumes, and how it is run."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Protocol

from pydantic import BaseModel

from conveyor.events import Envelope
from conveyor.log.base import EventLog
from conveyor.store.base import StateStore


@dataclasses.dataclass(frozen=True, slots=True)
class Output:
    """An event a handler wants published once it returns, and where."""

    topic: str
    event: Envelope


class StageContext(Protocol):
    """What a running handler may use besides its input event."""

    @property
    def stage(self) -> str: ...

    @property
    def log(self) -> EventLog: ...

    @property
    def store(self) -> StateStore: ...

    def derive(self, event: Envelope, *, type: str, payload: BaseModel, label: str = "") -> Envelope:
        """An output of ``event``: its id is fixed by (event id, stage, label)."""
        ...


Handler = Callable[[StageContext, Envelope], Awaitable[Sequence[Output]]]
# What to publish instead of a dead letter for an event the handler gave up on (and why).
Fallback = Callable[[StageContext, Envelope, Exception], Awaitable[Sequence[Output]]]
ManyHandler = Callable[[StageContext, Sequence[Envelope]], Awaitable[Sequence[Output]]]
# Yields (index into the batch, that event's outputs or its own error) as each event finishes.
BatchHandler = Callable[
    [StageContext, Sequence[Envelope]], AsyncGenerator[tuple[int, Sequence[Output] | Exception], None]
]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter for retryable failures."""

    max_attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 5.0

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1)))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BatchPolicy:
    """How the runtime groups events of different lanes into one ``Stage.handle_batch`` call.

    A batch leaves when it holds ``max_size`` events or when its first event has waited
    ``max_wait`` seconds (0: whatever arrived in the same fetch, no added latency). With
    ``target_latency`` set, the size limit adapts: it starts at 1, grows by one after each
    full batch handled within the target and halves after a batch that took longer, so
    batches are as large as the latency target allows (at most ``max_size``).
    """

    max_size: int = 16
    max_wait: float = 0.0
    target_latency: float | None = None

    def __post_init__(self) -> None:
        if self.max_size < 1 or self.max_wait < 0 or (self.target_latency or 0) < 0:
            raise ValueError(f"invalid batch policy {self}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Stage:
    """A handler and the contract the runtime keeps around it.

    ``accepts`` lists the event types the handler wants; others on its topics are
    acknowledged and skipped. ``lane`` picks the ordering key: events with the same
    lane are handled one at a time in log order, different lanes concurrently.
    ``dedupe`` records each handled event id so a redelivery is skipped. A stage whose
    handler is deterministic and has no side effects (or only idempotent ones) can turn
    it off: a rerun publishes the same output ids, which the log or the next stage drops.
    ``handle_many``, when given, receives every event queued in one lane at once (a
    read model can fold them into one write); ``handler`` still handles lone events and
    isolates a poison event when a batch fails. ``linger`` (with ``handle_many``) says how
    long a lane may hold the events it has, waiting for more of the same lane, before
    handling them (0: now); they are acknowledged only once handled.
    ``handle_batch`` with ``batching``, when given, receives the head events of several lanes
    at once (a model backend that generates a batch faster than its events one by one); an
    event the batch call fails for as a whole is retried alone through ``handler``.
    ``topic_limits`` caps the events of a topic in flight at once (of ``concurrency``), so that
    a topic of background work never fills the stage and the others' events are taken at once.
    ``fallback``, when given, is asked what to publish instead of a dead letter once the handler
    has given up on an event (its retries spent, or a permanent error); no outputs: dead-letter it.
    ``traced``: with a tracer provider set up, each event is handled in a span of the request's
    trace (observability/tracing.py); off for a stage whose spans would say nothing (a read model).
    """

    name: str
    consumes: tuple[str, ...]
    handler: Handler
    accepts: frozenset[str] = frozenset()
    timeout: float = 30.0
    retry: RetryPolicy = RetryPolicy()
    concurrency: int = 256
    max_deliveries: int = 10
    dedupe: bool = True
    handle_many: ManyHandler | None = None
    linger: Callable[[Sequence[Envelope]], float] | None = None
    handle_batch: BatchHandler | None = None
    batching: BatchPolicy = BatchPolicy()
    lane: Callable[[Envelope], str] = lambda event: event.key
    topic_limits: Mapping[str, int] = dataclasses.field(default_factory=dict)
    fallback: Fallback | None = None
    traced: bool = True

    def __post_init__(self) -> None:
        if self.linger is not None and self.handle_many is None:
            raise ValueError(f"stage {self.name!r}: linger holds events for handle_many, which it lacks")


class Pipeline:
    """An ordered set of stages, addressable by name."""

    def __init__(self, stages: Sequence[Stage] = ()) -> None:
        self._stages: dict[str, Stage] = {}
        for stage in stages:
            self.add(stage)

    def add(self, stage: Stage) -> None:
        if stage.name in self._stages:
            raise ValueError(f"stage {stage.name!r} is declared twice")
        self._stages[stage.name] = stage

    def __getitem__(self, name: str) -> Stage:
        try:
            return self._stages[name]
        except KeyError:
            raise KeyError(f"no stage {name!r}; stages: {', '.join(self._stages)}") from None

    def __iter__(self) -> Iterator[Stage]:
        return iter(self._stages.values())
