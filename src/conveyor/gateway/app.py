"""The gateway's FastAPI application: submit, status, stream, cancel, health, metrics."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor.errors import UnavailableError
from conveyor.events import Topic, new_event
from conveyor.gateway.limits import BodySizeLimit, error_body
from conveyor.gateway.sse import stream_request
from conveyor.gateway.watch import StatusWatch
from conveyor.log.base import EventLog
from conveyor.observability.metrics import REGISTRY, REQUESTS_ACCEPTED
from conveyor.payloads import CancelRequested, EventType, RequestAccepted
from conveyor.projector import read_view
from conveyor.store.base import Namespace, StateStore
from conveyor.view import RequestView

SOURCE = "conveyor/gateway"
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GatewayLimits:
    max_body_bytes: int = 256 * 1024
    max_prompt_chars: int = 100_000
    max_tokens: int = 8192
    default_max_tokens: int = 256
    max_wait_seconds: float = 60.0


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="The text to generate from.")
    key: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Partition key: requests with one key are handled in order.",
    )
    max_tokens: int | None = Field(None, ge=1, description="Upper bound on generated tokens.")
    timeout: float | None = Field(None, gt=0, description="Seconds from now after which generation stops.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Opaque data carried to the result.")


_SUBMIT_BODY = {
    "required": True,
    "content": {"application/json": {"schema": SubmitRequest.model_json_schema()}},
}


class Submitted(BaseModel):
    id: str
    status: str
    status_url: str
    stream_url: str


class ApiError(Exception):
    def __init__(self, http_status: int, code: str, message: str, /, **extra: Any) -> None:
        super().__init__(message)
        self.http_status, self.code, self.message, self.extra = http_status, code, message, extra


def _fingerprint(body: SubmitRequest) -> str:
    return hashlib.sha256(orjson.dumps(body.model_dump(), option=orjson.OPT_SORT_KEYS)).hexdigest()


def create_app(log: EventLog, store: StateStore, *, limits: GatewayLimits = GatewayLimits()) -> FastAPI:
    watch = StatusWatch(store)
    # Read-your-writes: a request accepted here is "accepted" even before the projector
    # has written its view (a few milliseconds later).
    recent: collections.OrderedDict[str, RequestView] = collections.OrderedDict()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(watch.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="Conveyor",
        version="0.1.0",
        summary="Event-driven orchestration for real-time generative AI.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, **exc.extra), status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(
                error_body("invalid_json", "the request body is not valid JSON"), status_code=400
            )
        details = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body") or "body", "message": e["msg"]}
            for e in errors
        ]
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return JSONResponse(error_body("invalid_request", message, details=details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(UnavailableError)
    async def on_unavailable(_: Request, exc: UnavailableError) -> JSONResponse:
        return JSONResponse(
            error_body("unavailable", str(exc)), status_code=503, headers={"Retry-After": "1"}
        )

    def urls(rid: str) -> dict[str, str]:
        return {"status_url": f"/v1/requests/{rid}", "stream_url": f"/v1/requests/{rid}/events"}

    async def view_or_404(rid: str) -> RequestView:
        view = await read_view(store, rid) or recent.get(rid)
        if view is not None:
            return view
        # Accepted (maybe by another gateway, maybe before a restart) but not projected yet?
        accepted = await log.find(Topic.REQUESTS, rid)
        if accepted is None:
            raise ApiError(404, "not_found", f"no request with id {rid!r}")
        return RequestView(id=rid, tenant=accepted.tenant, stages={"gateway": {"accepted_at": accepted.time}})

    @app.post(
        "/v1/requests",
        status_code=202,
        response_model=Submitted,
        tags=["requests"],
        openapi_extra={"requestBody": _SUBMIT_BODY},
    )
    async def submit(
        request: Request,
        idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
    ) -> Response:
        """Accept a request: it is durably on the log when this returns 202."""
        # Parsed here rather than by the framework: pydantic's JSON parser is several times
        # faster on the hottest endpoint, and a missing Content-Type is no reason to refuse.
        try:
            body = SubmitRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from exc
        if len(body.prompt) > limits.max_prompt_chars:
            raise ApiError(422, "prompt_too_long", f"prompt exceeds {limits.max_prompt_chars} characters")
        max_tokens = body.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise ApiError(422, "max_tokens_too_large", f"max_tokens exceeds {limits.max_tokens}")
        event = new_event(
            type=EventType.ACCEPTED,
            source=SOURCE,
            payload=RequestAccepted(prompt=body.prompt, max_tokens=max_tokens, metadata=body.metadata),
            deadline=time.time() + body.timeout if body.timeout else None,
        )
        rid = event.id
        if body.key:
            event = dataclasses.replace(event, key=body.key)
        if idempotency_key:
            idem = hashlib.sha256(f"default\x00{idempotency_key}".encode()).hexdigest()
            record = orjson.dumps({"id": rid, "fingerprint": _fingerprint(body)})
            if await store.create(Namespace.IDEMPOTENCY, idem, record) is None:
                existing = await store.get(Namespace.IDEMPOTENCY, idem)
                if existing is not None:
                    previous = orjson.loads(existing.value)
                    if previous["fingerprint"] != _fingerprint(body):
                        raise ApiError(
                            422,
                            "idempotency_key_reused",
                            "this Idempotency-Key was used with a different body",
                        )
                    view = await read_view(store, previous["id"])
                    status = view.status if view else "accepted"
                    content = {"id": previous["id"], "status": status, **urls(previous["id"])}
                    return JSONResponse(content, status_code=200)
        try:
            await log.publish(Topic.REQUESTS, [event])
        except Exception:
            if idempotency_key:  # not accepted: a retry with the same key must try again
                await store.delete(Namespace.IDEMPOTENCY, idem)
            raise
        REQUESTS_ACCEPTED.inc()
        recent[rid] = RequestView(id=rid, stages={"gateway": {"accepted_at": event.time}})
        if len(recent) > 10_000:
            recent.popitem(last=False)
        return JSONResponse({"id": rid, "status": "accepted", **urls(rid)}, status_code=202)

    @app.get("/v1/requests/{rid}", tags=["requests"], responses={200: {"model": RequestView}})
    async def status(
        rid: str,
        wait: Annotated[float, Query(ge=0, description="Seconds to wait for a final status.")] = 0,
    ) -> Response:
        """The request's status view. With ``wait``, returns as soon as the request ends."""
        deadline = time.monotonic() + min(wait, limits.max_wait_seconds)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        with watch.subscribe(rid, queue):  # before the read, so no change can slip between
            view = await view_or_404(rid)
            while not view.terminal and (left := deadline - time.monotonic()) > 0:
                try:
                    async with asyncio.timeout(min(left, 1.0)):
                        _, view = await queue.get()
                except TimeoutError:
                    view = await view_or_404(rid)  # a safety net for a missed notification
        return Response(view.public_json(), media_type="application/json")

    @app.get("/v1/requests/{rid}/events", tags=["requests"], response_class=StreamingResponse)
    async def events(
        rid: str,
        last_event_id: Annotated[str | None, Header()] = None,
        last_id: Annotated[str | None, Query(alias="last_event_id")] = None,
    ) -> StreamingResponse:
        """Server-Sent Events: progress, ``token`` chunks, then the final status. Resumable."""
        await view_or_404(rid)
        raw = last_event_id or last_id or "0"
        if not raw.isdigit():
            raise ApiError(400, "invalid_last_event_id", "Last-Event-ID must be an event id from this stream")
        return StreamingResponse(
            stream_request(rid, int(raw), log, store, watch),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.delete("/v1/requests/{rid}", tags=["requests"])
    async def cancel(rid: str) -> JSONResponse:
        """Cancel: generation stops at its next token. A finished request stays as it is (409)."""
        view = await view_or_404(rid)
        if view.terminal:
            if view.status == "cancelled":
                return JSONResponse(view.public(), status_code=200)
            raise ApiError(
                409, "already_finished", f"request {rid} is already {view.status}", status=view.status
            )
        cancel_event = new_event(
            type=EventType.CANCEL, source=SOURCE, payload=CancelRequested(reason="client"), request_id=rid
        )
        await log.publish(Topic.CONTROL, [dataclasses.replace(cancel_event, tenant=view.tenant)])
        return JSONResponse({"id": rid, "status": "cancelling"}, status_code=202)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> JSONResponse:
        """The log and the store answer."""
        checks: dict[str, str] = {}
        for name, backend in (("log", log), ("store", store)):
            try:
                await asyncio.wait_for(backend.ping(), timeout=2.0)
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"unavailable: {exc}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
        )

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics of this process, and every consumer group's lag (from the log)."""
        lines = [
            "# HELP conveyor_consumer_pending Events in a topic not yet delivered to a consumer group.",
            "# TYPE conveyor_consumer_pending gauge",
            "# HELP conveyor_consumer_in_flight Events delivered to a consumer group, not yet acknowledged.",
            "# TYPE conveyor_consumer_in_flight gauge",
        ]
        with contextlib.suppress(Exception):  # the log is down: /readyz says so; keep the rest
            async with asyncio.timeout(2.0):
                for lag in await log.lag():
                    labels = f'{{topic="{lag.topic}",group="{lag.group}"}}'
                    lines.append(f"conveyor_consumer_pending{labels} {lag.pending}")
                    lines.append(f"conveyor_consumer_in_flight{labels} {lag.in_flight}")
        body = REGISTRY.render() + "\n".join(lines) + "\n"
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    return app
