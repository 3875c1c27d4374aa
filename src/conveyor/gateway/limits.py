"""Request-size limits: a pure ASGI middleware, so oversize bodies are refused before parsing."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def error_body(code: str, message: str, **extra: object) -> dict[str, object]:
    """The one error shape of the gateway's job API."""
    return {"error": {"code": code, "message": message, **extra}}


class BodySizeLimit:
    """Answers 413 when a body is, or turns out to be, larger than ``max_bytes`` (or than the
    limit ``paths`` gives its path: file uploads are larger than requests)."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, paths: Mapping[str, int] = MappingProxyType({})
    ) -> None:
        self.app, self.max_bytes, self.paths = app, max_bytes, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, limit)

    async def _refuse(self, send: Send, limit: int) -> None:
        body = orjson.dumps(error_body("body_too_large", BodyTooLarge(limit).detail))
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """Raised from ``receive``: an HTTPException, so the framework's body parsing lets it through."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {max_bytes} bytes")
