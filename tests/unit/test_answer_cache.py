"""The answer cache: a deterministic request asked again is answered without the model."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

from conveyor.events import Topic, new_event
from conveyor.models.base import Embedding, GenerationRequest, Token
from conveyor.models.simulated import SimulatedModel
from conveyor.payloads import EventType, GenerationCompleted, RequestPrepared, decode
from conveyor.stages import CancelWatch, generate_stage
from conveyor.store.base import Namespace
from conveyor.testing import MemoryEventLog, MemoryStateStore, StageHarness
from tests.conftest import NodeFactory
from tests.helpers import read_sse, streamed_text, submit, wait_final


async def test_a_deterministic_request_asked_again_is_answered_from_the_cache(node: NodeFactory) -> None:
    async with node(token_delay=0.001, cache=3600.0) as http:

        async def asked(prompt: str, **fields: Any) -> dict[str, Any]:
            return await wait_final(http, await submit(http, prompt, **{"max_tokens": 16, **fields}))

        first, again = await asked("tell me about queues"), await asked("tell me about queues")
        assert (first["cached"], again["cached"]) == (False, True)
        assert (again["output"], again["usage"], again["finish_reason"]) == (
            first["output"],
            first["usage"],
            first["finish_reason"],
        )
        # Its stream is the whole answer in one chunk, then the end, as any stream.
        events = await read_sse(http, again["id"])
        assert streamed_text(events).strip() == first["output"]
        assert events[-1][1] == "completed"

        # Another option, or a sampled answer without a seed, is another answer.
        assert (await asked("tell me about queues", max_tokens=15))["cached"] is False
        sampled = [await asked("tell me about logs", temperature=0.8) for _ in range(2)]
        assert [v["cached"] for v in sampled] == [False, False]
        seeded = [await asked("tell me about logs", temperature=0.8, seed=7) for _ in range(2)]
        assert [v["cached"] for v in seeded] == [False, True]


async def test_without_a_cache_nothing_is_kept(node: NodeFactory) -> None:
    async with node() as http:
        views = [await wait_final(http, await submit(http, "the same", max_tokens=8)) for _ in range(2)]
    assert [v["cached"] for v in views] == [False, False]


class Counting(SimulatedModel):
    """The simulated model, counting the requests it was asked to answer."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        self.asked += len(requests)
        return super().generate(requests)

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        self.asked += len(texts)
        return await super().embed(texts)


async def test_the_model_runs_once_for_requests_asked_the_same() -> None:
    model, log, store = Counting(), MemoryEventLog(), MemoryStateStore()
    harness = StageHarness(generate_stage(model, CancelWatch(log), cache=60.0), log=log, store=store)
    for embed in (False, True):
        for _ in range(3):  # three requests, each its own id, the same inputs
            prepared = RequestPrepared(prompt="the same question", max_tokens=8, embed=embed)
            out = await harness.handle(new_event(type=EventType.PREPARED, source="test", payload=prepared))
            (generated,) = [decode(GenerationCompleted, e.data) for e in out[Topic.GENERATED]]
            assert (generated.embedding is not None) == embed
        assert model.asked == 1 + embed  # once for the text, once for the embedding
    assert len(await store.keys(Namespace.CACHE)) == 2
