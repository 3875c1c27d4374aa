"""The local engine's waiting requests: the most urgent first, tenants taking turns within a priority."""

from __future__ import annotations

import queue
import threading

import pytest

from conveyor.models.fair_queue import FairQueue


def test_tenants_take_turns_within_a_priority_and_each_keeps_its_order() -> None:
    waiting: FairQueue[str] = FairQueue()
    for item in ("a1", "a2", "a3"):
        waiting.put(item, priority=0, tenant="acme")
    waiting.put("g1", priority=0, tenant="globex")
    waiting.put("i1", priority=0, tenant="initech")
    order = [waiting.get(block=False) for _ in range(5)]
    assert order == ["a1", "g1", "i1", "a2", "a3"]  # FIFO would have made globex wait for acme's three


def test_a_more_urgent_request_goes_first_whoever_was_served() -> None:
    waiting: FairQueue[str] = FairQueue()
    waiting.put("a1", priority=0, tenant="acme")
    assert waiting.get(block=False) == "a1"
    waiting.put("g-batch", priority=5, tenant="globex")
    waiting.put("a2", priority=0, tenant="acme")
    waiting.put("a-urgent", priority=-5, tenant="acme")
    assert [waiting.get(block=False) for _ in range(3)] == ["a-urgent", "a2", "g-batch"]


def test_closing_lets_what_waits_go_first_then_says_none() -> None:
    waiting: FairQueue[str] = FairQueue()
    with pytest.raises(queue.Empty):
        waiting.get(block=False)
    waiting.put("last", priority=0, tenant="acme")
    waiting.close()
    assert (waiting.get(block=True), waiting.get(block=True)) == ("last", None)


def test_a_blocked_get_wakes_for_a_put_from_another_thread() -> None:
    waiting: FairQueue[str] = FairQueue()
    got: list[str | None] = []
    engine = threading.Thread(target=lambda: got.append(waiting.get(block=True)))
    engine.start()
    waiting.put("hello", priority=0, tenant="acme")
    engine.join(timeout=10)
    assert got == ["hello"]
