from __future__ import annotations

import pytest

from conveyor.stages.prepare import SafetyPolicy
from conveyor.stages.redact import redact


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
