"""`conveyor up` with its default model generates real text and streams it."""

from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.conftest import ConveyorFactory
from tests.helpers import read_sse, streamed_text, submit, wait_final

pytestmark = [pytest.mark.slow, pytest.mark.model]


async def test_the_default_model_answers_in_english_and_streams_what_it_answers(
    conveyor: ConveyorFactory,
) -> None:
    up = conveyor(model="local").start(timeout=120)
    assert any("model: local (q8_0 weights)" in line for line in up.output), up.output
    prompts = ["What is the capital of France?", "Write one sentence about the sea."]
    async with httpx.AsyncClient(base_url=up.url, timeout=120) as client:
        rids = await asyncio.gather(*(submit(client, p, max_tokens=48) for p in prompts))
        streams = await asyncio.gather(*(read_sse(client, rid) for rid in rids))
        views = await asyncio.gather(*(wait_final(client, rid, wait=60) for rid in rids))
    for view, events in zip(views, streams, strict=True):
        assert view["status"] == "completed"
        assert view["model"] == "smollm2-135m-instruct"
        assert re.search(r"[A-Za-z]{3,}( [A-Za-z]+)+", view["output"]), view["output"]
        assert streamed_text(events).strip() == view["output"]
        assert view["usage"]["completion_tokens"] > 0
    assert "Paris" in views[0]["output"]
    # The official OpenAI SDK, pointed at the gateway, on the same model; streaming and not.
    async with openai.AsyncOpenAI(
        base_url=f"{up.url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as client:
        (model,) = [m.id async for m in client.models.list()]
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": "What is the capital of France?"}
        ]
        completion = await client.chat.completions.create(model=model, messages=messages, max_tokens=32)
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=32, stream=True
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        continued = await client.completions.create(model=model, prompt="The capital of France is")
    assert continued.choices[0].text.startswith(" Paris")  # the legacy API: the prompt, continued
    answer = completion.choices[0].message.content or ""
    assert "Paris" in answer
    assert streamed.strip() == answer  # greedy: the same text either way
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0
    # The same conversation was asked over /v1/requests first: the engine found all of its prompt
    # but the last token in a slot's cache, and says so in the usage.
    details = completion.usage.prompt_tokens_details
    assert details is not None
    assert details.cached_tokens == completion.usage.prompt_tokens - 1 > 0
