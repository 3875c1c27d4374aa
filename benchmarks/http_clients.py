"""What one streamed chat completion costs the HTTP client: httpx against aiohttp.

Conveyor makes these calls in two places: the upstream backend (``--model openai``: a worker
streams one completion per request from vLLM, TGI, Ollama…) and ``conveyor bench`` (a submit
and its event stream per request). A scripted OpenAI-compatible server in this process streams
16 content chunks, a usage chunk and ``[DONE]``; each client reads 600 completions, 16 at a
time, twice, alternating. Reported: completions/s and CPU of this process per completion. The
server's share is the same for both clients, so the difference is the client's.
Run: ``.venv/bin/python benchmarks/http_clients.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

CHUNKS, COUNT, CONCURRENCY = 16, 600, 16
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def completion(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(CHUNKS):
        await response.write(b'data: {"choices": [{"delta": {"content": "token "}}]}\n\n')
    usage = {"prompt_tokens": 5, "completion_tokens": CHUNKS}
    await response.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n")
    return response


async def measure(label: str, one: Callable[[], Awaitable[None]]) -> str:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def gated() -> None:
        async with gate:
            await one()

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(gated() for _ in range(COUNT)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return f"| {label} | {COUNT / wall:,.0f} | {cpu / COUNT * 1000:.2f} |"


async def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", completion)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
    async with (
        TestServer(app, host="127.0.0.1") as server,
        httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5)) as hx,
        aiohttp.ClientSession(timeout=timeout) as aio,
    ):
        url = str(server.make_url("/v1/chat/completions"))

        async def with_httpx() -> None:
            async with hx.stream("POST", url, json=BODY) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        orjson.loads(line[6:])

        async def with_aiohttp() -> None:
            async with aio.post(url, json=BODY) as response:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        orjson.loads(line[6:])

        print("| client | completions/s | CPU ms per completion (client and server) |")
        print("|---|---|---|")
        for _ in range(2):
            for label, one in (("httpx", with_httpx), ("aiohttp", with_aiohttp)):
                print(await measure(label, one), flush=True)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
