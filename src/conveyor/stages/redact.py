"""PII redaction: emails, phone numbers and payment card numbers become placeholders.

Runs in ``prepare``, before the prompt reaches any later topic, log line or model.
Card numbers must pass the Luhn check and phone numbers need 9 to 15 digits, so order
numbers, dates and the like survive.
"""

from __future__ import annotations

import re
from collections.abc import Callable


def _luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _phone_length(number: str) -> bool:
    return 9 <= sum(c.isdigit() for c in number) <= 15  # E.164 numbers have at most 15 digits


_RULES: tuple[tuple[str, re.Pattern[str], Callable[[str], bool]], ...] = (
    # A match starts only where a local part can (never inside a run of its characters), and every
    # part is bounded as addresses are: without both, a long run of letters with no "@" in it was
    # searched from each of its characters to its end (300,000 letters: minutes of one core).
    (
        "email",
        re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}"),
        lambda _: True,
    ),
    ("card", re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), _luhn_ok),
    (
        "phone",
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)"
        ),
        _phone_length,
    ),
)


def redact(text: str) -> tuple[str, dict[str, int]]:
    """The text with PII replaced, and how many of each kind were found."""
    counts: dict[str, int] = {}
    for label, pattern, valid in _RULES:

        def replace(m: re.Match[str], label: str = label, valid: Callable[[str], bool] = valid) -> str:
            if not valid(m.group()):
                return m.group()
            counts[label] = counts.get(label, 0) + 1
            return f"[{label.upper()}]"

        text = pattern.sub(replace, text)
    return text, counts
