"""Tool calling for models without their own (conveyor.models.tools), over a scripted model."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence

from conveyor.models.base import GenerationRequest, ModelInfo, Token
from conveyor.models.simulated import SimulatedModel
from conveyor.models.tools import PromptedTools
from conveyor.payloads import ChatMessage, Tool, ToolCall

WEATHER = Tool(
    name="get_weather",
    description="The weather in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = Tool(name="get_time", parameters={"type": "object", "properties": {"zone": {"type": "string"}}})


class Scripted:
    """Answers every request with ``pieces``; records the requests it was given and, with each
    token it gives, what its reader had passed on by then."""

    info = ModelInfo(name="scripted", version="1", license="none")

    def __init__(self, *pieces: str) -> None:
        self.pieces = pieces
        self.given: list[GenerationRequest] = []
        self.passed: list[int] = []  # tokens the reader had passed on before each piece was made
        self.out: list[Token] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        self.given.extend(requests)
        for request in requests:
            for i, piece in enumerate(self.pieces):
                self.passed.append(len(self.out))
                yield Token(request.id, piece, "stop" if i == len(self.pieces) - 1 else None)

    async def close(self) -> None:
        return None


async def answer(model: PromptedTools, request: GenerationRequest, sink: list[Token]) -> list[Token]:
    async for token in model.generate([request]):
        sink.append(token)
    return sink


def asking(**fields: object) -> GenerationRequest:
    return GenerationRequest(id="r1", prompt="Weather in Paris?", max_tokens=64, **fields)  # type: ignore[arg-type]


async def test_an_answer_that_is_a_call_of_an_offered_tool_comes_as_that_call_and_no_text() -> None:
    inner = Scripted(' {"name": "get_weather",', ' "arguments": {"city":', ' "Paris"}}')
    out = await answer(PromptedTools(inner), asking(tools=(WEATHER, TIME)), inner.out)
    assert len(out) == 1
    (last,) = out
    assert last.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in last.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert last.tool_calls[0].id.startswith("call_")
    # The model was told of both tools in a system turn before the question.
    (given,) = inner.given
    assert given.messages[0].role == "system"
    assert "get_weather" in given.messages[0].content
    assert "get_time" in given.messages[0].content
    assert given.messages[-1] == ChatMessage(role="user", content="Weather in Paris?")
    assert given.json_schema is None  # "auto": the model may answer in text


async def test_a_text_answer_streams_as_it_comes_when_the_model_may_choose() -> None:
    inner = Scripted("It is", " sunny", " today.")
    out = await answer(PromptedTools(inner), asking(tools=(WEATHER,)), inner.out)
    assert "".join(t.text for t in out) == "It is sunny today."
    assert out[-1].finish_reason == "stop"
    assert not out[-1].tool_calls
    # The first piece was passed on before the model made the second: nothing held back.
    assert inner.passed[1] == 1


async def test_json_that_is_no_call_of_an_offered_tool_is_text() -> None:
    for answered in (
        '{"name": "delete_all", "arguments": {}}',
        '{"city": "Paris"}',
        '{"name": "get_weather"',
    ):
        inner = Scripted(answered)
        out = await answer(PromptedTools(inner), asking(tools=(WEATHER,)), inner.out)
        assert [(t.text, t.finish_reason, t.tool_calls) for t in out] == [(answered, "stop", ())]


async def test_a_required_call_holds_the_model_to_the_shape_of_a_call_of_the_named_tool() -> None:
    inner = Scripted('{"name": "get_time", "arguments": {"zone": "UTC"}}')
    out = await answer(
        PromptedTools(inner),
        asking(tools=(WEATHER, TIME), tool_choice="required", tool_name="get_time"),
        inner.out,
    )
    assert [c.name for c in out[-1].tool_calls] == ["get_time"]
    schema = inner.given[0].json_schema
    assert schema is not None
    assert schema["properties"]["name"] == {"const": "get_time"}
    assert schema["properties"]["arguments"] == TIME.parameters
    assert "Call get_time." in inner.given[0].messages[0].content


async def test_the_simulated_model_makes_a_required_call_with_arguments_that_fit() -> None:
    model = PromptedTools(SimulatedModel())
    out = await answer(model, asking(tools=(WEATHER, TIME), tool_choice="required"), [])
    (call,) = out[-1].tool_calls
    assert call.name in ("get_weather", "get_time")
    arguments = json.loads(call.arguments)
    assert isinstance(arguments, dict)
    assert all(isinstance(v, str) for v in arguments.values())


async def test_earlier_calls_and_their_results_are_written_into_the_conversation() -> None:
    call = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    conversation = (
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(role="assistant", tool_calls=[call]),
        ChatMessage(role="tool", content="18 C, sunny", tool_call_id="call_1"),
    )
    inner = Scripted("Sunny, 18 C.")
    out = await answer(PromptedTools(inner), asking(tools=(WEATHER,), messages=conversation), inner.out)
    assert "".join(t.text for t in out) == "Sunny, 18 C."
    told = inner.given[0].messages
    assert [m.role for m in told] == ["system", "user", "assistant", "tool"]
    assert told[0].content.startswith("Be brief.\n\n")
    assert "get_weather" in told[0].content
    assert json.loads(told[2].content) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert told[3].content == "18 C, sunny"


async def test_without_tools_or_with_tool_choice_none_the_request_reaches_the_model_untouched() -> None:
    for request in (asking(), asking(tools=(WEATHER,), tool_choice="none")):
        inner = Scripted('{"name": "get_weather", "arguments": {"city": "Paris"}}')
        out = await answer(PromptedTools(inner), request, inner.out)
        assert inner.given == [request]
        assert not out[-1].tool_calls
