"""Dead letters sent back once their cause is fixed: the whole pipeline, on in-memory backends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from conveyor.deadletters import dead_letters, sent_back
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


async def until(core: GatewayCore, rid: str, status: str) -> RequestView:
    """The request's view once it has ``status`` (learned from the status watch)."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    with core.watch.subscribe(rid, queue):
        view = await core.view(rid, tenant="default")
        async with asyncio.timeout(10):
            while view is None or view.status != status:
                _, view = await queue.get()
    return view


async def test_a_dead_lettered_request_sent_back_once_fixed_completes_once() -> None:
    log, store, model = MemoryEventLog(), MemoryStateStore(), _Down()
    stages = [
        prepare_stage(),
        generate_stage(model, CancelWatch(log)),
        finalize_stage(),
        Projector().stage(),
    ]
    core = GatewayCore(log, store)
    async with contextlib.AsyncExitStack() as running:
        for stage in stages:
            await running.enter_async_context(StageHarness(stage, log=log, store=store).running())
        watching = asyncio.create_task(core.watch.run())
        running.callback(watching.cancel)
        rids = [(await core.accept(RequestAccepted(prompt=p, max_tokens=16))).id for p in PROMPTS]
        for rid in rids:
            failed = await until(core, rid, "failed")
            assert failed.error is not None
            assert (failed.error.code, failed.error.stage) == ("dead_lettered", "generate")
            assert "the model server is down" in failed.error.message

        model.fixed = True
        letters = [item async for item in dead_letters(log)]
        assert sorted(item.event.request_id for item in letters) == sorted(rids)
        skipped = EVENTS_HANDLED.value(stage="projector", outcome="skipped")
        for item in letters:
            await log.publish(item.letter.topic, [sent_back(item.letter)])
        for rid, prompt in zip(rids, PROMPTS, strict=True):
            view = await until(core, rid, "completed")
            assert view.output == "".join(model.answer(prompt, 16)[0]).strip()
            assert view.error is None
            assert "dead_lettered_at" in view.stages["generate"]  # what happened stays told
            assert await store.get(Namespace.USAGE, rid) is not None
        assert model.answered == len(PROMPTS)
        # The projector, which reads [prepared] too, had folded its copy already: it skipped these.
        assert EVENTS_HANDLED.value(stage="projector", outcome="skipped") - skipped == len(letters)

        # Sent back again (an operator's second try): the same events, which the log keeps once.
        prepared = len(log.events(Topic.PREPARED))
        for item in letters:
            await log.publish(item.letter.topic, [sent_back(item.letter)])
        assert len(log.events(Topic.PREPARED)) == prepared
    assert model.answered == len(PROMPTS)
    assert len(log.events(Topic.COMPLETED)) == len(PROMPTS)
