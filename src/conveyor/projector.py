"""The projector: folds every event into the per-request view in the state store (CQRS read side).

It runs as a stage whose lane is the request id, so one request's events are folded
one at a time; the store write is a compare-and-set, so a second projector, the
gateway's initial write or a replay can run beside it and nothing is lost.
A small cache of (view, revision) of the requests under way saves the read before each write.

A request's intermediate statuses (accepted, prepared, generating) are held up to
``LINGER`` seconds for the events that follow, and a terminal one is written at once:
a fast request costs one write (and one notification to each gateway) instead of four,
while a waiter still learns of the end without delay. [generated] is not read: the
completed event carries when generation finished (one delivery less per request).
When a Batch API request's view ends, its line is marked in its batch's progress
(batch_progress.py) before the event is acknowledged. The projector whose write ends a view counts
the request's latency and time to first token (``conveyor_request_seconds``,
``conveyor_time_to_first_token_seconds``), from the stamps of the events (each its writer's clock).
"""

from __future__ import annotations

import collections
import datetime
from collections.abc import Sequence

from conveyor.batch_progress import ProgressMarks
from conveyor.events import Envelope, Topic
from conveyor.observability.metrics import FIRST_TOKEN_SECONDS, REQUEST_SECONDS
from conveyor.payloads import EventType
from conveyor.pipeline import Output, Stage, StageContext
from conveyor.store.base import Namespace, StateStore
from conveyor.view import RequestView, fold

LINGER = 0.1
_SETTLING = frozenset({EventType.COMPLETED, EventType.FAILED, EventType.CANCEL, EventType.DEAD_LETTER})
PROJECTED_TOPICS = (
    Topic.REQUESTS,
    Topic.PREPARED,
    Topic.PROGRESS,
    Topic.COMPLETED,
    Topic.CONTROL,
    Topic.DLQ,
)


async def read_view(store: StateStore, request_id: str) -> RequestView | None:
    entry = await store.get(Namespace.STATUS, request_id)
    return RequestView.model_validate_json(entry.value) if entry else None


def _seconds(start: str, end: str) -> float:
    return (datetime.datetime.fromisoformat(end) - datetime.datetime.fromisoformat(start)).total_seconds()


def observe_ended(view: RequestView, ended_at: str, model: str) -> None:
    """Count an ended request's latency (and, completed, its time to first token) under ``model``."""
    accepted = view.stages.get("gateway", {}).get("accepted_at")
    if accepted is None:  # its end was seen before its acceptance: there is nothing to count from
        return
    REQUEST_SECONDS.observe(max(0.0, _seconds(accepted, ended_at)), model=model, status=view.status)
    generate = view.stages.get("generate", {})
    first = generate.get("started_at") or generate.get("finished_at")  # one chunk: the whole answer
    if view.status == "completed" and first is not None:
        FIRST_TOKEN_SECONDS.observe(max(0.0, _seconds(accepted, first)), model=model)


class Projector:
    def __init__(self, *, cache_size: int = 20_000, default_model: str = "") -> None:
        """``default_model``: the id of the model a request that names none is answered by."""
        self._default_model = default_model
        self._cache: collections.OrderedDict[str, tuple[RequestView, int]] = collections.OrderedDict()
        self._cache_size = cache_size
        self._progress = ProgressMarks()

    async def apply(self, store: StateStore, events: Sequence[Envelope]) -> RequestView:
        """Fold ``events`` (all of one request) into its view with one compare-and-set write."""
        rid = events[0].request_id
        cached = self._cache.pop(rid, None)
        # Not cached: most likely a new request, so try to create before paying for a read.
        fresh = cached is None
        while True:
            if cached is None and not fresh:
                entry = await store.get(Namespace.STATUS, rid)
                cached = (RequestView.model_validate_json(entry.value), entry.revision) if entry else None
            fresh = False
            view = cached[0] if cached else None
            for event in events:
                view = fold(view, event)
            assert view is not None
            if cached is not None and view == cached[0]:
                result = cached
                break
            data = view.model_dump_json().encode()
            if cached is None:
                revision = await store.create(Namespace.STATUS, rid, data)
            else:
                revision = await store.update(Namespace.STATUS, rid, data, cached[1])
            if revision is not None:
                result = (view, revision)
                if view.terminal and (cached is None or not cached[0].terminal):
                    ended_at = max(event.time for event in events)
                    observe_ended(view, ended_at, view.model or self._default_model)
                break
            cached = None  # someone else wrote it: read again and refold
        # Only requests still under way: a final view sees no more events but a rare late one
        # (which reads it again), and a cache of thousands of views makes the garbage
        # collector's full passes take tens of milliseconds.
        view = result[0]
        if not view.terminal:
            self._cache[rid] = result
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        elif view.batch:  # again on every event of an ended line: a mark lost to a crash is made
            await self._progress.mark(store, view.batch, completed=view.status == "completed")
        return view

    @staticmethod
    def _linger(events: Sequence[Envelope]) -> float:
        return 0.0 if any(event.type in _SETTLING for event in events) else LINGER

    def stage(self, *, also: Sequence[str] = ()) -> Stage:
        """The projector as a stage, reading ``also`` beside PROJECTED_TOPICS: the other topics
        where prepared requests wait (``prepared_topic``, ``background_topic``)."""

        async def handle(ctx: StageContext, event: Envelope) -> Sequence[Output]:
            await self.apply(ctx.store, [event])
            return ()

        async def handle_many(ctx: StageContext, events: Sequence[Envelope]) -> Sequence[Output]:
            await self.apply(ctx.store, events)
            return ()

        return Stage(
            name="projector",
            consumes=(*PROJECTED_TOPICS, *also),
            handler=handle,
            handle_many=handle_many,
            linger=self._linger,
            accepts=frozenset(
                {
                    EventType.ACCEPTED,
                    EventType.PREPARED,
                    EventType.STARTED,
                    EventType.COMPLETED,
                    EventType.FAILED,
                    EventType.CANCEL,
                    EventType.DEAD_LETTER,
                }
            ),
            dedupe=False,
            concurrency=4096,
            lane=lambda event: event.request_id,
            traced=False,
        )
