"""Which requests an HTTP call made: their ids in the response's headers, and an access log.

A call that puts requests on the log (a submit, a chat completion, a message, a response, an
embeddings call, a batch's lines aside) answers with their ids in ``x-request-id`` (where the OpenAI
SDK reads ``_request_id``) and ``request-id`` (the Anthropic SDK's), comma-separated when there are
several, up to ``MAX_IDS`` (an embeddings call of 2,048 texts makes 2,048 requests: their ids would
make a header larger than HTTP clients read): what a client quotes when it asks what became of its
call. With ``--access-log``, every HTTP call is a line of the ``conveyor.access`` logger (text or
JSON, as the process logs): method, path, status, duration, and the tenant, the number and the first
``MAX_IDS`` ids of the requests it accepted.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("conveyor.access")
MAX_IDS = 16  # as many as a completion's choices


@dataclasses.dataclass(slots=True)
class _Call:
    ids: list[str] = dataclasses.field(default_factory=list)  # the first MAX_IDS
    count: int = 0
    tenant: str = ""


# The call being served: a mutable record, so a request accepted in a task the call started (the
# choices of one completion are accepted concurrently) is seen by the call itself.
_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("conveyor_call", default=None)


def accepted(request_id: str, tenant: str) -> None:
    """The current HTTP call put ``request_id`` on the log, for ``tenant``."""
    call = _CALL.get()
    if call is not None:
        call.count += 1
        call.tenant = tenant
        if len(call.ids) < MAX_IDS:
            call.ids.append(request_id)


class Access:
    def __init__(self, app: ASGIApp, *, log: bool = False) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        call, started, status = _Call(), time.perf_counter(), 0
        token = _CALL.set(call)

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if 0 < call.count <= MAX_IDS:
                    ids = ",".join(call.ids).encode()
                    message["headers"] = [
                        *message.get("headers", ()),
                        (b"x-request-id", ids),
                        (b"request-id", ids),
                    ]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _CALL.reset(token)
            if self.log:
                elapsed = (time.perf_counter() - started) * 1000
                logger.info(
                    "%s %s %d %.1f ms",
                    scope["method"],
                    scope["path"],
                    status,
                    elapsed,
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(elapsed, 1),
                        "tenant": call.tenant or None,
                        "requests": call.count,
                        "request_ids": call.ids,
                    },
                )
