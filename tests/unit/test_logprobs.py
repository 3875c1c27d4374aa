"""Token log probabilities through the whole pipeline: the OpenAI API (streamed and not), the job
API's events and view, and an upstream's passed through."""

from __future__ import annotations

import math
from typing import Any

from openai.types.chat import ChatCompletionMessageParam

from conveyor.models.simulated import SimulatedModel
from tests.conftest import NodeFactory
from tests.helpers import (
    read_sse,
    recording_upstream,
    sdk,
    streamed_text,
    streaming_upstream,
    submit,
    upstream,
    wait_final,
)

PROMPT = "Write a haiku about queues"
ASKED: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]


async def test_each_token_comes_with_its_logprob_and_alternatives_streamed_or_not(node: NodeFactory) -> None:
    async with node(token_delay=0.002) as http, sdk(str(http.base_url)) as client:
        whole = await client.chat.completions.create(
            model="simulated", messages=ASKED, logprobs=True, top_logprobs=3
        )
        stream = await client.chat.completions.create(
            model="simulated", messages=ASKED, logprobs=True, top_logprobs=3, stream=True
        )
        pieces: list[tuple[str, list[str]]] = []
        async for chunk in stream:
            choice = chunk.choices[0]
            if choice.delta.content:
                assert choice.logprobs is not None
                pieces.append((choice.delta.content, [e.token for e in choice.logprobs.content or []]))
        plain = await client.chat.completions.create(model="simulated", messages=ASKED)
    tokens, _ = SimulatedModel().answer(PROMPT, 256)
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None
    content = logprobs.content or []
    assert [e.token for e in content] == tokens
    for entry in content:
        assert entry.logprob < 0
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # the simulated model's token is its likeliest
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1
    # Streamed, each piece of text comes with the logprobs of its own tokens.
    assert ["".join(tokens) for _, tokens in pieces] == [text for text, _ in pieces]
    assert [t for _, ts in pieces for t in ts] == tokens
    assert plain.choices[0].logprobs is None  # not asked for, not sent


async def test_the_job_api_streams_logprobs_in_token_events_and_keeps_them_in_the_view(
    node: NodeFactory,
) -> None:
    async with node() as http:
        rid = await submit(http, PROMPT, logprobs=0)
        events = await read_sse(http, rid)
        view = await wait_final(http, rid)
    weighed = [e for _, kind, data in events if kind == "token" for e in data["logprobs"]]
    assert "".join(e["token"] for e in weighed) == streamed_text(events)
    assert all(e["top_logprobs"] == [] for e in weighed)  # none asked for
    assert [e["token"] for e in view["logprobs"]] == [e["token"] for e in weighed]
    assert len(view["logprobs"]) == view["usage"]["completion_tokens"]


async def test_top_logprobs_without_logprobs_is_refused(node: NodeFactory) -> None:
    async with node() as http:
        refused = await http.post(
            "/v1/chat/completions", json={"model": "simulated", "messages": ASKED, "top_logprobs": 2}
        )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "top_logprobs"


async def test_an_upstream_is_asked_for_logprobs_and_its_own_reach_the_client(node: NodeFactory) -> None:
    def weighed(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}

    choices = [
        {
            "index": 0,
            "delta": {"content": text},
            "finish_reason": finish,
            "logprobs": {"content": [weighed(text, lp)]},
        }
        for text, lp, finish in (("Hi", -0.25, None), (" there", -1.5, "stop"))
    ]
    async with recording_upstream() as (recorder, received), streaming_upstream(choices) as url:
        async with node(settings=upstream(recorder)) as http, sdk(str(http.base_url)) as client:
            await client.chat.completions.create(model="m", messages=ASKED, logprobs=True, top_logprobs=2)
        async with node(settings=upstream(url)) as http, sdk(str(http.base_url)) as client:
            completion = await client.chat.completions.create(model="m", messages=ASKED, logprobs=True)
    assert (received[0]["logprobs"], received[0]["top_logprobs"]) == (True, 2)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert [(e.token, e.logprob) for e in logprobs.content or []] == [("Hi", -0.25), (" there", -1.5)]
