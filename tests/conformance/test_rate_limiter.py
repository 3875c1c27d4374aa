"""The rate limiter on every StateStore backend (memory, NATS key-value, Redis).

Two limiters on one store stand for two gateways: whatever their requests' interleaving,
compare-and-set keeps the tenant's bucket exact.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from conveyor.gateway.ratelimit import Rate, RateLimiter
from conveyor.store.base import Namespace, StateStore


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_bucket_is_stored_per_tenant_and_refills_with_time(store: StateStore) -> None:
    clock = Clock()
    limiter = RateLimiter(store, default=Rate(per_second=2.0, burst=3.0), clock=clock)
    assert [await limiter.acquire("acme") for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]
    entry = await store.get(Namespace.RATE, "acme")
    assert entry is not None
    assert orjson.loads(entry.value) == {"tokens": 0.0, "at": clock.now}  # wall-clock seconds
    assert await store.get(Namespace.RATE, "globex") is None
    clock.now += 0.5
    assert [await limiter.acquire("acme") for _ in range(2)] == [0.0, pytest.approx(0.5)]


async def test_two_gateways_sharing_a_store_never_let_more_than_burst_through(store: StateStore) -> None:
    clock = Clock()  # stopped: no refill while the requests race
    rate = Rate(per_second=10.0, burst=5.0)
    gateways = [RateLimiter(store, default=rate, clock=clock) for _ in range(2)]

    async def burst(count: int) -> list[float]:
        return await asyncio.gather(*(gateways[i % 2].acquire("acme") for i in range(count)))

    waits = await burst(40)
    assert waits.count(0.0) == 5
    assert all(w == pytest.approx(0.1, abs=1e-6) for w in waits if w)
    # One token's worth of time later: exactly one more, whichever gateway gets it.
    clock.now += 0.1
    assert (await burst(20)).count(0.0) == 1
    clock.now += 10.0  # long enough to fill up again, but never above burst
    assert (await burst(40)).count(0.0) == 5
