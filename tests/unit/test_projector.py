"""The projector's fold into the store, and what it keeps in memory."""

from __future__ import annotations

from conveyor.events import new_event
from conveyor.payloads import CancelRequested, EventType, RequestAccepted, RequestCompleted, RequestPrepared
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
