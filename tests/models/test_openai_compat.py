"""The OpenAI-compatible upstream backend against a real server: llama-cpp-python's, on the same GGUF."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from conveyor.embedded import free_port, terminate
from conveyor.errors import PermanentError, UnavailableError
from conveyor.models.base import GenerationRequest
from conveyor.models.local import shipped_gguf
from conveyor.models.openai_compat import OpenAICompatModel, _usage
from conveyor.models.simulated import SimulatedModel
from conveyor.testing import UpProcess
from tests.conftest import NodeFactory
from tests.helpers import sdk, submit, upstream, wait_final

pytestmark = pytest.mark.model

PROMPT = "Write a haiku about queues"
CITY: dict[str, object] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@contextlib.contextmanager
def llama_server(*options: str) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on the local model's GGUF; its /v1 URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(shipped_gguf()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "1024",
            "--verbose",
            "false",
            *options,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    started = threading.Event()

    def watch_output() -> None:  # uvicorn says when it listens; keep draining so the pipe never fills
        assert process.stdout is not None
        for line in process.stdout:
            if b"Uvicorn running on" in line:
                started.set()
        started.set()  # exited: let the fixture fail with a clear message

    threading.Thread(target=watch_output, daemon=True).start()
    try:
        assert started.wait(60), "llama_cpp.server did not start within 60 s"
        assert process.poll() is None, "llama_cpp.server exited"
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        terminate(process.pid, grace=5)
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with llama_server() as url:
        yield url


async def collect(model: OpenAICompatModel, request: GenerationRequest) -> tuple[str, str | None]:
    text, finish = [], None
    async for token in model.generate([request]):
        if token.error is not None:
            raise token.error
        text.append(token.text)
        finish = token.finish_reason or finish
    return "".join(text), finish


async def servers_own(server: str, prompt: str, max_tokens: int) -> tuple[str, str]:
    """The server's own greedy answer to ``prompt`` (text, finish reason), asked without Conveyor.
    What a model of 135M parameters answers changes with llama.cpp's versions (0.3.36 no longer
    says Paris): the tests compare with the server, not with a fact."""
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.post(
            f"{server}/chat/completions",
            json={
                "model": "smollm2",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
    choice = answer.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


async def test_it_streams_a_real_answer_and_honours_max_tokens(server: str) -> None:
    model = OpenAICompatModel(base_url=server, model="smollm2")
    try:
        own = await servers_own(server, "What is the capital of France?", 32)
        text, finish = await collect(
            model, GenerationRequest(id="a", prompt="What is the capital of France?", max_tokens=32)
        )
        assert (text, finish) == own  # streamed through the backend, token by token
        assert "France" in text  # and English about the question
        _, finish = await collect(
            model, GenerationRequest(id="b", prompt="Tell me a long story.", max_tokens=4)
        )
        assert finish == "length"
    finally:
        await model.close()


async def test_a_refusal_is_permanent_and_carries_the_servers_reason(node: NodeFactory) -> None:
    # Conveyor's own gateway is an OpenAI-compatible server too, and refuses unknown models (404).
    async with node() as http:
        model = OpenAICompatModel(base_url=f"{str(http.base_url).rstrip('/')}/v1", model="no-such-model")
        try:
            with pytest.raises(
                PermanentError, match="answered 404: the model 'no-such-model' does not exist"
            ):
                await collect(model, GenerationRequest(id="c", prompt="hi", max_tokens=4))
        finally:
            await model.close()


async def test_the_servers_own_token_counts_are_passed_on(node: NodeFactory) -> None:
    # Conveyor's gateway sends usage in a last chunk when asked (stream_options.include_usage).
    async with node() as http:
        model = OpenAICompatModel(base_url=f"{str(http.base_url).rstrip('/')}/v1", model="simulated")
        try:
            tokens = [
                t async for t in model.generate([GenerationRequest(id="u", prompt=PROMPT, max_tokens=40)])
            ]
        finally:
            await model.close()
    expected, _ = SimulatedModel().answer(PROMPT, 40)
    assert tokens[-1].usage is not None
    assert tokens[-1].usage.completion_tokens == len(expected)  # the server's count, not the chunks'
    assert tokens[-1].usage.prompt_tokens > 0


def test_malformed_upstream_counts_are_ignored_not_fatal() -> None:
    counts = {"prompt_tokens": 12, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 8}}
    usage = _usage(counts)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (12, 5, 8)
    assert _usage({"prompt_tokens": "many"}) is None
    assert _usage(["not", "an", "object"]) is None
    assert _usage({"prompt_tokens_details": "none"}) is None


async def test_an_unreachable_server_is_retryable() -> None:
    model = OpenAICompatModel(base_url=f"http://127.0.0.1:{free_port()}/v1", model="x")
    try:
        with pytest.raises(UnavailableError, match="unreachable"):
            await collect(model, GenerationRequest(id="d", prompt="hi", max_tokens=4))
    finally:
        await model.close()


async def test_tool_calls_logprobs_and_text_completions_pass_through_to_a_real_server(
    server: str, node: NodeFactory
) -> None:
    tools: list[ChatCompletionToolParam] = [
        {"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
    ]
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    asked: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]
    async with node(settings=upstream(server, "smollm2")) as http, sdk(str(http.base_url)) as client:
        called = await client.chat.completions.create(
            model="smollm2", messages=asked, tools=tools, tool_choice=named
        )
        # The server streams the call in pieces (repeating its name in each): it comes back whole.
        streamed = await client.chat.completions.create(
            model="smollm2", messages=asked, tools=tools, tool_choice=named, stream=True
        )
        deltas = [
            d async for chunk in streamed if chunk.choices for d in chunk.choices[0].delta.tool_calls or []
        ]
        weighed = await client.chat.completions.create(
            model="smollm2", messages=asked, max_tokens=8, logprobs=True, top_logprobs=2
        )
        continued = await client.completions.create(
            model="smollm2", prompt="The capital of France is", max_tokens=4, logprobs=2
        )
    (call,) = called.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert "Paris" in json.loads(call.function.arguments)["city"]
    assert called.choices[0].finish_reason == "tool_calls"
    assert [(d.function.name, json.loads(d.function.arguments or "")) for d in deltas if d.function] == [
        ("get_weather", json.loads(call.function.arguments))
    ]
    content = weighed.choices[0].logprobs and weighed.choices[0].logprobs.content
    assert content
    assert "".join(e.token for e in content) == weighed.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 for e in content)
    assert continued.choices[0].text.startswith(" Paris")
    legacy = continued.choices[0].logprobs
    assert legacy is not None
    assert legacy.tokens is not None
    assert "".join(legacy.tokens) == continued.choices[0].text


async def test_conveyor_up_serves_an_upstream_model_through_the_pipeline(server: str, tmp_path: Path) -> None:
    up = UpProcess(
        tmp_path / "data", "--model", "openai", "--upstream-url", server, "--upstream-model", "smollm2"
    )
    try:
        up.start(timeout=60)
        own, _ = await servers_own(server, "What is the capital of France?", 32)
        async with httpx.AsyncClient(base_url=up.url, timeout=60) as client:
            view = await wait_final(
                client, await submit(client, "What is the capital of France?", max_tokens=32)
            )
        assert view["status"] == "completed"
        assert view["output"] == own.strip()
        assert view["model"] == "smollm2"
    finally:
        if up.process is not None:
            up.stop()
        up.cleanup()


async def test_embeddings_come_from_the_upstream_through_the_pipeline(node: NodeFactory) -> None:
    texts = ["The cat sat on the mat.", "A cat was sitting on a rug.", "Quarterly revenue grew 4 percent."]
    with llama_server("--embedding", "true") as url:
        direct = OpenAICompatModel(base_url=url, model="smollm2")
        try:
            made = await direct.embed(texts)
        finally:
            await direct.close()
        assert [len(e.vector) for e in made] == [576] * 3
        assert all(e.tokens > 0 for e in made)
        async with node(settings=upstream(url, "smollm2")) as http, sdk(str(http.base_url)) as client:
            answer = await client.embeddings.create(model="smollm2", input=texts, encoding_format="float")
    vectors = [d.embedding for d in answer.data]
    # The pipeline's answer is the server's own, in order.
    for got, want in zip(vectors, (e.vector for e in made), strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert answer.usage.prompt_tokens == sum(e.tokens for e in made)
    assert len({tuple(v) for v in vectors}) == 3
