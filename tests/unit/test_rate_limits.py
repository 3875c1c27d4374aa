"""Token buckets: the arithmetic, on a clock the test moves."""

from __future__ import annotations

import pytest

from conveyor.gateway.core import Refused
from conveyor.gateway.ratelimit import Bucket, Rate, RateLimiter
from conveyor.store.base import Namespace
from conveyor.store.memory import MemoryStateStore


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_gives_burst_tokens_then_says_how_long_to_wait() -> None:
    rate = Rate(per_second=2.0, burst=3.0)
    bucket = Bucket.full(rate, 100.0)
    for _ in range(3):
        assert bucket.wait(rate) == 0.0
        bucket = bucket.taken()
    assert bucket.tokens == 0.0
    assert bucket.wait(rate) == pytest.approx(0.5)  # one token at 2 per second
    assert bucket.refilled(rate, 100.25).wait(rate) == pytest.approx(0.25)
    assert bucket.refilled(rate, 100.5).wait(rate) == 0.0


def test_refill_stops_at_burst() -> None:
    rate = Rate(per_second=10.0, burst=4.0)
    assert Bucket(0.0, 100.0).refilled(rate, 1_000.0) == Bucket(4.0, 1_000.0)


def test_a_clock_behind_the_last_writer_adds_no_tokens_and_does_not_move_time_back() -> None:
    rate = Rate(per_second=1.0, burst=5.0)
    written = Bucket(1.5, 200.0)  # by a gateway whose clock is ahead
    behind = written.refilled(rate, 199.0)
    assert behind == written
    # Once the clock catches up, only the time after the write counts.
    assert behind.refilled(rate, 201.0) == Bucket(2.5, 201.0)


def test_burst_defaults_to_a_seconds_worth_and_at_least_one() -> None:
    assert Rate.of(20.0) == Rate(20.0, 20.0)
    assert Rate.of(0.5) == Rate(0.5, 1.0)
    assert Rate.of(0.5, 4.0) == Rate(0.5, 4.0)
    with pytest.raises(ValueError, match="above 0"):
        Rate.of(0.0)
    with pytest.raises(ValueError, match="at least 1"):
        Rate.of(5.0, 0.5)


@pytest.mark.parametrize(("wait", "header"), [(0.001, "1"), (1.0, "1"), (1.01, "2"), (30.2, "31")])
def test_retry_after_is_whole_seconds_rounded_up(wait: float, header: str) -> None:
    refused = Refused(429, "rate_limited", "slow down", retry_after=wait)
    assert refused.headers == {"Retry-After": header}
    assert Refused(401, "invalid_api_key", "who are you").headers == {"WWW-Authenticate": "Bearer"}


async def test_the_limiter_refills_with_time_and_keeps_tenants_apart() -> None:
    clock = Clock()
    limiter = RateLimiter(MemoryStateStore(), default=Rate(per_second=4.0, burst=2.0), clock=clock)
    assert [await limiter.acquire("acme") for _ in range(3)] == [0.0, 0.0, pytest.approx(0.25)]
    assert await limiter.acquire("globex") == 0.0  # a bucket of its own
    clock.now += 0.1
    assert await limiter.acquire("acme") == pytest.approx(0.15)  # a refused request takes nothing
    clock.now += 0.15
    assert await limiter.acquire("acme") == 0.0
    assert await limiter.acquire("acme") == pytest.approx(0.25)
    clock.now += 3600
    assert [await limiter.acquire("acme") for _ in range(3)] == [0.0, 0.0, pytest.approx(0.25)]


async def test_a_tenant_of_its_own_rate_and_the_others_unlimited() -> None:
    clock = Clock()
    limiter = RateLimiter(MemoryStateStore(), default=None, tenants={"acme": Rate(1.0, 1.0)}, clock=clock)
    assert [await limiter.acquire("acme") for _ in range(2)] == [0.0, pytest.approx(1.0)]
    assert [await limiter.acquire("globex") for _ in range(100)] == [0.0] * 100
    assert limiter.rate("globex") is None


async def test_an_unreadable_bucket_is_replaced_by_a_full_one() -> None:
    store = MemoryStateStore()
    await store.put(Namespace.RATE, "acme", b"not json")
    limiter = RateLimiter(store, default=Rate(1.0, 2.0), clock=Clock())
    assert [await limiter.acquire("acme") for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


class _AlwaysRaced(MemoryStateStore):
    """Another gateway writes the bucket between every read and write of ours."""

    def __init__(self) -> None:
        super().__init__()
        self.updates = 0

    async def update(self, ns: Namespace, key: str, value: bytes, revision: int) -> int | None:
        self.updates += 1
        await self.put(ns, key, b'{"tokens": 5.0, "at": 0.0}')
        return None


async def test_a_limiter_that_keeps_losing_the_race_refuses_after_a_bounded_number_of_tries() -> None:
    store = _AlwaysRaced()
    await store.put(Namespace.RATE, "acme", b'{"tokens": 5.0, "at": 0.0}')
    limiter = RateLimiter(store, default=Rate(0.01, 5.0), clock=Clock(), attempts=3)
    assert await limiter.acquire("acme") == 1.0  # refused, and told to come back soon
    assert store.updates == 3
