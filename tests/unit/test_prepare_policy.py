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
