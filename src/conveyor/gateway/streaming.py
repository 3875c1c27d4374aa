"""The response that carries an event stream (the job API's SSE, OpenAI's streamed completion).

Starlette's ``StreamingResponse`` notices a client leaving (under uvicorn's ASGI 2.3) by running
the body and a disconnect listener in an anyio task group: ~5 % of the gateway's CPU while it
serves streams (py-spy, benchmarks/README.md). Here one plain task waits for the disconnect and
cancels the stream, whose body's ``finally`` then runs as usual. And the body says which piece is
its last (``Last``), so that piece and the end of the chunked body leave in one write: every write
costs a system call here and a wakeup in the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Last(str):
    """The body's last piece: sent with the end of the body, and nothing is read after it."""

    __slots__ = ()


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, body: AsyncGenerator[str, None], headers: Mapping[str, str] | None = None) -> None:
        # Not Response.__init__: it would render an empty body and announce its length.
        self.status_code, self.background = 200, None
        self.init_headers({**_HEADERS, **(headers or {})})
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.current_task()
        assert streaming is not None
        left = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass  # the rest of a request body nobody reads
            left = True
            streaming.cancel()

        start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        watcher = asyncio.create_task(watch())
        try:
            try:
                await send(start)
                async for piece in self._body:
                    last = isinstance(piece, Last)
                    if last:  # the client may stay (keep-alive): from here on, its leaving is no news
                        watcher.cancel()
                    await send({"type": "http.response.body", "body": piece.encode(), "more_body": not last})
                    if last:
                        return
                watcher.cancel()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                watcher.cancel()
                await self._body.aclose()
        except asyncio.CancelledError:
            if not left:
                raise
            streaming.uncancel()  # the cancel was ours: the client left, and that ends the response
