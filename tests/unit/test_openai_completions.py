"""The legacy text completions API (`POST /v1/completions`) through the whole pipeline, driven by the
`openai` SDK."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.models.simulated import SimulatedModel
from tests.conftest import NodeFactory
from tests.helpers import recording_upstream, sdk, streaming_upstream, upstream

PROMPT = "In the beginning"


async def test_a_text_completion_continues_the_prompt_streamed_or_not(node: NodeFactory) -> None:
    async with node(token_delay=0.002) as http, sdk(str(http.base_url)) as client:
        whole = await client.completions.create(model="simulated", prompt=PROMPT, logprobs=2)
        stream = await client.completions.create(
            model="simulated", prompt=[PROMPT], stream=True, stream_options={"include_usage": True}
        )
        texts, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.choices:
                texts.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        longer = await client.completions.create(model="simulated", prompt=PROMPT, max_tokens=100)
    tokens, _ = SimulatedModel().answer(PROMPT, 100)
    assert len(tokens) > 16  # so that the legacy default of 16 tokens cuts it
    assert whole.id.startswith("cmpl-")
    assert whole.object == "text_completion"
    choice = whole.choices[0]
    assert (choice.text, choice.finish_reason) == ("".join(tokens[:16]), "length")
    assert "".join(texts) == choice.text
    assert finish == "length"
    assert usage is not None
    assert usage.completion_tokens == 16
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 16
    assert (longer.choices[0].text, longer.choices[0].finish_reason) == ("".join(tokens), "stop")
    # Logprobs as the legacy API writes them: parallel lists, each token's place in the text.
    logprobs = choice.logprobs
    assert logprobs is not None
    assert logprobs.tokens == tokens[:16]
    assert logprobs.text_offset == [len("".join(tokens[:i])) for i in range(16)]
    assert logprobs.token_logprobs is not None
    assert all(lp < 0 for lp in logprobs.token_logprobs)
    assert logprobs.top_logprobs is not None
    assert [len(top) for top in logprobs.top_logprobs] == [2] * 16


@pytest.mark.parametrize(
    ("asked", "param", "code"),
    [
        ({"echo": True}, "echo", "unsupported_parameter"),
        ({"best_of": 3}, "best_of", "unsupported_parameter"),
        ({"suffix": "The end."}, "suffix", "unsupported_parameter"),
        ({"prompt": ["one", "two"]}, "body", "invalid_request"),
        ({"prompt": ""}, "body", "invalid_request"),
        ({"prompt": 42}, "prompt.str", "invalid_request"),
    ],
)
async def test_what_the_legacy_api_cannot_do_here_is_refused_by_name(
    node: NodeFactory, asked: dict[str, Any], param: str, code: str
) -> None:
    async with node() as http:
        refused = await http.post("/v1/completions", json={"model": "simulated", "prompt": PROMPT, **asked})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"] or "body") == (code, param), error


async def test_an_upstream_gets_a_text_completion_and_its_answer_comes_back(node: NodeFactory) -> None:
    choices = [
        {"index": 0, "text": text, "finish_reason": finish}
        | {"logprobs": {"tokens": [text], "token_logprobs": [-0.5], "top_logprobs": [{text: -0.5}]}}
        for text, finish in ((" there", None), (" was a queue.", "stop"))
    ]
    async with recording_upstream() as (recorder, received), streaming_upstream(choices) as url:
        async with node(settings=upstream(recorder)) as http, sdk(str(http.base_url)) as client:
            recorded = await client.completions.create(model="m", prompt=PROMPT, logprobs=1, stop=["."])
        async with node(settings=upstream(url)) as http, sdk(str(http.base_url)) as client:
            completion = await client.completions.create(model="m", prompt=PROMPT, logprobs=1)
    (sent,) = received
    assert "messages" not in sent
    assert (sent["prompt"], sent["max_tokens"], sent["logprobs"], sent["stop"]) == (PROMPT, 16, 1, ["."])
    assert recorded.choices[0].text == "ok"
    assert completion.choices[0].text == " there was a queue."  # as it came: not stripped
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == [" there", " was a queue."]
    assert logprobs.text_offset == [0, len(" there")]
