"""The StateStore seam: small keyed records with compare-and-set, grouped in namespaces."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol


class Namespace(StrEnum):
    """Every kind of state Conveyor keeps outside the log (each rebuildable from it, but FILES and
    BATCHES)."""

    STATUS = "status"  # the projector's per-request view
    DEDUPE = "dedupe"  # (stage, event id) pairs whose outputs are durably published
    USAGE = "usage"  # the usage ledger: one record per request, written once
    IDEMPOTENCY = "idempotency"  # client Idempotency-Key -> request id
    RATE = "rate"  # per-tenant token buckets of the gateways' rate limits
    # Kept for clients rather than rebuildable from the log: the files they uploaded (a batch's
    # input; the log holds every request it made) and their batches.
    FILES = "files"
    BATCHES = "batches"
    CACHE = "cache"  # deterministic answers by their request's digest (stages/answer_cache.py)
    SPEND = "spend"  # USD per tenant and month, what budgets are held to (spend.py)


_DAY = 86_400.0
# Seconds each namespace keeps a key after its last write (0: forever); every backend honours it.
TTL: Mapping[Namespace, float] = MappingProxyType(
    {
        Namespace.STATUS: 30 * _DAY,
        Namespace.DEDUPE: 7 * _DAY,
        Namespace.USAGE: 0.0,
        Namespace.IDEMPOTENCY: 1 * _DAY,
        # A bucket left alone this long would be full again anyway: expiry loses nothing.
        Namespace.RATE: 1 * _DAY,
        Namespace.FILES: 30 * _DAY,
        Namespace.BATCHES: 30 * _DAY,
        Namespace.CACHE: 7 * _DAY,
        Namespace.SPEND: 62 * _DAY,  # this month's and the last, whole
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    value: bytes
    revision: int


class StateStore(Protocol):
    """Contract (tests/conformance/test_state_store.py runs it against every backend):

    * ``create`` writes only if the key is absent and says whether it did; two racing
      creates: exactly one wins. ``update`` writes only if the revision still matches.
    * revisions grow with every write to a key.
    * ``watch`` yields (key, value) for every write made after it started.
    """

    async def get(self, ns: Namespace, key: str) -> Entry | None: ...

    async def put(self, ns: Namespace, key: str, value: bytes) -> int: ...

    async def create(self, ns: Namespace, key: str, value: bytes) -> int | None:
        """The new revision, or None if the key already exists."""
        ...

    async def update(self, ns: Namespace, key: str, value: bytes, revision: int) -> int | None:
        """The new revision, or None if the key changed since ``revision``."""
        ...

    async def delete(self, ns: Namespace, key: str) -> None: ...

    async def keys(self, ns: Namespace) -> list[str]:
        """Every live key (an operator or test tool: it reads the whole namespace)."""
        ...

    def watch(self, ns: Namespace) -> AsyncIterator[tuple[str, bytes]]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
