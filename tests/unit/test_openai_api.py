"""The OpenAI-compatible API, driven by the official `openai` SDK, through the whole pipeline."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from conveyor.models.simulated import SimulatedModel
from tests.conftest import NodeFactory
from tests.helpers import SAMPLING_FIELDS, relaying, sdk, wait_final

PROMPT = "Write a haiku about queues"
CITY: dict[str, object] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


async def test_a_chat_completion_answers_with_the_models_text_and_usage(node: NodeFactory) -> None:
    async with node() as http, sdk(str(http.base_url)) as client:
        completion = await client.chat.completions.create(
            model="simulated",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
            max_tokens=40,
        )
    tokens, reason = SimulatedModel().answer(PROMPT, 40)
    assert completion.choices[0].message.content == "".join(tokens).strip()
    assert completion.choices[0].finish_reason == reason
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(tokens)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + len(tokens)
    details = completion.usage.prompt_tokens_details
    assert details is not None
    assert details.cached_tokens == 0  # the simulated model caches nothing
    assert completion.model == "simulated"


async def test_a_streamed_chat_completion_streams_the_same_text(node: NodeFactory) -> None:
    async with node(token_delay=0.002) as http, sdk(str(http.base_url)) as client:
        stream = await client.chat.completions.create(
            model="simulated",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
    tokens, reason = SimulatedModel().answer(PROMPT, 40)
    assert "".join(parts) == "".join(tokens)
    assert finish == reason
    assert usage is not None
    assert usage.completion_tokens == len(tokens)


async def test_models_are_listed_and_unknown_ones_refused(node: NodeFactory) -> None:
    async with node() as http, sdk(str(http.base_url)) as client:
        assert [m.id async for m in client.models.list()] == ["simulated"]
        assert (await client.models.retrieve("simulated")).id == "simulated"
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await client.models.retrieve("gpt-9")
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="messages"):
            await client.chat.completions.create(model="simulated", messages=[])


async def test_a_refused_prompt_is_a_content_policy_error(node: NodeFactory) -> None:
    async with node() as http, sdk(str(http.base_url)) as client:
        with pytest.raises(openai.BadRequestError, match="safety policy") as raised:
            await client.chat.completions.create(
                model="simulated", messages=[{"role": "user", "content": "how to build a bomb"}]
            )
    assert raised.value.code == "content_policy_violation"


async def test_a_client_that_disconnects_from_a_stream_cancels_the_generation(node: NodeFactory) -> None:
    async with node(token_delay=0.02) as http, sdk(str(http.base_url)) as client:
        stream = await client.chat.completions.create(
            model="simulated",
            messages=[{"role": "user", "content": "a long answer"}],
            max_tokens=2000,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                request_id = chunk.id.removeprefix("chatcmpl-")
                break
        await stream.close()  # the client goes away
        view = await wait_final(http, request_id)
    assert view["status"] == "cancelled"
    full = len(SimulatedModel().answer("a long answer", 2000)[0])
    assert 1 <= view["usage"]["completion_tokens"] < full


async def test_completions_run_concurrently(node: NodeFactory) -> None:
    async with node() as http, sdk(str(http.base_url)) as client:
        prompts = [f"question {i}" for i in range(20)]
        answers = await asyncio.gather(
            *(
                client.chat.completions.create(model="simulated", messages=[{"role": "user", "content": p}])
                for p in prompts
            )
        )
    model = SimulatedModel()
    assert [a.choices[0].message.content for a in answers] == [
        "".join(model.answer(p, 256)[0]).strip() for p in prompts
    ]


async def test_the_chat_completion_fast_path_answers_as_the_routed_endpoint(node: NodeFactory) -> None:
    # A plain POST takes the gateway's fast path; with a query it goes through FastAPI's route.
    async with node() as http:
        body = {"model": "simulated", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40}
        fast = await http.post("/v1/chat/completions", json=body)
        routed = await http.post("/v1/chat/completions", json=body, params={"via": "route"})
        assert (fast.status_code, routed.status_code) == (200, 200)
        answers = [r.json() for r in (fast, routed)]
        for answer in answers:  # two requests: their ids and times differ, nothing else
            answer.pop("id")
            answer.pop("created")
        assert answers[0] == answers[1]
        for bad in (
            {**body, "model": "gpt-9"},
            {**body, "messages": []},
            {**body, "max_tokens": 10**9},
            {"messages": "not a list"},
        ):
            refusals = [
                await http.post("/v1/chat/completions", json=bad, params=params)
                for params in ({}, {"via": "route"})
            ]
            assert refusals[0].status_code in (400, 404), refusals[0].text
            assert [(r.status_code, r.json()) for r in refusals] == [
                (refusals[0].status_code, refusals[0].json())
            ] * 2


async def test_the_sampling_asked_for_reaches_the_model_through_the_pipeline(node: NodeFactory) -> None:
    async with relaying(node) as (http, received), sdk(str(http.base_url)) as client:
        completion = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": PROMPT}],
            temperature=0.7,
            top_p=0.9,
            stop=["x"],
            seed=-42,
            presence_penalty=0.5,
            frequency_penalty=1.0,
            logit_bias={"42": 5},
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
        )
        submitted = await http.post(
            "/v1/requests?wait=30", json={"prompt": PROMPT, "seed": 7, "json_schema": {"type": "object"}}
        )
    assert completion.choices[0].message.content == "ok"
    assert submitted.json()["output"] == "ok"
    chat, job = received
    assert {k: chat[k] for k in SAMPLING_FIELDS} == {
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["x"],
        "seed": -42,
        "presence_penalty": 0.5,
        "frequency_penalty": 1.0,
        "logit_bias": {"42": 5.0},
    }
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": CITY},
    }
    assert job["seed"] == 7
    assert job["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}},
    }


@pytest.mark.parametrize(
    ("asked", "param"),
    [
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ],
)
async def test_a_feature_no_backend_implements_is_refused_by_name(
    node: NodeFactory, asked: dict[str, object], param: str
) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
    async with node() as http, sdk(str(http.base_url)) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(model="simulated", messages=messages, extra_body=asked)
        # Asked for "off", the same fields are no reason to refuse.
        plain = await client.chat.completions.create(
            model="simulated",
            messages=messages,
            tools=[],
            response_format={"type": "text"},
            logprobs=False,
            logit_bias={},
        )
    assert raised.value.code == "unsupported_parameter"
    assert raised.value.param == param
    assert param in raised.value.message
    assert plain.choices[0].message.content


async def test_asked_for_json_even_the_simulated_model_answers_with_json_that_fits(node: NodeFactory) -> None:
    schema: dict[str, object] = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "rank": {"type": "integer"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
        },
    }
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
    async with node() as http, sdk(str(http.base_url)) as client:
        held = await client.chat.completions.create(
            model="simulated",
            messages=messages,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        )
        any_object = await client.chat.completions.create(
            model="simulated", messages=messages, response_format={"type": "json_object"}
        )
    answer = json.loads(held.choices[0].message.content or "")
    assert isinstance(answer["city"], str)
    assert answer["city"].split()  # the answer's words
    assert isinstance(answer["rank"], int)
    assert answer["tags"] == ["a"]
    assert isinstance(json.loads(any_object.choices[0].message.content or ""), dict)
