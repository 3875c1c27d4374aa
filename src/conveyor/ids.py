"""Event ids: time-sortable UUIDv7 for new events, deterministic ids for derived ones.

A derived id keeps the 48-bit millisecond timestamp of its parent, so derived ids
still sort by time, and replaces the random bits with a hash of (parent id, label):
a redelivered input yields the same output id, which brokers and stages dedupe.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT = 0x2 << 62


def _uuid7_from(ms: int, rand: int) -> str:
    value = (ms & ((1 << 48) - 1)) << 80 | _VERSION_7 | (rand >> 62 & 0xFFF) << 64 | _VARIANT
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def new_id() -> str:
    """A new random UUIDv7 (RFC 9562): unique and sortable by creation time."""
    return _uuid7_from(time.time_ns() // 1_000_000, int.from_bytes(os.urandom(10), "big"))


def derive_id(parent: str, label: str) -> str:
    """The id of the output that ``label`` (a stage, a chunk index) derives from ``parent``."""
    try:
        ms = int(parent.replace("-", ""), 16) >> 80 if len(parent) == 36 else 0
    except ValueError:
        ms = 0  # not a UUID (an id from elsewhere): derived ids then sort first
    digest = hashlib.blake2b(f"{parent}\x00{label}".encode(), digest_size=10).digest()
    return _uuid7_from(ms, int.from_bytes(digest, "big"))


def id_time_ms(event_id: str) -> int:
    """The creation time, in Unix milliseconds, encoded in a UUIDv7."""
    return uuid.UUID(event_id).int >> 80


# How far apart the time in a request's id and the time its records are written may be: they
# come from different clocks (the accepting gateway's, a worker's, the broker's).
CLOCK_SKEW_MS = 10_000


def created_ms(value: str) -> int | None:
    """The creation time of a UUIDv7 (request ids are one), in Unix milliseconds; None for any
    other string."""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return None
    return id_time_ms(value) if parsed.version == 7 else None
