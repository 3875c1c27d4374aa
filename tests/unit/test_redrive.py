"""Dead letters sent back once their cause is fixed: the whole pipeline, on in-memory backends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from conveyor.deadletters import Letter, dead_letters, latest, sent_back
from conveyor.errors import PermanentError
from conveyor.events import Topic
from conveyor.gateway.core import GatewayCore
from conveyor.models.base import GenerationRequest, Token
from conveyor.models.simulated import SimulatedModel
from conveyor.observability.metrics import EVENTS_HANDLED
from conveyor.payloads import RequestAccepted
from conveyor.projector import Projector
from conveyor.stages import CancelWatch, finalize_stage, generate_stage, prepare_stage
from conveyor.store.base import Namespace
from conveyor.testing import MemoryEventLog, MemoryStateStore, StageHarness
from conveyor.view import RequestView

PROMPTS = ("first question", "second question")


class _Down(SimulatedModel):
    """A model server that refuses everything until it is ``fixed``; counts what it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.fixed, self.answered = False, 0

    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        if not self.fixed:
            for r in requests:
                yield Token(r.id, "", error=PermanentError("the model server is down"))
            return
        self.answered += len(requests)
        async for token in super().generate(requests):
            yield token


@contextlib.asynccontextmanager
async def pipeline(log: MemoryEventLog, model: _Down) -> AsyncIterator[GatewayCore]:
    """Every stage and the projector running, and a gateway core watching the views."""
    store = MemoryStateStore()
    stages = [prepare_stage(), generate_stage(model, CancelWatch(log)), finalize_stage(), Projector().stage()]
    core = GatewayCore(log, store)
    async with contextlib.AsyncExitStack() as running:
        for stage in stages:
            await running.enter_async_context(StageHarness(stage, log=log, store=store).running())
        watching = asyncio.create_task(core.watch.run())
        running.callback(watching.cancel)
        yield core


async def until(core: GatewayCore, rid: str, status: str) -> RequestView:
    """The request's view once it has ``status`` (learned from the status watch)."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    with core.watch.subscribe(rid, queue):
        view = await core.view(rid, tenant="default")
        async with asyncio.timeout(10):
            while view is None or view.status != status:
                _, view = await queue.get()
    return view


async def letters(log: MemoryEventLog, count: int) -> list[Letter]:
    """The first ``count`` dead letters, once there are that many."""
    found: list[Letter] = []
    async with asyncio.timeout(10), contextlib.aclosing(dead_letters(log, follow=True)) as arriving:
        async for item in arriving:
            found.append(item)
            if len(found) == count:
                return found
    raise AssertionError("unreachable: the tail follows")


async def send_back(log: MemoryEventLog, items: list[Letter]) -> None:
    for item in items:
        await log.publish(item.letter.topic, [sent_back(item.letter)])


async def test_a_dead_lettered_request_sent_back_once_fixed_completes_once() -> None:
    log, model = MemoryEventLog(), _Down()
    async with pipeline(log, model) as core:
        rids = [(await core.accept(RequestAccepted(prompt=p, max_tokens=16))).id for p in PROMPTS]
        for rid in rids:
            failed = await until(core, rid, "failed")
            assert failed.error is not None
            assert (failed.error.code, failed.error.stage) == ("dead_lettered", "generate")
            assert "the model server is down" in failed.error.message

        model.fixed = True
        dead = await letters(log, len(rids))
        assert sorted(item.event.request_id for item in dead) == sorted(rids)
        skipped = EVENTS_HANDLED.value(stage="projector", outcome="skipped")
        await send_back(log, dead)
        for rid, prompt in zip(rids, PROMPTS, strict=True):
            view = await until(core, rid, "completed")
            assert view.output == "".join(model.answer(prompt, 16)[0]).strip()
            assert view.error is None
            assert "dead_lettered_at" in view.stages["generate"]  # what happened stays told
            assert await core.store.get(Namespace.USAGE, rid) is not None
        assert model.answered == len(PROMPTS)
        # The projector, which reads [prepared] too, had folded its copy already: it skipped these.
        assert EVENTS_HANDLED.value(stage="projector", outcome="skipped") - skipped == len(dead)

        # Sent back again (an operator's second try): the same events, which the log keeps once.
        prepared = len(log.events(Topic.PREPARED))
        await send_back(log, dead)
        assert len(log.events(Topic.PREPARED)) == prepared
    assert model.answered == len(PROMPTS)
    assert len(log.events(Topic.COMPLETED)) == len(PROMPTS)


async def test_after_a_copy_sent_back_failed_again_only_the_latest_letter_is_sent() -> None:
    log, model = MemoryEventLog(), _Down()
    async with pipeline(log, model) as core:
        rid = (await core.accept(RequestAccepted(prompt=PROMPTS[0], max_tokens=16))).id
        await send_back(log, await letters(log, 1))  # too early: the model is still down
        both = await letters(log, 2)
        assert [item.letter.stage for item in both] == ["generate", "generate"]
        # The first letter's event was sent back already: the second holds that copy.
        assert latest(both) == both[1:]
        model.fixed = True
        await send_back(log, latest(both))
        await until(core, rid, "completed")
    assert model.answered == 1
    assert len(log.events(Topic.COMPLETED)) == 1
