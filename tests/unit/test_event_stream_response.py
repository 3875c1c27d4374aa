"""The gateway's event-stream response at the ASGI level: what it writes, and a client leaving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from starlette.types import Message

from conveyor.gateway.streaming import EventStreamResponse, Last

SCOPE: dict[str, Any] = {"type": "http", "method": "GET", "path": "/events", "headers": []}


class Client:
    """An ASGI server's side of one request: records what is sent, says when the client left."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.left = asyncio.Event()

    async def receive(self) -> Message:
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)


async def test_the_last_piece_leaves_with_the_end_of_the_body_and_closes_the_body() -> None:
    closed = asyncio.Event()

    async def body() -> AsyncGenerator[str, None]:
        try:
            yield "id: 1\n\n"
            yield Last("id: 2\n\n")
            yield "never read"
        finally:
            closed.set()

    client = Client()
    async with asyncio.timeout(5):
        await EventStreamResponse(body())(SCOPE, client.receive, client.send)
    start, *bodies = client.sent
    assert start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert not any(name == b"content-length" for name, _ in start["headers"])
    assert [(m["body"], m["more_body"]) for m in bodies] == [(b"id: 1\n\n", True), (b"id: 2\n\n", False)]
    assert closed.is_set()


async def test_a_body_that_just_ends_ends_the_response() -> None:
    async def body() -> AsyncGenerator[str, None]:
        yield "id: 1\n\n"

    client = Client()
    async with asyncio.timeout(5):
        await EventStreamResponse(body())(SCOPE, client.receive, client.send)
    assert [(m["body"], m["more_body"]) for m in client.sent[1:]] == [(b"id: 1\n\n", True), (b"", False)]


async def test_a_client_leaving_stops_the_body_which_cleans_up_and_the_response_returns() -> None:
    waiting, cleaned = asyncio.Event(), asyncio.Event()

    async def body() -> AsyncGenerator[str, None]:
        try:
            yield "id: 1\n\n"
            waiting.set()
            await asyncio.Event().wait()  # a stream with nothing more to say for now
            yield "never sent"
        finally:
            await asyncio.to_thread(str)  # its clean-up may still wait for things (a thread, here)
            cleaned.set()

    client = Client()
    async with asyncio.timeout(5):
        responding = asyncio.create_task(EventStreamResponse(body())(SCOPE, client.receive, client.send))
        await waiting.wait()
        client.left.set()
        await responding  # returns: a client leaving is no error of the application
    assert cleaned.is_set()
    assert [m["body"] for m in client.sent[1:]] == [b"id: 1\n\n"]
    assert not responding.cancelled()


async def test_a_cancel_from_elsewhere_still_cancels_the_response() -> None:
    waiting = asyncio.Event()

    async def body() -> AsyncGenerator[str, None]:
        yield "id: 1\n\n"
        waiting.set()
        await asyncio.Event().wait()
        yield "never sent"

    client = Client()
    async with asyncio.timeout(5):
        responding = asyncio.create_task(EventStreamResponse(body())(SCOPE, client.receive, client.send))
        await waiting.wait()
        responding.cancel()  # e.g. the server shutting down
        await asyncio.wait([responding])
    assert responding.cancelled()
