from __future__ import annotations

import asyncio

import pytest

from conveyor.expiry import Expiry
from conveyor.runtime.deadlines import Deadlines


async def test_keys_not_discarded_in_time_expire_in_order_and_the_sweep_wakes_after_idling() -> None:
    expired: list[str] = []
    last = asyncio.Event()

    def on_expire(key: str) -> None:
        expired.append(key)
        if key == "c":
            last.set()

    expiry: Expiry[str] = Expiry(0.05, on_expire)
    for key in "abc":
        expiry.add(key)
    expiry.discard("b")
    await asyncio.wait_for(last.wait(), 5)
    assert expired == ["a", "c"]
    assert len(expiry) == 0  # nothing left: the sweep sleeps until the next add
    last.clear()
    expiry.add("c")
    await asyncio.wait_for(last.wait(), 5)
    assert expired == ["a", "c", "c"]
    await expiry.close()


async def test_a_call_that_overruns_raises_timeout_and_its_task_goes_on() -> None:
    deadlines = Deadlines(0.05)
    never = asyncio.Event()
    with pytest.raises(TimeoutError):
        async with deadlines.limit():
            await never.wait()
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0  # the cancellation was ours, and consumed: the task goes on
    await deadlines.close()


async def test_calls_that_finish_in_time_are_left_alone_while_another_times_out() -> None:
    deadlines = Deadlines(0.2)
    release = asyncio.Event()

    async def quick() -> str:
        async with deadlines.limit():
            pass  # armed and left at once
        await release.wait()  # long after its limit was left: must not be cancelled
        return "done"

    async def stuck() -> None:
        async with deadlines.limit():
            await asyncio.Event().wait()

    quick_task = asyncio.create_task(quick())
    with pytest.raises(TimeoutError):
        await stuck()
    release.set()
    assert await quick_task == "done"
    await deadlines.close()


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    deadlines = Deadlines(30)
    entered = asyncio.Event()

    async def limited() -> None:
        async with deadlines.limit():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(limited())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await deadlines.close()
