from __future__ import annotations

import itertools

from conveyor.events import Envelope, new_event
from conveyor.payloads import (
    CancelRequested,
    DeadLetter,
    EventType,
    GenerationCompleted,
    GenerationStarted,
    RequestAccepted,
    RequestCompleted,
    RequestFailed,
    RequestPrepared,
    Usage,
)
from conveyor.view import RequestView, fold

ROOT = new_event(type=EventType.ACCEPTED, source="gw", payload=RequestAccepted(prompt="p"))


def child(type: str, payload: object) -> Envelope:
    return ROOT.derive(type=type, source="t", payload=payload, label=type)  # type: ignore[arg-type]


PREPARED = child(EventType.PREPARED, RequestPrepared(prompt="p"))
STARTED = child(EventType.STARTED, GenerationStarted())
GENERATED = child(EventType.GENERATED, GenerationCompleted(text=" hi "))
COMPLETED = child(
    EventType.COMPLETED,
    RequestCompleted(
        output="hi",
        streamed_chars=4,
        usage=Usage(prompt_tokens=1, completion_tokens=2),
        generated_at=GENERATED.time,  # as finalize sets it
    ),
)


def fold_all(events: list[Envelope]) -> RequestView:
    view = None
    for e in events:
        view = fold(view, e)
    assert view is not None
    return view


def test_the_happy_path_ends_completed_with_output_usage_and_stage_times() -> None:
    view = fold_all([ROOT, PREPARED, STARTED, GENERATED, COMPLETED])
    assert view.status == "completed"
    assert view.output == "hi"
    assert view.usage == Usage(prompt_tokens=1, completion_tokens=2)
    assert set(view.stages) == {"gateway", "prepare", "generate", "finalize"}


def test_the_completed_event_alone_tells_when_generation_finished() -> None:
    # The projector does not read [generated]: the view must not miss what it would have said.
    assert fold_all([ROOT, PREPARED, STARTED, COMPLETED]) == fold_all(
        [ROOT, PREPARED, STARTED, GENERATED, COMPLETED]
    )
    assert fold_all([ROOT, COMPLETED]).stages["generate"] == {"finished_at": GENERATED.time}


def test_any_order_and_any_repeats_converge_on_the_same_view() -> None:
    events = [ROOT, PREPARED, STARTED, GENERATED, COMPLETED]
    expected = fold_all(events)
    for order in itertools.permutations(events):
        assert fold_all([*order, *order[:2]]) == expected


def test_the_first_terminal_status_wins() -> None:
    failed = child(EventType.FAILED, RequestFailed(code="x", message="boom", stage="finalize"))
    view = fold_all([ROOT, COMPLETED, failed])
    assert (view.status, view.error) == ("completed", None)
    view = fold_all([ROOT, failed, COMPLETED])
    assert view.status == "failed"
    assert view.error is not None
    assert view.error.code == "x"


def test_cancel_before_generation_is_final_and_during_generation_waits_for_the_generator() -> None:
    cancel = new_event(
        type=EventType.CANCEL, source="gw", payload=CancelRequested(), request_id=ROOT.request_id
    )
    assert fold_all([ROOT, cancel]).status == "cancelled"
    assert fold_all([ROOT, STARTED, cancel]).status == "generating"
    stopped = child(
        EventType.COMPLETED, RequestCompleted(output="h", streamed_chars=1, finish_reason="cancelled")
    )
    assert fold_all([ROOT, STARTED, cancel, stopped]).status == "cancelled"
    # The generator finished before it saw the cancel: the request completed.
    assert fold_all([ROOT, STARTED, cancel, COMPLETED]).status == "completed"


def test_a_completion_wins_over_a_dead_letter_in_either_order() -> None:
    # A request dead-lettered at generate, sent back once the model was fixed, and completed.
    letter = child(EventType.DEAD_LETTER, DeadLetter(stage="generate", topic="prepared", error="model down"))
    dead = fold_all([ROOT, PREPARED, letter])
    assert dead.status == "failed"
    assert dead.error is not None
    assert dead.error.code == "dead_lettered"
    for order in itertools.permutations([PREPARED, letter, COMPLETED]):
        view = fold_all([ROOT, *order])
        assert (view.status, view.error, view.output) == ("completed", None, "hi"), order
        assert view.stages["generate"]["dead_lettered_at"] == letter.time  # what happened stays told


def test_a_dead_letter_of_a_refusal_tells_its_code_and_a_completion_still_wins_over_it() -> None:
    letter = child(
        EventType.DEAD_LETTER,
        DeadLetter(
            stage="generate", topic="prepared", error="prompt too long", code="context_length_exceeded"
        ),
    )
    refused = fold_all([ROOT, PREPARED, letter])
    assert refused.error is not None
    assert (refused.status, refused.error.code, refused.error.stage) == (
        "failed",
        "context_length_exceeded",
        "generate",
    )
    assert fold_all([ROOT, PREPARED, letter, COMPLETED]).status == "completed"  # sent back, and finished
