"""Several choices (``n``) in one completion: one request each, through the whole pipeline."""

from __future__ import annotations

import collections

import pytest
from openai.types.chat import ChatCompletionMessageParam

from conveyor.models.simulated import SimulatedModel
from tests.conftest import NodeFactory
from tests.helpers import relaying, sdk

PROMPT = "Write a haiku about queues"
ASKED: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]


async def test_each_choice_is_answered_and_billed_streamed_or_not(node: NodeFactory) -> None:
    async with node(token_delay=0.002) as http, sdk(str(http.base_url)) as client:
        one = await client.chat.completions.create(model="simulated", messages=ASKED)
        three = await client.chat.completions.create(model="simulated", messages=ASKED, n=3, temperature=0.8)
        stream = await client.chat.completions.create(
            model="simulated", messages=ASKED, n=3, stream=True, stream_options={"include_usage": True}
        )
        texts: dict[int, str] = collections.defaultdict(str)
        finishes, usages, ids = {}, [], set()
        async for chunk in stream:
            ids.add(chunk.id)
            usages += [chunk.usage] if chunk.usage else []
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
        text = await client.completions.create(model="simulated", prompt=PROMPT, n=2)
    expected = "".join(SimulatedModel().answer(PROMPT, 256)[0])
    assert [(c.index, c.message.content) for c in three.choices] == [(i, expected) for i in range(3)]
    assert three.usage is not None
    assert one.usage is not None
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens  # three generations
    assert three.usage.prompt_tokens == 3 * one.usage.prompt_tokens  # each read the prompt
    # Streamed: every choice's text under its index, one id, one usage for all at the end.
    assert dict(texts) == dict.fromkeys(range(3), expected)
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    assert len(ids) == 1
    assert [u.completion_tokens for u in usages] == [3 * one.usage.completion_tokens]
    assert [c.index for c in text.choices] == [0, 1]


async def test_a_seed_gives_each_choice_its_own_reproducible_draws(node: NodeFactory) -> None:
    async with relaying(node) as (http, received), sdk(str(http.base_url)) as client:
        answer = await client.chat.completions.create(model="m", messages=ASKED, n=3, seed=7, temperature=1.0)
    assert [c.message.content for c in answer.choices] == ["ok"] * 3
    assert sorted(body["seed"] for body in received) == [7, 8, 9]


@pytest.mark.parametrize("n", [0, 17])
async def test_a_number_of_choices_out_of_bounds_is_refused(node: NodeFactory, n: int) -> None:
    async with node() as http:
        refused = await http.post(
            "/v1/chat/completions", json={"model": "simulated", "messages": ASKED, "n": n}
        )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "n"
