"""Receiving Conveyor's callbacks: check the signature, drop repeats, answer 2xx at once.

    CONVEYOR_CALLBACK_SECRET=s3cret conveyor up --model simulated
    .venv/bin/python docs/examples/callback_receiver.py serve      # listens on 127.0.0.1:8081
    curl -d '{"prompt": "hi", "callback_url": "http://127.0.0.1:8081/hook"}' 127.0.0.1:8000/v1/requests

Without ``serve`` it checks itself: the deliver stage, run with the real runtime on in-memory
backends, calls it about one request twice (as at-least-once delivery may), and a forger calls
once (tests/unit/test_examples.py runs that too).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from conveyor.callbacks import SIGNATURE_HEADER, sign, verify
from conveyor.events import Topic, new_event
from conveyor.payloads import EventType, RequestCompleted
from conveyor.stages import deliver_stage
from conveyor.testing import StageHarness

Outcome = dict[str, Any]


def receiver(secret: str, on_outcome: Callable[[Outcome], Awaitable[None]]) -> web.Application:
    """An app whose ``POST /hook`` takes Conveyor's calls signed with ``secret``."""
    seen: set[str] = set()  # a real receiver keeps these where its work is (a database), for a while

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(secret, body, request.headers.get(SIGNATURE_HEADER, "")):
            return web.Response(status=401, text="bad signature")  # 4xx: not sent again
        event_id = request.headers["Conveyor-Event-Id"]
        if event_id not in seen:  # delivery is at least once: the same call may come again
            seen.add(event_id)
            await on_outcome(orjson.loads(body))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    return app


async def main() -> tuple[list[str], int]:
    """The outcomes the receiver took, and how it answered a forgery."""
    secret, taken = "s3cret", []

    async def take(outcome: Outcome) -> None:
        taken.append(f"{outcome['status']}: {outcome['output']}")

    runner = web.AppRunner(receiver(secret, take))
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port
    await web.SockSite(runner, sock).start()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        done = new_event(
            type=EventType.COMPLETED,
            source="example",
            payload=RequestCompleted(output="Queues hum softly", streamed_chars=17),
            callback=url,
        )
        for _ in range(2):  # delivered twice, as after a crash between the call and its record
            await StageHarness(deliver_stage(secret=secret)).handle(done, topic=Topic.CALLBACKS)
        forged = b'{"id": "x", "status": "completed", "output": "free money"}'
        headers = {SIGNATURE_HEADER: sign("a guess", forged), "Conveyor-Event-Id": "x"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=forged, headers=headers) as answer,
        ):
            forgery = answer.status
    finally:
        await runner.cleanup()
    return taken, forgery


def serve() -> None:
    secret = os.environ.get("CONVEYOR_CALLBACK_SECRET", "s3cret")

    async def show(outcome: Outcome) -> None:
        print(orjson.dumps(outcome, option=orjson.OPT_INDENT_2).decode(), flush=True)

    web.run_app(receiver(secret, show), host="127.0.0.1", port=8081)


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        print(asyncio.run(main()))
