"""The projector's fold into the store, and what it keeps in memory."""

from __future__ import annotations

import dataclasses

import pytest

from conveyor.events import Envelope, new_event
from conveyor.observability.metrics import FIRST_TOKEN_SECONDS, REQUEST_SECONDS
from conveyor.payloads import (
    CancelRequested,
    EventType,
    GenerationStarted,
    RequestAccepted,
    RequestCompleted,
    RequestFailed,
    RequestPrepared,
)
from conveyor.projector import Projector, read_view
from conveyor.testing import MemoryStateStore


async def test_only_requests_under_way_stay_cached_and_a_late_event_still_folds() -> None:
    store, projector = MemoryStateStore(), Projector()
    finished = []
    for i in range(50):
        accepted = new_event(type=EventType.ACCEPTED, source="gw", payload=RequestAccepted(prompt=f"p{i}"))
        prepared = accepted.derive(
            type=EventType.PREPARED, source="t", payload=RequestPrepared(prompt="p"), label="prepare"
        )
        await projector.apply(store, [accepted, prepared])
        if i % 2 == 0:
            output = RequestCompleted(output="ok", streamed_chars=2)
            done = prepared.derive(type=EventType.COMPLETED, source="t", payload=output, label="finalize")
            await projector.apply(store, [done])
            finished.append(accepted)
    # A finished request sees no more events but a rare late one: its view is not kept.
    assert len(projector._cache) == 25
    assert not {event.request_id for event in finished} & set(projector._cache)
    # A late cancel of a finished request reads the view again; the first final status stands.
    late = finished[0].derive(type=EventType.CANCEL, source="gw", payload=CancelRequested(), label="late")
    view = await projector.apply(store, [late])
    assert view.status == "completed"
    stored = await read_view(store, finished[0].request_id)
    assert stored is not None
    assert (stored.status, stored.output) == ("completed", "ok")


def at(event: Envelope, time: str) -> Envelope:
    return dataclasses.replace(event, time=time)


async def test_the_projector_that_ends_a_view_counts_its_latency_and_first_token_once() -> None:
    store, projector = MemoryStateStore(), Projector(default_model="small")
    accepted = at(
        new_event(type=EventType.ACCEPTED, source="gw", payload=RequestAccepted(prompt="p")),
        "2026-11-28T10:00:00.000000Z",
    )
    started = at(
        accepted.derive(type=EventType.STARTED, source="t", payload=GenerationStarted(), label="gen"),
        "2026-11-28T10:00:00.250000Z",
    )
    done = at(
        accepted.derive(
            type=EventType.COMPLETED,
            source="t",
            payload=RequestCompleted(output="ok", streamed_chars=2),
            label="fin",
        ),
        "2026-11-28T10:00:02.000000Z",
    )
    latency = REQUEST_SECONDS.count(model="small", status="completed")
    first = FIRST_TOKEN_SECONDS.count(model="small")
    first_sum = FIRST_TOKEN_SECONDS._sums[(("model", "small"),)]
    await projector.apply(store, [accepted, started])
    assert REQUEST_SECONDS.count(model="small", status="completed") == latency  # not ended yet
    await projector.apply(store, [done])
    await projector.apply(store, [done])  # redelivered: the view does not end twice
    await Projector(default_model="small").apply(store, [done])  # nor for a second projector
    assert REQUEST_SECONDS.count(model="small", status="completed") == latency + 1
    assert FIRST_TOKEN_SECONDS.count(model="small") == first + 1
    assert FIRST_TOKEN_SECONDS._sums[(("model", "small"),)] - first_sum == pytest.approx(0.25)
    # A failure counts its latency under its status, and no first token.
    lost = at(
        new_event(type=EventType.ACCEPTED, source="gw", payload=RequestAccepted(prompt="q"), model="big"),
        "2026-11-28T10:00:00.000000Z",
    )
    failed = at(
        lost.derive(
            type=EventType.FAILED,
            source="t",
            payload=RequestFailed(code="x", message="y", stage="prepare"),
            label="f",
        ),
        "2026-11-28T10:00:00.010000Z",
    )
    before = REQUEST_SECONDS.count(model="big", status="failed"), FIRST_TOKEN_SECONDS.count(model="big")
    await projector.apply(store, [lost, failed])
    after = REQUEST_SECONDS.count(model="big", status="failed"), FIRST_TOKEN_SECONDS.count(model="big")
    assert after == (before[0] + 1, before[1])
