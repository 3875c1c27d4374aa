"""OpenAI's Responses API through the whole pipeline, driven by the `openai` SDK."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai.types.responses import FunctionToolParam, ResponseInputParam

from conveyor.models.simulated import SimulatedModel
from tests.conftest import NodeFactory
from tests.helpers import read_sse, relaying, sdk, turns, wait_final

PROMPT = "Write a haiku about queues"
CITY: dict[str, object] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER: FunctionToolParam = {"type": "function", "name": "get_weather", "parameters": CITY, "strict": False}


async def test_a_response_is_answered_streamed_or_not_with_its_usage(node: NodeFactory) -> None:
    async with node(token_delay=0.002) as http, sdk(str(http.base_url)) as client:
        whole = await client.responses.create(model="simulated", input=PROMPT, instructions="Be brief.")
        async with client.responses.stream(model="simulated", input=PROMPT) as stream:
            deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
            streamed = await stream.get_final_response()
        short = await client.responses.create(model="simulated", input=PROMPT, max_output_tokens=2)
    expected = "".join(SimulatedModel().answer(PROMPT, 256)[0])
    assert whole.id.startswith("resp_")
    assert (whole.status, whole.output_text) == ("completed", expected)
    assert whole.usage is not None
    assert whole.usage.output_tokens == len(SimulatedModel().answer(PROMPT, 256)[0])
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    assert len(deltas) > 1
    assert "".join(deltas) == expected
    assert (streamed.status, streamed.output_text) == ("completed", expected)
    assert (short.status, short.incomplete_details and short.incomplete_details.reason) == (
        "incomplete",
        "max_output_tokens",
    )


async def test_a_function_is_called_and_its_output_sent_back(node: NodeFactory) -> None:
    async with node() as http, sdk(str(http.base_url)) as client:
        called = await client.responses.create(
            model="simulated",
            input=PROMPT,
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"},
        )
        async with client.responses.stream(
            model="simulated", input=PROMPT, tools=[WEATHER], tool_choice="required"
        ) as stream:
            streamed = await stream.get_final_response()
        (call,) = [item for item in called.output if item.type == "function_call"]
        follow_up: ResponseInputParam = [
            {"role": "user", "content": PROMPT},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"},
        ]
        answered = await client.responses.create(model="simulated", input=follow_up, tools=[WEATHER])
    assert call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)
    (streamed_call,) = [item for item in streamed.output if item.type == "function_call"]
    assert (streamed_call.name, streamed_call.arguments) == ("get_weather", call.arguments)
    assert answered.output_text == "".join(SimulatedModel().answer(PROMPT, 256)[0])


async def test_the_conversation_reaches_an_upstream_as_chat_turns(node: NodeFactory) -> None:
    async with relaying(node) as (http, received), sdk(str(http.base_url)) as client:
        reply = await client.responses.create(
            model="m",
            instructions="Be brief.",
            input=[
                {"role": "user", "content": [{"type": "input_text", "text": PROMPT}]},
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "get_weather",
                    "arguments": '{"city": "Oslo"}',
                },
                {"type": "function_call_output", "call_id": "c1", "output": "cold"},
            ],
            tools=[WEATHER],
            max_output_tokens=16,
            text={"format": {"type": "json_schema", "name": "city", "schema": CITY}},
        )
    assert reply.output_text == "ok"
    (sent,) = received
    assert turns(sent) == [("system", "Be brief."), ("user", PROMPT), ("assistant", None), ("tool", "cold")]
    assert sent["messages"][3]["tool_call_id"] == "c1"
    assert sent["max_tokens"] == 16
    assert sent["response_format"]["json_schema"]["schema"] == CITY
    assert sent["tools"][0]["function"]["name"] == "get_weather"


async def test_a_background_response_is_queued_then_read_as_it_goes_or_cancelled(node: NodeFactory) -> None:
    async with node(token_delay=0.02) as http, sdk(str(http.base_url)) as client:
        queued = await client.responses.create(model="simulated", input=PROMPT, background=True)
        await wait_final(http, queued.id.removeprefix("resp_"))
        done = await client.responses.retrieve(queued.id)
        long = await client.responses.create(
            model="simulated", input="a long answer", background=True, max_output_tokens=2000
        )
        events = await read_sse(http, long.id.removeprefix("resp_"), stop_after=4)
        assert events[-1][1] == "token"  # it is generating
        cancelling = await client.responses.cancel(long.id)
        await wait_final(http, long.id.removeprefix("resp_"))
        cancelled = await client.responses.retrieve(long.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve("resp_no-such-response")
    assert queued.status in ("queued", "in_progress")
    assert queued.output == []
    assert (done.id, done.status, done.output_text) == (
        queued.id,
        "completed",
        "".join(SimulatedModel().answer(PROMPT, 256)[0]),
    )
    assert done.usage is not None
    assert done.usage.output_tokens > 0
    assert (cancelling.id, cancelling.status == "completed") == (long.id, False)  # as the view had it then
    assert cancelled.status == "cancelled"
    assert cancelled.usage is not None
    assert 0 < cancelled.usage.output_tokens < 2000  # what was made, billed


@pytest.mark.parametrize(
    ("asked", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"input": [{"type": "web_search_call", "id": "x"}]}, "input.0"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"background": True, "stream": True}, "stream"),
        ({"input": [{"role": "assistant", "content": "hi"}]}, "input"),
    ],
)
async def test_what_needs_state_or_is_not_built_is_refused_by_name(
    node: NodeFactory, asked: dict[str, Any], param: str
) -> None:
    async with node() as http:
        refused = await http.post("/v1/responses", json={"model": "simulated", "input": PROMPT, **asked})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == param
