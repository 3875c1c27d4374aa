"""The upstream backend's failures and cancellation, against a scripted OpenAI-compatible server
(the real one, llama-cpp-python's, is in tests/models/test_openai_compat.py)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web

from conveyor.errors import PermanentError, RetryableError
from conveyor.models.base import GenerationRequest
from conveyor.models.openai_compat import OpenAICompatModel
from tests.helpers import SAMPLING_FIELDS, recording_upstream, scripted_upstream


async def first_failure(url: str) -> Exception | None:
    model = OpenAICompatModel(base_url=url, model="m")
    try:
        async for token in model.generate([GenerationRequest(id="r", prompt="hi", max_tokens=4)]):
            if token.error is not None:
                return token.error
        return None
    finally:
        await model.close()


@pytest.mark.parametrize(
    ("status", "kind"),
    [(429, RetryableError), (503, RetryableError), (400, PermanentError), (401, PermanentError)],
)
async def test_a_refusal_is_retryable_only_when_the_server_may_take_it_later(
    status: int, kind: type[Exception]
) -> None:
    async def refuse(_: web.Request) -> web.Response:
        body = {"error": {"message": f"refused with {status}", "type": "test"}}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

    async with scripted_upstream(refuse) as url:
        failure = await first_failure(url)
    assert isinstance(failure, kind)
    assert f"model server answered {status}: refused with {status}" in str(failure)


async def test_a_cancelled_request_closes_its_stream_so_the_server_stops_too() -> None:
    hung_up = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:  # until the client goes away: a write fails, or the server cancels this
                await response.write(b'data: {"choices": [{"delta": {"content": "tok "}}]}\n\n')
                await asyncio.sleep(0.01)
        finally:
            hung_up.set()

    async with scripted_upstream(endless) as url:
        model = OpenAICompatModel(base_url=url, model="m")
        request = GenerationRequest(id="r", prompt="hi", max_tokens=1000)
        finish = None
        try:
            async with asyncio.timeout(10):
                async for token in model.generate([request]):
                    if token.text:
                        request.cancelled.set()
                    finish = token.finish_reason or finish
                await hung_up.wait()
        finally:
            await model.close()
    assert finish == "cancelled"


async def test_the_sampling_of_a_request_reaches_the_server() -> None:
    sampled = GenerationRequest(
        id="r",
        prompt="hi",
        max_tokens=4,
        temperature=0.7,
        top_p=0.9,
        stop=("x",),
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias=((7, -100.0),),
    )
    async with recording_upstream() as (url, received):
        model = OpenAICompatModel(base_url=url, model="m")
        try:
            texts = [
                t.text
                async for t in model.generate([sampled, GenerationRequest(id="g", prompt="hi", max_tokens=4)])
            ]
        finally:
            await model.close()
    assert "".join(texts) == "okok"
    by_seed = {body.get("seed"): body for body in received}
    assert {k: by_seed[42][k] for k in SAMPLING_FIELDS} == {
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["x"],
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"7": -100.0},
    }
    # A request without a seed or penalties sends none: the server's defaults hold.
    assert not {"seed", "presence_penalty", "frequency_penalty", "logit_bias"} & set(by_seed[None])
