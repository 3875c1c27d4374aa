"""What a shared read of a topic keeps for the tails that follow its keys, and when a tail may
take its history from it (the NATS and Kafka logs' followers)."""

from __future__ import annotations

from conveyor.log.followers import Followers


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def followers(clock: Clock) -> Followers[str, str]:
    # The shared read began at t=1000 s; records are written up to 10 s before their key's time.
    return Followers(since_ms=1_000_000, skew_ms=10_000, keep=30.0, clock=clock)


def test_a_key_created_since_the_read_began_gets_its_whole_history_and_what_comes_next() -> None:
    clock = Clock(1_020.0)
    shared = followers(clock)
    shared.deliver("other", "o1")
    shared.deliver("k", "k1")
    clock.now = 1_021.0
    shared.deliver("k", "k2")
    with shared.listen("k", created_ms=1_015_000) as (arrivals, kept):
        assert kept == ["k1", "k2"]  # its own, in order
        shared.deliver("k", "k3")
        shared.deliver("other", "o2")
        assert arrivals.get_nowait() == "k3"
        assert arrivals.empty()
    shared.deliver("k", "k4")  # after the listener left: kept, handed to nobody
    assert arrivals.empty()


def test_a_key_its_read_may_have_missed_or_dropped_records_of_gets_no_history() -> None:
    clock = Clock(1_020.0)
    shared = followers(clock)
    shared.deliver("k", "k1")
    with shared.listen("k", created_ms=1_005_000) as (_, kept):
        assert kept is None  # its records may predate the read (within the skew): look them up
    with shared.listen("k", created_ms=None) as (_, kept):
        assert kept is None  # no time to judge by
    clock.now = 1_060.0  # k1 is older than ``keep`` now
    shared.deliver("k", "k2")
    with shared.listen("k", created_ms=1_015_000) as (_, kept):
        assert kept is None  # k1 was dropped
    with shared.listen("k", created_ms=1_045_000) as (_, kept):
        assert kept == ["k2"]  # created after what was dropped: all of it is here


def test_a_failed_read_reaches_every_listener() -> None:
    shared = followers(Clock(1_020.0))
    failure = ConnectionError("the broker went away")
    with shared.listen("a", None) as (first, _), shared.listen("b", None) as (second, _):
        shared.fail(failure)
        assert first.get_nowait() is failure
        assert second.get_nowait() is failure


def test_a_read_that_keeps_nothing_only_hands_records_on() -> None:
    clock = Clock(1_020.0)
    shared: Followers[str, str] = Followers(clock=clock)
    shared.deliver("k", "k1")
    with shared.listen("k", created_ms=1_019_000) as (arrivals, kept):
        assert kept is None  # the caller looks its history up
        shared.deliver("k", "k2")
        assert arrivals.get_nowait() == "k2"
