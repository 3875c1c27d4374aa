"""Tool calling through the OpenAI-compatible API and the whole pipeline, driven by the `openai` SDK."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from conveyor.models.simulated import SimulatedModel
from tests.conftest import NodeFactory
from tests.helpers import relaying, sdk, streaming_upstream, upstream

PROMPT = "What is the weather in Paris?"
CITY: dict[str, object] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": CITY},
    },
]
ASKED: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]


async def test_a_required_call_of_a_named_tool_comes_back_as_that_call_streamed_or_not(
    node: NodeFactory,
) -> None:
    choice: Any = {"type": "function", "function": {"name": "get_weather"}}
    async with node() as http, sdk(str(http.base_url)) as client:
        completion = await client.chat.completions.create(
            model="simulated", messages=ASKED, tools=TOOLS, tool_choice=choice
        )
        stream = await client.chat.completions.create(
            model="simulated", messages=ASKED, tools=TOOLS, tool_choice=choice, stream=True
        )
        deltas, finish, content = [], None, ""
        async for chunk in stream:
            delta = chunk.choices[0].delta
            deltas += delta.tool_calls or []
            content += delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        status = await http.get(f"/v1/requests/{completion.id.removeprefix('chatcmpl-')}")
    choice0 = completion.choices[0]
    assert choice0.finish_reason == "tool_calls"
    assert choice0.message.content is None
    (call,) = choice0.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    # Streamed: one delta with the whole call, then the finish reason; no text.
    assert finish == "tool_calls"
    assert content == ""
    assert [(d.index, d.function.name if d.function else None) for d in deltas] == [(0, "get_weather")]
    assert deltas[0].function is not None
    assert json.loads(deltas[0].function.arguments or "") == json.loads(call.function.arguments)
    # The job API's view of the same request shows the call.
    view = status.json()
    assert view["finish_reason"] == "tool_calls"
    assert [c["name"] for c in view["tool_calls"]] == ["get_weather"]


async def test_a_model_free_to_choose_may_answer_in_text_and_a_tool_result_can_be_sent_back(
    node: NodeFactory,
) -> None:
    async with node() as http, sdk(str(http.base_url)) as client:
        free = await client.chat.completions.create(model="simulated", messages=ASKED, tools=TOOLS)
        follow_up = await client.chat.completions.create(
            model="simulated",
            tools=TOOLS,
            messages=[
                *ASKED,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
            ],
        )
    # The simulated model answers the last user message in words: text, not a call.
    expected = "".join(SimulatedModel().answer(PROMPT, 256)[0]).strip()
    assert (free.choices[0].finish_reason, free.choices[0].message.content) == ("stop", expected)
    assert free.choices[0].message.tool_calls is None
    assert follow_up.choices[0].message.content == expected


async def test_tools_calls_and_results_reach_an_upstream_as_they_came(node: NodeFactory) -> None:
    history: list[ChatCompletionMessageParam] = [
        *ASKED,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_9", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_9", "content": "noon"},
    ]
    async with relaying(node) as (http, received), sdk(str(http.base_url)) as client:
        await client.chat.completions.create(model="m", messages=history, tools=TOOLS, tool_choice="required")
        await client.chat.completions.create(
            model="m",
            messages=ASKED,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    first, named = received
    assert first["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "description": "",
                "parameters": {"type": "object", "properties": {}},
            },
        },
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather now", "parameters": CITY},
        },
    ]
    assert first["tool_choice"] == "required"
    assert first["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_9", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "noon", "tool_call_id": "call_9"},
    ]
    assert named["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}


async def test_an_upstreams_call_streamed_in_pieces_comes_back_whole(node: NodeFactory) -> None:
    pieces = [
        {
            "tool_calls": [
                {"index": 0, "id": "call_up", "type": "function", "function": {"name": "get_weather"}}
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]},
    ]

    choices = [
        {"index": 0, "delta": delta, "finish_reason": "tool_calls" if i == len(pieces) - 1 else None}
        for i, delta in enumerate(pieces)
    ]
    async with (
        streaming_upstream(choices) as url,
        node(settings=upstream(url)) as http,
        sdk(str(http.base_url)) as client,
    ):
        completion = await client.chat.completions.create(model="m", messages=ASKED, tools=TOOLS)
    assert completion.choices[0].finish_reason == "tool_calls"
    (call,) = completion.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert (call.id, call.function.name, call.function.arguments) == (
        "call_up",
        "get_weather",
        '{"city": "Oslo"}',
    )


@pytest.mark.parametrize(
    ("asked", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
        ({"messages": [*ASKED, {"role": "tool", "content": "noon"}]}, "messages.1"),
        ({"messages": [*ASKED, {"role": "assistant"}]}, "messages.1"),
    ],
)
async def test_malformed_tool_calling_is_refused_with_the_field_at_fault(
    node: NodeFactory, asked: dict[str, Any], param: str
) -> None:
    body = {"model": "simulated", "messages": ASKED, **asked}
    async with node() as http:
        refused = await http.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
