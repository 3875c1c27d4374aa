"""Per-tenant token-bucket rate limits, shared by every gateway through the StateStore.

A tenant's bucket holds up to ``burst`` tokens and gains ``per_second`` tokens a second; each
submit takes one. The bucket is one record in ``Namespace.RATE``, keyed by the tenant:
``{"tokens", "at"}`` with ``at`` in wall-clock seconds, so gateways in different processes and on
different machines share it. It changes only by compare-and-set (read, refill for the time
passed, take one, write back against the revision read); a gateway that lost the race reads again.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time
from collections.abc import Callable, Mapping

import orjson

from conveyor.store.base import Entry, Namespace, StateStore

# A client that waited exactly the time it was told gets its token, although wall-clock seconds
# as floats (about 1.7e9) only resolve to about 0.2 microseconds.
_SLACK_SECONDS = 1e-6


@dataclasses.dataclass(frozen=True, slots=True)
class Rate:
    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not self.per_second > 0:
            raise ValueError(f"a rate limit must be above 0 requests per second, not {self.per_second}")
        if not self.burst >= 1:
            raise ValueError(f"a rate limit's burst must be at least 1, not {self.burst}")

    @classmethod
    def of(cls, per_second: float, burst: float | None = None) -> Rate:
        """``burst`` defaults to one second's worth of requests, and at least one."""
        return cls(per_second, max(1.0, per_second) if burst is None else burst)


@dataclasses.dataclass(frozen=True, slots=True)
class Bucket:
    tokens: float
    at: float  # wall-clock seconds at which ``tokens`` was counted

    @classmethod
    def full(cls, rate: Rate, now: float) -> Bucket:
        return cls(rate.burst, now)

    def refilled(self, rate: Rate, now: float) -> Bucket:
        """The bucket at ``now``: refilled for the time passed, never above ``burst``."""
        # Gateways' clocks differ a little. A bucket's time never goes back, so a clock behind
        # the last writer's only delays the refill; it never adds tokens.
        elapsed = max(0.0, now - self.at)
        return Bucket(min(rate.burst, self.tokens + elapsed * rate.per_second), max(self.at, now))

    def wait(self, rate: Rate) -> float:
        """Seconds until the bucket holds a whole token; 0.0 if it does now."""
        wait = (1.0 - self.tokens) / rate.per_second
        return 0.0 if wait <= _SLACK_SECONDS else wait

    def taken(self) -> Bucket:
        return Bucket(self.tokens - 1.0, self.at)

    def encode(self) -> bytes:
        return orjson.dumps({"tokens": self.tokens, "at": self.at})

    @classmethod
    def decode(cls, entry: Entry | None, rate: Rate, now: float) -> Bucket:
        """The stored bucket; a new (full) one when there is none or it is unreadable."""
        if entry is not None:
            try:
                record = orjson.loads(entry.value)
                return cls(float(record["tokens"]), float(record["at"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                pass  # overwritten below, against its revision
        return cls.full(rate, now)


class RateLimiter:
    """Takes a token from a tenant's bucket for every submit; tenants without a rate go free."""

    def __init__(
        self,
        store: StateStore,
        *,
        default: Rate | None,
        tenants: Mapping[str, Rate] | None = None,
        clock: Callable[[], float] = time.time,
        attempts: int = 16,
    ) -> None:
        self._store, self._default, self._clock, self._attempts = store, default, clock, attempts
        self._tenants = tenants if tenants is not None else {}  # a live view of a keys file's, maybe
        # One store round trip at a time per tenant in this process: requests here queue instead
        # of failing each other's compare-and-set; only other gateways can make it fail.
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    def rate(self, tenant: str) -> Rate | None:
        return self._tenants.get(tenant, self._default)

    async def acquire(self, tenant: str) -> float:
        """Take a token for one request of ``tenant``: 0.0 if it may go ahead, else the seconds
        until a token will be there (nothing is taken then)."""
        rate = self.rate(tenant)
        if rate is None:
            return 0.0
        async with self._locks[tenant]:
            for attempt in range(self._attempts):
                entry = await self._store.get(Namespace.RATE, tenant)
                now = self._clock()
                bucket = Bucket.decode(entry, rate, now).refilled(rate, now)
                wait = bucket.wait(rate)
                if wait > 0:
                    return wait  # nothing to write: the stored bucket refills by itself
                value = bucket.taken().encode()
                if entry is None:
                    written = await self._store.create(Namespace.RATE, tenant, value)
                else:
                    written = await self._store.update(Namespace.RATE, tenant, value, entry.revision)
                if written is not None:
                    return 0.0
                # Another gateway wrote first: read again, after a jittered pause so that
                # gateways racing in step fall out of step.
                await asyncio.sleep(random.uniform(0, 0.001 * (attempt + 1)))
        # Lost every race: other gateways are taking this tenant's tokens as fast as they can.
        # Refusing keeps the limit (letting it through could exceed it); soon is worth a retry.
        return min(1.0, 1.0 / rate.per_second)
