"""``conveyor bench``: load a running gateway the way its clients do, and say how it held up.

A closed loop: ``concurrency`` clients each submit a request, read its event stream to the
final event and submit the next, until ``requests`` were sent or ``seconds`` passed (bounded
both ways, so it always stops by itself). ``api`` picks how: Conveyor's own (a submit, then
its SSE stream) or the OpenAI API (one streamed chat completion, as an OpenAI SDK sends it).
Time to first token, latency and tokens are measured on the client's side of the HTTP
connection, as a user sees them. Each prompt starts with its request number, so that no request
finds another's prompt in a model's prefix cache.

The client is aiohttp: with httpx, this process itself took 6-10 ms of CPU per request (a submit
and its stream) and capped a run at ~85-120 requests/s whatever the gateway could do; aiohttp
takes ~1 ms (benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp

from conveyor.view import TERMINAL


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Load:
    url: str = "http://127.0.0.1:8000"
    requests: int = 100
    concurrency: int = 8
    seconds: float = 300.0
    prompt: str = "Explain what a message queue is."
    max_tokens: int = 64
    api_key: str | None = None
    api: str = "conveyor"  # or "openai"


@dataclasses.dataclass(slots=True)
class Outcome:
    """What the clients saw: per completed request its time to first token and latency."""

    sent: int = 0
    ttft: list[float] = dataclasses.field(default_factory=list)
    latency: list[float] = dataclasses.field(default_factory=list)
    tokens: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    elapsed: float = 0.0

    def report(self, concurrency: int) -> str:
        done, failed = len(self.latency), sum(self.errors.values())
        cut = self.sent - done - failed
        lines = [
            f"requests: {self.sent} sent, {done} completed, {failed} not"
            + (f", {cut} cut off by the time limit" if cut else "")
            + f" in {self.elapsed:.1f} s ({concurrency} concurrent)",
            f"throughput: {done / self.elapsed:.1f} requests/s, "
            f"{self.tokens / self.elapsed:.1f} completion tokens/s",
            f"time to first token  {_quantiles(self.ttft)}",
            f"latency              {_quantiles(self.latency)}",
        ]
        lines += [f"error: {times} x {reason}" for reason, times in self.errors.most_common()]
        return "\n".join(lines)


def _quantiles(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    q = statistics.quantiles(seconds, n=100, method="inclusive") if len(seconds) > 1 else seconds * 99
    return "  ".join(f"p{p} {q[p - 1] * 1000:.0f} ms" for p in (50, 90, 99))


async def run(load: Load) -> Outcome:
    outcome = Outcome()
    numbers = iter(range(load.requests))
    headers = {"Authorization": f"Bearer {load.api_key}"} if load.api_key else {}
    connector = aiohttp.TCPConnector(limit=2 * load.concurrency)
    # Connecting and each read are bounded; a whole stream is not (a long generation is no failure).
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
    start = time.perf_counter()
    # A large read buffer: the final event's line carries the whole output.
    async with aiohttp.ClientSession(
        headers=headers, connector=connector, timeout=timeout, read_bufsize=2**20
    ) as client:
        one: Callable[[aiohttp.ClientSession, Load, int, Outcome], Awaitable[None]] = _one
        if load.api == "openai":
            async with client.get(_url(load, "/v1/models"), raise_for_status=True) as listed:
                models = (await listed.json())["data"]
            one = functools.partial(_one_chat, model=models[0]["id"])

        async def client_loop() -> None:
            for i in numbers:
                outcome.sent += 1
                try:
                    await one(client, load, i, outcome)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome.errors[f"{type(exc).__name__}: {exc}"] += 1

        loops = [asyncio.create_task(client_loop()) for _ in range(load.concurrency)]
        _, late = await asyncio.wait(loops, timeout=load.seconds)
        for task in late:  # past the time limit: what is still in flight is not counted
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    outcome.elapsed = time.perf_counter() - start
    return outcome


def _url(load: Load, path: str) -> str:
    return load.url.rstrip("/") + path


async def _one(client: aiohttp.ClientSession, load: Load, i: int, outcome: Outcome) -> None:
    began = time.perf_counter()
    body = {"prompt": f"Request {i}. {load.prompt}", "max_tokens": load.max_tokens}
    async with client.post(_url(load, "/v1/requests"), json=body) as submitted:
        if submitted.status >= 400:
            outcome.errors[f"HTTP {submitted.status}: {await _reason(submitted)}"] += 1
            return
        rid = (await submitted.json())["id"]
    first: float | None = None
    final: dict[str, object] = {}
    async with client.get(_url(load, f"/v1/requests/{rid}/events")) as events:
        event = ""
        async for raw in events.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event == "token" and first is None:
                first = time.perf_counter() - began
            elif line.startswith("data: ") and event in TERMINAL:
                # Read on to the body's end, right after this: one left unread costs the connection.
                final = json.loads(line[len("data: ") :])
    if final.get("status") != "completed":
        outcome.errors[f"ended {final.get('status', 'without a final event')}"] += 1
        return
    outcome.latency.append(time.perf_counter() - began)
    if first is not None:
        outcome.ttft.append(first)
    usage = final.get("usage")
    outcome.tokens += int(usage.get("completion_tokens", 0)) if isinstance(usage, dict) else 0


async def _one_chat(
    client: aiohttp.ClientSession, load: Load, i: int, outcome: Outcome, *, model: str
) -> None:
    began = time.perf_counter()
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Request {i}. {load.prompt}"}],
        "max_tokens": load.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first: float | None = None
    ended = False
    async with client.post(_url(load, "/v1/chat/completions"), json=body) as response:
        if response.status >= 400:
            outcome.errors[f"HTTP {response.status}: {await _reason(response)}"] += 1
            return
        async for raw in response.content:
            line = raw.decode()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                outcome.errors[f"failed: {chunk['error'].get('code')}: {chunk['error'].get('message')}"] += 1
                return
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - began
            if chunk.get("usage"):  # the last chunk; [DONE] and the body's end follow it
                ended = True
                outcome.latency.append(time.perf_counter() - began)
                if first is not None:
                    outcome.ttft.append(first)
                outcome.tokens += int(chunk["usage"].get("completion_tokens", 0))
    if not ended:
        outcome.errors["ended without a final chunk"] += 1


async def _reason(response: aiohttp.ClientResponse) -> str:
    text = await response.text()
    try:
        error = json.loads(text)["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return text[:200]
