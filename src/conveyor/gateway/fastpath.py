"""The long poll every waiting client sits on, answered without FastAPI's routing.

``GET /v1/requests/{id}[?wait=S]`` is half the HTTP calls of a request's life, and routing,
the middleware stack and dependency solving cost about a third of the gateway's CPU
(py-spy; benchmarks/README.md). This ASGI middleware answers the plain successful case
itself, with the same core call and the same body as the routed endpoint. Anything else
(an unknown id, a malformed ``wait``, a refused key, the log unavailable, another path or
method) goes on to that endpoint, which answers it the documented way.
"""

from __future__ import annotations

import contextlib
import math
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from conveyor.errors import UnavailableError
from conveyor.gateway.core import GatewayCore

_PREFIX = "/v1/requests/"


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


class StatusFastPath:
    def __init__(self, app: ASGIApp, *, core: GatewayCore, max_wait: float) -> None:
        self.app, self._core, self._max_wait = app, core, max_wait

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"].startswith(_PREFIX):
            rid = scope["path"][len(_PREFIX) :]
            wait = _wait(scope["query_string"])
            if rid and "/" not in rid and wait is not None:
                view = None
                if (tenant := self._core.tenant_of(Headers(scope=scope))) is not None:
                    with contextlib.suppress(UnavailableError):
                        view = await self._core.wait(rid, min(wait, self._max_wait), tenant=tenant)
                if view is not None:
                    await Response(view.public_json(), media_type="application/json")(scope, receive, send)
                    return
        await self.app(scope, receive, send)
