"""Shared helpers for tests that talk to a gateway over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anthropic
import httpx
import openai
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from conveyor.config import ModelSettings
from conveyor.models.simulated import SimulatedModel
from conveyor.store.base import Namespace, StateStore

if TYPE_CHECKING:
    from tests.conftest import NodeFactory


async def submit(client: httpx.AsyncClient, prompt: str, **fields: Any) -> str:
    response = await client.post("/v1/requests", json={"prompt": prompt, **fields})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def wait_final(
    client: httpx.AsyncClient, rid: str, *, wait: float = 30, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    response = await client.get(f"/v1/requests/{rid}", params={"wait": wait}, headers=headers)
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    assert view["status"] in ("completed", "failed", "cancelled"), view
    return view


async def read_sse(
    client: httpx.AsyncClient, rid: str, *, last_event_id: str | None = None, stop_after: int | None = None
) -> list[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) of every SSE event until the final one (or ``stop_after`` events)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with client.stream("GET", f"/v1/requests/{rid}/events", headers=headers) as response:
        assert response.status_code == 200
        return await sse_events(response, stop_after=stop_after)


async def sse_events(
    response: httpx.Response, *, stop_after: int | None = None
) -> list[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) of every event of an SSE response until the final one (or ``stop_after``)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events: list[tuple[int, str, dict[str, Any]]] = []
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
            continue
        events.append((int(fields["id"]), fields["event"], orjson.loads(fields["data"])))
        fields = {}
        if events[-1][1] in ("completed", "failed", "cancelled") or len(events) == stop_after:
            break
    return events


def sdk(base_url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    """The official OpenAI client pointed at a gateway: no retries, a timeout."""
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=30)


def anthropic_sdk(base_url: str, api_key: str = "unused") -> anthropic.AsyncAnthropic:
    """The official Anthropic client pointed at a gateway: no retries, a timeout."""
    return anthropic.AsyncAnthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)


def streamed_text(events: list[tuple[int, str, dict[str, Any]]]) -> str:
    return "".join(data["text"] for _, kind, data in events if kind == "token")


async def assert_completed_exactly_once(
    client: httpx.AsyncClient,
    store: StateStore,
    prompts: Sequence[str],
    rids: Sequence[str],
    *,
    max_tokens: int,
    wait: float = 60,
) -> None:
    """Every request completed with the simulated model's exact answer, streamed once, billed once."""
    model = SimulatedModel()
    views = await asyncio.gather(*(wait_final(client, rid, wait=wait) for rid in rids))
    streams = await asyncio.gather(*(read_sse(client, rid) for rid in rids))
    for prompt, view, events in zip(prompts, views, streams, strict=True):
        tokens, _ = model.answer(prompt, max_tokens)
        assert view["status"] == "completed", view
        assert view["output"] == "".join(tokens).strip()  # no duplicated or missing text
        assert streamed_text(events).strip() == view["output"]  # no second token sequence
        assert view["usage"]["completion_tokens"] == len(tokens)  # the tokens of one generation
    for rid in rids:
        entry = await store.get(Namespace.USAGE, rid)
        assert entry is not None, f"no usage recorded for {rid}"
        record = orjson.loads(entry.value)
        assert record["request_id"] == rid


@contextlib.asynccontextmanager
async def scripted_upstream(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """An OpenAI-compatible server whose chat and text completions ``handler`` answers; yields its
    /v1 URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    app.router.add_post("/v1/completions", handler)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("/v1"))


@contextlib.asynccontextmanager
async def streaming_upstream(choices: Sequence[dict[str, Any]]) -> AsyncIterator[str]:
    """A scripted upstream that answers every completion with a stream of one chunk per choice of
    ``choices`` (each a choice as the server writes it), then ``[DONE]``; yields its /v1 URL."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for choice in choices:
            await response.write(b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async with scripted_upstream(answer) as url:
        yield url


def upstream(url: str, model: str = "m") -> dict[str, Any]:
    """The settings of a node whose model is the OpenAI-compatible server at ``url``."""
    return {"model": ModelSettings(backend="openai", upstream_url=url, upstream_model=model)}


@contextlib.asynccontextmanager
async def relaying(
    node: NodeFactory, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, list[dict[str, Any]]]]:
    """A node (with ``settings``) whose model is a ``recording_upstream``: yields the node's client
    and the bodies the upstream received."""
    async with (
        recording_upstream() as (url, received),
        node(settings={**upstream(url), **settings}) as http,
    ):
        yield http, received


def turns(body: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(role, content) of each message of a chat completion an upstream received."""
    return [(m["role"], m.get("content")) for m in body["messages"]]


# What an OpenAI-compatible server's sampling fields are called on the wire.
SAMPLING_FIELDS = (
    *("temperature", "top_p", "stop", "seed"),
    *("presence_penalty", "frequency_penalty", "logit_bias"),
)


@contextlib.asynccontextmanager
async def recording_upstream() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A scripted upstream that answers every completion (chat or text) "ok" and keeps each request's
    body: yields its /v1 URL and that list."""
    received: list[dict[str, Any]] = []

    async def answer(request: web.Request) -> web.Response:
        received.append(orjson.loads(await request.read()))
        said = {"text": "ok"} if request.path.endswith("/v1/completions") else {"delta": {"content": "ok"}}
        ok = b"data: " + orjson.dumps({"choices": [{**said, "finish_reason": "stop"}]}) + b"\n\n"
        body = ok + b"data: [DONE]\n\n"
        return web.Response(body=body, content_type="text/event-stream")

    async with scripted_upstream(answer) as url:
        yield url, received


class Receiver:
    """A callback receiver answering each call with the next of ``statuses`` (then 200); ``called``
    is set at the first 200."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.called = asyncio.Event()

    async def answer(self, request: web.Request) -> web.Response:
        self.calls.append((dict(request.headers), await request.read()))
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.called.set()
        return web.Response(status=status, text="not today" if status >= 400 else "ok")


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[str]:
    """``receiver`` listening on loopback; yields its URL."""
    app = web.Application()
    app.router.add_post("/hook", receiver.answer)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("/hook"))
