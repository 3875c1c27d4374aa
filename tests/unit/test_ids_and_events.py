from __future__ import annotations

import dataclasses
import itertools
import time
from datetime import UTC, datetime

import pytest

from conveyor.errors import InvalidEventError
from conveyor.events import Envelope, new_event, now_rfc3339
from conveyor.ids import derive_id, id_time_ms, new_id
from conveyor.payloads import RequestAccepted


def test_new_ids_are_unique_and_sort_by_creation_time() -> None:
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert abs(id_time_ms(ids[0]) - time.time() * 1000) < 5_000
    times = [id_time_ms(i) for i in ids]
    assert times == sorted(times)
    # Across milliseconds, the text order of the ids is their time order.
    for a, b in itertools.pairwise(ids):
        if id_time_ms(a) < id_time_ms(b):
            assert a < b


def test_derived_ids_are_deterministic_distinct_per_label_and_keep_the_parent_time() -> None:
    parent = new_id()
    assert derive_id(parent, "prepare") == derive_id(parent, "prepare")
    assert derive_id(parent, "prepare") != derive_id(parent, "generate")
    assert derive_id(parent, "prepare") != derive_id(new_id(), "prepare")
    assert id_time_ms(derive_id(parent, "x")) == id_time_ms(parent)


def test_event_times_are_rfc3339_utc_with_microseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    before = datetime.now(UTC)
    assert before <= datetime.fromisoformat(now_rfc3339()) <= datetime.now(UTC)
    # The date and time of day are kept per second: across a boundary they must move on.
    clock = iter([1_764_201_599_999_999_000, 1_764_201_600_000_001_000, 1_764_201_600_500_000_000])
    monkeypatch.setattr(time, "time_ns", lambda: next(clock))
    assert [now_rfc3339() for _ in range(3)] == [
        "2025-11-26T23:59:59.999999Z",
        "2025-11-27T00:00:00.000001Z",
        "2025-11-27T00:00:00.500000Z",
    ]


def test_envelope_round_trips_through_headers() -> None:
    event = new_event(
        type="request.accepted",
        source="test",
        payload=RequestAccepted(prompt="hi"),
        key="conversation-7",
        tenant="acme",
        deadline=1234.5,
        priority=2,
        model="m",
        model_version="3",
        model_license="MIT",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        redrive="generate",
    )
    headers = event.to_headers()
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-subject"] == event.request_id
    assert Envelope.from_headers(headers, event.data) == event


def test_derived_event_carries_cause_request_and_trace() -> None:
    parent = new_event(type="a", source="s", payload=RequestAccepted(prompt="x"), traceparent="00-t-s-01")
    child = parent.derive(type="b", source="s2", payload=RequestAccepted(prompt="y"), label="stage")
    assert child.causation_id == parent.id
    assert (child.request_id, child.key, child.traceparent) == (parent.request_id, parent.key, "00-t-s-01")
    assert (
        child.id
        == parent.derive(type="b", source="s2", payload=RequestAccepted(prompt="y"), label="stage").id
    )


def test_a_derived_event_keeps_every_attribute_it_does_not_set() -> None:
    # Every field set to something other than its default, so a field derive forgets shows.
    values = {
        f.name: f"{f.name}-value" for f in dataclasses.fields(Envelope) if f.type in ("str", "str | None")
    }
    parent = Envelope(**values, data=b"{}", attempt=3, deadline=12.5, priority=7)
    child = parent.derive(type="b", source="s2", payload=RequestAccepted(prompt="y"), label="stage")
    changed = {
        *("id", "type", "source", "data", "time", "dataschema", "causation_id", "attempt", "redrive"),
        "dataref",  # the child's data is its own
    }
    for field in dataclasses.fields(Envelope):
        if field.name not in changed:
            assert getattr(child, field.name) == getattr(parent, field.name), field.name
    assert child.attempt == 0
    assert child.redrive == ""  # what a stage makes of an event sent back to it goes to everyone
    assert child.dataref == ""


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (None, "missing headers ce-id, ce-type, ce-source, ce-subject"),
        ({"ce-id": "1", "ce-type": "t", "ce-source": "s"}, "missing headers ce-subject"),
        (
            {"ce-id": "1", "ce-type": "t", "ce-source": "s", "ce-subject": "r", "ce-attempt": "x"},
            "malformed",
        ),
    ],
)
def test_foreign_messages_fail_with_a_reason(headers: dict[str, str] | None, reason: str) -> None:
    with pytest.raises(InvalidEventError, match=reason):
        Envelope.from_headers(headers, b"{}")
