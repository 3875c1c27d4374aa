"""Replaying the log's history against another model, in this process, beside the old answers."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from datetime import UTC, datetime

from conveyor.config import ModelSettings, Settings
from conveyor.events import Envelope, Topic, new_event
from conveyor.history import Window
from conveyor.models.simulated import SimulatedModel
from conveyor.node import build_pipeline
from conveyor.payloads import EventType, RequestAccepted, RequestCompleted
from conveyor.replay import Replayed, history, replay
from conveyor.stages import CancelWatch
from conveyor.testing import MemoryEventLog


def accepted(prompt: str, at: str, **attributes: object) -> Envelope:
    event = new_event(
        type=EventType.ACCEPTED, source="test", payload=RequestAccepted(prompt=prompt, max_tokens=16)
    )
    return dataclasses.replace(event, time=at, **attributes)  # type: ignore[arg-type]


async def test_requests_of_a_window_are_answered_again_beside_their_old_answers() -> None:
    clock = [0.0]  # the log stamps each event as it was stored, on the days of this history
    source = MemoryEventLog(clock=lambda: clock[0])
    early = accepted("too early", "2026-11-01T00:00:00.000000Z")
    # Asked of a model this deployment no longer serves: replayed with the model given.
    answered = accepted("write to jane@example.com", "2026-11-02T00:00:00.000000Z", model="old-model")
    expired = accepted("a caller who gave up", "2026-11-02T01:00:00.000000Z", deadline=time.time() - 3600)
    other = accepted("someone else's", "2026-11-02T02:00:00.000000Z", tenant="globex")
    for event in (early, answered, expired, other):
        clock[0] = datetime.fromisoformat(event.time).timestamp()
        await source.publish(Topic.REQUESTS, [event])
    clock[0] = time.time()
    # A submit retried past the log's duplicate window is stored twice; it is replayed once.
    source.append_raw(Topic.REQUESTS, answered.key, answered.to_headers(), answered.data)
    old = RequestCompleted(output="the old answer", streamed_chars=14)
    completed = answered.derive(type=EventType.COMPLETED, source="test", payload=old, label="done")
    await source.publish(Topic.COMPLETED, [dataclasses.replace(completed, model="old-model")])
    before = {topic: len(source.events(topic)) for topic in source.topics()}

    window = Window(since=datetime(2026, 11, 2, tzinfo=UTC), tenant="default")
    requests = await history(source, window)
    assert [e.request_id for e in requests] == [answered.request_id, expired.request_id]
    assert await history(source, dataclasses.replace(window, limit=1)) == requests[:1]
    assert await history(source, Window(until=datetime(2026, 11, 2, tzinfo=UTC))) == [early]

    model = SimulatedModel(token_delay=0.001)  # slow enough for a past deadline to stop it
    settings = Settings(model=ModelSettings(backend="simulated"))
    pipeline = build_pipeline(settings, {"simulated": model}, CancelWatch(source))
    results: dict[str, Replayed] = {}
    async with contextlib.aclosing(replay(source, requests, pipeline)) as replayed:
        async for result in replayed:
            results[result.request_id] = result

    assert set(results) == {answered.request_id, expired.request_id}
    for request, result in [(answered, results[answered.request_id]), (expired, results[expired.request_id])]:
        prompt = "write to [EMAIL]" if request is answered else "a caller who gave up"
        assert result.prompt == prompt  # as the model saw it: redacted by prepare
        # Deadlines belonged to the original callers: the expired one is answered too.
        tokens, reason = model.answer(prompt, 16)
        assert (result.after.status, result.after.finish_reason) == ("completed", reason)
        assert result.after.output == "".join(tokens).strip()
        assert result.after.model == "simulated"
    assert results[answered.request_id].before == {
        "status": "completed",
        "output": "the old answer",
        "model": "old-model",
    }
    assert results[expired.request_id].before is None  # no final answer on the log
    assert (
        results[answered.request_id].to_json()["after"]["output"] == results[answered.request_id].after.output
    )
    # The history is read, never written: nothing went to the source log.
    assert {topic: len(source.events(topic)) for topic in source.topics()} == before
