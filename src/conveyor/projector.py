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
(batch_progress.py) before the event is acknowledged.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from conveyor.batch_progress import ProgressMarks
from conveyor.events import Envelope, Topic
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


class Projector:
    def __init__(self, *, cache_size: int = 20_000) -> None:
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
