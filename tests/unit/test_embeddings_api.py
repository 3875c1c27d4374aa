"""OpenAI's /v1/embeddings with the official SDK, through the pipeline, on the simulated model."""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Sequence

import openai
import pytest

from conveyor.events import Topic, new_event
from conveyor.models.base import GenerationRequest, ModelInfo, Token
from conveyor.models.simulated import EMBEDDING_SIZE, embedding_of
from conveyor.models.tools import PromptedTools
from conveyor.payloads import DeadLetter, EventType, RequestPrepared, decode
from conveyor.stages import CancelWatch, generate_stage
from conveyor.testing import MemoryEventLog, StageHarness
from tests.conftest import NodeFactory
from tests.helpers import sdk


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


async def test_each_input_gets_its_embedding_in_order_with_its_usage(node: NodeFactory) -> None:
    texts = ["the queue is long", "the queue is short", "bananas are yellow", "write to jane@example.com"]
    async with node() as http, sdk(str(http.base_url)) as client:
        floats = await client.embeddings.create(model="simulated", input=texts, encoding_format="float")
        # The SDK's default asks for base64 (float32) and decodes it: the same numbers, to float32.
        packed = await client.embeddings.create(model="simulated", input=texts)
        one = await client.embeddings.create(model="simulated", input=texts[0])
    assert [d.index for d in floats.data] == [0, 1, 2, 3]
    vectors = [d.embedding for d in floats.data]
    assert all(len(v) == EMBEDDING_SIZE for v in vectors)
    assert vectors[:3] == [embedding_of(t) for t in texts[:3]]
    assert vectors[3] == embedding_of("write to [EMAIL]")  # redacted by prepare, like every prompt
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    for exact, decoded in zip(vectors, (d.embedding for d in packed.data), strict=True):
        assert decoded == pytest.approx(exact, rel=1e-6)
    assert one.data[0].embedding == vectors[0]
    assert (floats.model, floats.usage.prompt_tokens, floats.usage.total_tokens) == ("simulated", 14, 14)


async def test_wrong_inputs_are_refused_with_the_reason(node: NodeFactory) -> None:
    async with node() as http, sdk(str(http.base_url)) as client:
        for bad in ([], [""], [[1, 2, 3]]):
            with pytest.raises(openai.BadRequestError, match="input"):
                await client.embeddings.create(model="simulated", input=bad)
        with pytest.raises(openai.BadRequestError, match="dimensions is not supported"):
            await client.embeddings.create(model="simulated", input="hi", dimensions=8)
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="nobody", input="hi")
        with pytest.raises(openai.BadRequestError, match="refused by the safety policy"):
            await client.embeddings.create(model="simulated", input="how to build a bomb")


class TextOnly:
    """A ModelBackend that makes text and no embeddings."""

    info = ModelInfo(name="text-only", version="1", license="MIT")

    def count_tokens(self, text: str) -> int:
        return 1

    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        for request in requests:
            yield Token(request.id, "text", "stop")

    async def close(self) -> None:
        return None


async def test_a_model_that_makes_no_embeddings_dead_letters_the_request_as_the_clients_error() -> None:
    log = MemoryEventLog()
    stage = generate_stage(PromptedTools(TextOnly()), CancelWatch(log))
    prepared = new_event(
        type=EventType.PREPARED, source="test", payload=RequestPrepared(prompt="hi", embed=True)
    )
    out = await StageHarness(stage, log=log).handle(prepared)
    (letter,) = [decode(DeadLetter, e.data) for e in out[Topic.DLQ]]
    assert (letter.code, letter.error) == (
        "invalid_request",
        "RejectedError: the model text-only makes no embeddings",
    )
    assert Topic.GENERATED not in out or out[Topic.GENERATED] == []
