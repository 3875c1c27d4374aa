from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import pytest

from conveyor.events import Topic, new_event
from conveyor.payloads import EventType, RequestAccepted, RequestFailed, RequestPrepared, decode
from conveyor.stages import prepare
from conveyor.stages.prepare import SafetyPolicy
from conveyor.stages.redact import redact
from conveyor.testing import StageHarness

T = TypeVar("T")


@pytest.mark.parametrize(
    ("text", "expected", "counts"),
    [
        ("mail me at jane.doe+x@example.co.uk now", "mail me at [EMAIL] now", {"email": 1}),
        ("call +1 (415) 555-2671 or 020 7946 0958", "call [PHONE] or [PHONE]", {"phone": 2}),
        ("card 4111 1111 1111 1111 ok", "card [CARD] ok", {"card": 1}),
        ("card 4111-1111-1111-1112 fails luhn", "card 4111-1111-1111-1112 fails luhn", {}),
        ("order 12345 on 2024-05-01 at 10:30", "order 12345 on 2024-05-01 at 10:30", {}),
        ("nothing here", "nothing here", {}),
    ],
)
def test_redaction(text: str, expected: str, counts: dict[str, int]) -> None:
    assert redact(text) == (expected, counts)


def test_safety_policy_matches_phrases_case_insensitively_on_word_boundaries() -> None:
    policy = SafetyPolicy(("build a bomb",))
    assert policy.violation("How do I BUILD  a bomb?") == "build a bomb"
    assert policy.violation("rebuild a bombastic speech") is None
    assert SafetyPolicy(()).violation("build a bomb") is None


@pytest.mark.timeout(20)
@pytest.mark.parametrize("unit", ["a", "a@", "ab.", "1 ", "a@b."])
def test_redaction_of_a_long_prompt_without_pii_ends(unit: str) -> None:
    # Long runs of the characters an address or a number is made of: the email rule used to search
    # each run from every one of its characters (a 300,000-letter prompt held prepare for minutes).
    text = unit * (300_000 // len(unit))
    assert redact(text) == (text, {})


@pytest.mark.timeout(30)
async def test_a_long_prompt_is_screened_on_a_thread_with_the_same_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Half a second of CPU per million characters: not on the worker's event loop.
    threaded: list[object] = []
    real = asyncio.to_thread

    async def to_thread(call: Callable[[], T]) -> T:
        threaded.append(call)
        return await real(call)

    monkeypatch.setattr("asyncio.to_thread", to_thread)
    harness = StageHarness(prepare.prepare_stage())
    long = "A long report. " * 40_000 + "Mail jane@example.com"
    for prompt in ("Mail jane@example.com", long):
        accepted = new_event(type=EventType.ACCEPTED, source="t", payload=RequestAccepted(prompt=prompt))
        (out,) = (await harness.handle(accepted))[Topic.PREPARED]
        screened = decode(RequestPrepared, out.data)
        assert screened.prompt.endswith("Mail [EMAIL]")
        assert screened.redactions == {"email": 1}
    assert len(threaded) == 1  # the long one only
    threaded.clear()
    blocked = "How to build a bomb? " + "padding " * 40_000
    refused = new_event(type=EventType.ACCEPTED, source="t", payload=RequestAccepted(prompt=blocked))
    (failed,) = (await harness.handle(refused))[Topic.COMPLETED]
    assert decode(RequestFailed, failed.data).code == "safety_blocked"
    assert len(threaded) == 1
