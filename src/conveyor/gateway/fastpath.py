"""The calls of every request's life, answered without FastAPI's routing.

``POST /v1/requests[?wait=S]``, the long poll ``GET /v1/requests/{id}[?wait=S]``, the event
stream ``GET /v1/requests/{id}/events`` and ``POST /v1/chat/completions`` are the gateway's hot
path, and routing, the middleware stack and dependency solving cost about a third of its CPU
(py-spy; benchmarks/README.md). This ASGI middleware serves them with the same functions the
routed endpoints call, and renders a failure with the same exception handlers. What it does not
recognise as the plain case (a missing or unknown API key, an Idempotency-Key, an unknown id, a
malformed ``wait`` or ``Last-Event-ID``, a query, any other path or method) goes on to the routed
endpoint, untouched, before anything was read or counted.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from conveyor.errors import UnavailableError
from conveyor.gateway.core import GatewayCore

_SUBMIT = "/v1/requests"
_CHAT = "/v1/chat/completions"
_STATUS = "/v1/requests/"
_EVENTS = "/events"


class Submit(Protocol):
    def __call__(self, raw: bytes, tenant: str, *, wait: float) -> Awaitable[Response]: ...


class Stream(Protocol):
    def __call__(self, rid: str, last_id: int, tenant: str) -> Response: ...


Complete = Callable[[Request, str], Awaitable[Response]]


def _wait(query: bytes) -> float | None:
    """The ``wait`` of a query that has nothing else (0 without it); None if it is not that."""
    if not query:
        return 0.0
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    if len(pairs) != 1 or pairs[0][0] != "wait":
        return None
    try:
        wait = float(pairs[0][1])
    except ValueError:
        return None
    return wait if math.isfinite(wait) and wait >= 0 else None


class FastPath:
    def __init__(
        self,
        app: ASGIApp,
        *,
        core: GatewayCore,
        max_wait: float,
        submit: Submit,
        stream: Stream,
        complete: Complete,
        handlers: Mapping[Any, Callable[[Request, Any], Response | Awaitable[Response]]],
    ) -> None:
        self.app, self._core, self._max_wait = app, core, max_wait
        self._submit, self._stream, self._complete = submit, stream, complete
        self._handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = None
        if scope["type"] == "http":
            if scope["method"] == "POST" and scope["path"] == _SUBMIT:
                response = await self._accept(scope, receive)
            elif scope["method"] == "POST" and scope["path"] == _CHAT:
                response = await self._chat(scope, receive)
            elif scope["method"] == "GET" and scope["path"].startswith(_STATUS):
                events = scope["path"].endswith(_EVENTS)
                response = await (self._events(scope) if events else self._status(scope))
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)

    async def _accept(self, scope: Scope, receive: Receive) -> Response | None:
        headers = Headers(scope=scope)
        if (wait := _wait(scope["query_string"])) is None:
            return None
        if "idempotency-key" in headers or (tenant := self._core.tenant_of(headers)) is None:
            return None
        request = Request(scope, receive)
        raw = await request.body()
        return await self._rendered(request, self._submit(raw, tenant, wait=wait))

    async def _chat(self, scope: Scope, receive: Receive) -> Response | None:
        if scope["query_string"] or (tenant := self._core.tenant_of(Headers(scope=scope))) is None:
            return None
        request = Request(scope, receive)
        return await self._rendered(request, self._complete(request, tenant))

    async def _rendered(self, request: Request, answer: Awaitable[Response]) -> Response:
        try:
            return await answer
        except Exception as exc:  # rendered as the routed endpoint's would be
            for cls in type(exc).__mro__:
                if (handler := self._handlers.get(cls)) is not None:
                    rendered = handler(request, exc)
                    return await rendered if inspect.isawaitable(rendered) else rendered
            raise

    async def _status(self, scope: Scope) -> Response | None:
        rid = scope["path"][len(_STATUS) :]
        wait = _wait(scope["query_string"])
        if not rid or "/" in rid or wait is None:
            return None
        if (tenant := self._core.tenant_of(Headers(scope=scope))) is None:
            return None
        view = None
        with contextlib.suppress(UnavailableError):
            view = await self._core.wait(rid, min(wait, self._max_wait), tenant=tenant)
        return None if view is None else Response(view.public_json(), media_type="application/json")

    async def _events(self, scope: Scope) -> Response | None:
        rid = scope["path"][len(_STATUS) : -len(_EVENTS)]
        headers = Headers(scope=scope)
        last_id = headers.get("last-event-id", "0")
        if not rid or "/" in rid or scope["query_string"] or not last_id.isdigit():
            return None
        if (tenant := self._core.tenant_of(headers)) is None:
            return None
        view = None
        with contextlib.suppress(UnavailableError):
            view = await self._core.view(rid, tenant=tenant)
        return None if view is None else self._stream(rid, int(last_id), tenant)
