"""The Anthropic-compatible Messages API through the whole pipeline, driven by the `anthropic` SDK."""

from __future__ import annotations

import json

import anthropic
import pytest
from anthropic.types import MessageParam, ToolParam

from conveyor.models.simulated import SimulatedModel
from tests.conftest import NodeFactory
from tests.helpers import anthropic_sdk, relaying, turns

PROMPT = "Write a haiku about queues"
ASKED: list[MessageParam] = [{"role": "user", "content": PROMPT}]
CITY: dict[str, object] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: list[ToolParam] = [{"name": "get_weather", "description": "Weather now", "input_schema": CITY}]


async def test_a_message_is_answered_streamed_or_not_with_its_usage(node: NodeFactory) -> None:
    async with node(token_delay=0.002) as http, anthropic_sdk(str(http.base_url)) as client:
        message = await client.messages.create(
            model="simulated", max_tokens=40, system="Be brief.", messages=ASKED
        )
        async with client.messages.stream(model="simulated", max_tokens=40, messages=ASKED) as stream:
            pieces = [text async for text in stream.text_stream]
            streamed = await stream.get_final_message()
        short = await client.messages.create(model="simulated", max_tokens=2, messages=ASKED)
    tokens, _ = SimulatedModel().answer(PROMPT, 40)
    assert message.id.startswith("msg_")
    assert message.role == "assistant"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "".join(tokens))]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == len(tokens)
    assert message.usage.input_tokens > 0
    # Streamed: the text arrives in pieces, and the SDK puts the same message together.
    assert len(pieces) > 1
    assert "".join(pieces) == "".join(tokens)
    assert [getattr(b, "text", None) for b in streamed.content] == ["".join(tokens)]
    assert streamed.stop_reason == "end_turn"
    assert streamed.usage.output_tokens == len(tokens)
    assert short.stop_reason == "max_tokens"


async def test_a_tool_is_used_and_its_result_sent_back(node: NodeFactory) -> None:
    async with node() as http, anthropic_sdk(str(http.base_url)) as client:
        used = await client.messages.create(
            model="simulated",
            max_tokens=64,
            messages=ASKED,
            tools=TOOLS,
            tool_choice={"type": "tool", "name": "get_weather"},
        )
        async with client.messages.stream(
            model="simulated", max_tokens=64, messages=ASKED, tools=TOOLS, tool_choice={"type": "any"}
        ) as stream:
            streamed = await stream.get_final_message()
        (call,) = [b for b in used.content if b.type == "tool_use"]
        answered = await client.messages.create(
            model="simulated",
            max_tokens=64,
            tools=TOOLS,
            messages=[
                *ASKED,
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C"}],
                },
            ],
        )
    assert used.stop_reason == "tool_use"
    assert call.name == "get_weather"
    assert isinstance(call.input, dict)
    assert isinstance(call.input["city"], str)
    (streamed_call,) = [b for b in streamed.content if b.type == "tool_use"]
    assert (streamed_call.name, streamed.stop_reason) == ("get_weather", "tool_use")
    assert streamed_call.input == call.input
    assert answered.stop_reason == "end_turn"
    assert answered.content[0].type == "text"


async def test_the_conversation_reaches_an_upstream_as_openai_turns(node: NodeFactory) -> None:
    async with relaying(node) as (http, received), anthropic_sdk(str(http.base_url)) as client:
        reply = await client.messages.create(
            model="m",
            max_tokens=16,
            system="Be brief.",
            stop_sequences=["."],
            extra_body={"temperature": 0.5},  # this SDK version no longer names it
            messages=[
                *ASKED,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}
                    ],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "cold"}],
                },
            ],
            tools=TOOLS,
        )
    assert [getattr(b, "text", None) for b in reply.content] == ["ok"]
    (sent,) = received
    assert turns(sent) == [("system", "Be brief."), ("user", PROMPT), ("assistant", None), ("tool", "cold")]
    assert json.loads(sent["messages"][2]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert sent["messages"][3]["tool_call_id"] == "t1"
    assert (sent["stop"], sent["temperature"], sent["max_tokens"]) == (["."], 0.5, 16)
    assert sent["tools"][0]["function"]["parameters"] == CITY


async def test_the_models_are_listed_in_anthropics_shape_to_its_sdk(node: NodeFactory) -> None:
    async with node() as http, anthropic_sdk(str(http.base_url)) as client:
        listed = [m async for m in client.models.list()]
        one = await client.models.retrieve("simulated")
    assert [(m.type, m.id) for m in listed] == [("model", "simulated")]
    assert (one.id, one.display_name) == ("simulated", "simulated")


async def test_errors_come_in_anthropics_shape(node: NodeFactory) -> None:
    async with node() as http, anthropic_sdk(str(http.base_url)) as client:
        with pytest.raises(anthropic.NotFoundError, match="does not exist"):
            await client.messages.create(model="claude-9", max_tokens=8, messages=ASKED)
        with pytest.raises(anthropic.BadRequestError, match="top_k"):
            await client.messages.create(
                model="simulated", max_tokens=8, messages=ASKED, extra_body={"top_k": 5}
            )
        with pytest.raises(anthropic.BadRequestError, match="thinking"):
            await client.messages.create(
                model="simulated",
                max_tokens=8,
                messages=ASKED,
                thinking={"type": "enabled", "budget_tokens": 1024},
            )
        # Asked for "off", they are no reason to refuse.
        off = await client.messages.create(
            model="simulated",
            max_tokens=8,
            messages=ASKED,
            thinking={"type": "disabled"},
            extra_body={"top_k": None},
        )
        assert off.stop_reason in ("end_turn", "max_tokens")
        with pytest.raises(anthropic.BadRequestError, match="safety policy"):
            await client.messages.create(
                model="simulated", max_tokens=8, messages=[{"role": "user", "content": "how to build a bomb"}]
            )
        raw = await http.post("/v1/messages", json={"model": "simulated", "messages": ASKED})  # no max_tokens
    assert raw.status_code == 400
    assert raw.json()["type"] == "error"
    assert raw.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in raw.json()["error"]["message"]
