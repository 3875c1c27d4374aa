"""The gateway's FastAPI application: submit, status, stream, cancel, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Annotated, Any, Literal

import orjson
from fastapi import Depends, FastAPI, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.telemetry import TelemetryConfig
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor import spend
from conveyor.callbacks import refusal
from conveyor.errors import UnavailableError
from conveyor.gateway import access
from conveyor.gateway.access import Access
from conveyor.gateway.admission import Admission
from conveyor.gateway.anthropic_api import add_anthropic_routes
from conveyor.gateway.auth import Keys
from conveyor.gateway.backlog import Backlogs
from conveyor.gateway.batch_api import FILES_PATH, add_batch_routes
from conveyor.gateway.core import GatewayCore, GatewayLimits, IdempotencyConflict, Refused
from conveyor.gateway.embeddings_api import add_embeddings_routes
from conveyor.gateway.fastpath import FastPath
from conveyor.gateway.limits import BodySizeLimit, error_body
from conveyor.gateway.openai_api import add_openai_routes
from conveyor.gateway.parallel import ParallelLimit
from conveyor.gateway.quota import TokenQuota
from conveyor.gateway.ratelimit import RateLimiter
from conveyor.gateway.responses_api import add_responses_routes
from conveyor.gateway.sse import request_events, stream_request
from conveyor.gateway.streaming import EventStreamResponse
from conveyor.log.base import EventLog
from conveyor.observability.metrics import REGISTRY
from conveyor.observability.tracing import TraceHeader
from conveyor.payloads import ChatMessage, RequestAccepted, Sampling
from conveyor.store.base import StateStore
from conveyor.view import RequestView

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="The text to generate from.")
    history: list[Turn] = Field(
        default_factory=list,
        max_length=256,
        description="The conversation before the prompt (system instructions, earlier turns): the "
        "model answers the prompt as the next user turn, with its chat template.",
    )
    key: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Partition key: requests with one key are handled in order.",
    )
    max_tokens: int | None = Field(None, ge=1, description="Upper bound on generated tokens.")
    timeout: float | None = Field(None, gt=0, description="Seconds from now after which generation stops.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Opaque data carried to the result.")
    temperature: float = Field(0.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list, max_length=4, description="Text that ends the answer.")
    seed: int | None = Field(
        None,
        ge=-(2**63),
        le=2**63 - 1,
        description="With a temperature above 0: one seed and one prompt give one answer.",
    )
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Lowers tokens already generated.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Lowers tokens by how often they came.")
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] = Field(
        default_factory=dict, description="Added to the logits of these token ids (the model's own)."
    )
    json_schema: dict[str, Any] | None = Field(
        None, description='The answer is JSON text matching this JSON Schema ({"type": "object"}: any).'
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Report each token's log probability (in `token` events and the view's `logprobs`) "
        "and those of this many likeliest alternatives.",
    )
    priority: int = Field(
        0,
        ge=-9,
        le=9,
        description="Lower is served sooner where requests wait for the model (e.g. a slot of the "
        "local model); negative for interactive traffic, positive for background work.",
    )
    model: str | None = Field(
        None,
        min_length=1,
        description="The id of the model to answer (`GET /v1/models` lists them); default: the "
        "deployment's first.",
    )
    callback_url: str | None = Field(
        None,
        max_length=2048,
        description="POST the outcome here once the request has ended (the status API's outcome "
        "fields; signed if the deployment has a secret). Only the hosts the deployment allows.",
    )
    stream: bool = Field(
        False,
        description="Answer with the request's event stream (as `GET /v1/requests/{id}/events` gives it, "
        "from `accepted` with the id) instead of 202: submit and stream in one call.",
    )


_SUBMIT_BODY = {
    "required": True,
    "content": {"application/json": {"schema": SubmitRequest.model_json_schema()}},
}


class Submitted(BaseModel):
    id: str
    status: str
    status_url: str
    stream_url: str


class Account(BaseModel):
    """The caller's tenant, its limits (null: none), and what it used."""

    tenant: str
    month: str = Field(description="The calendar month (UTC) that spent_usd and budget_usd are of.")
    spent_usd: float = Field(description="At the models' prices; 0 where models have none.")
    budget_usd: float | None
    rate_per_second: float | None
    rate_burst: float | None
    tokens_per_minute: int | None
    tokens_last_minute: int | None = Field(description="Counted as used; null without a token limit.")
    max_parallel: int | None
    under_way: int | None = Field(description="Accepted and not ended, through this gateway.")
    models: list[str] | None = Field(description="The models and aliases it may use; null: all served.")


class Waited(RequestView):
    """A submit with ``?wait=``: the request's view as ``GET /v1/requests/{id}`` shows it, and its URLs."""

    status_url: str
    stream_url: str


class ApiError(Exception):
    def __init__(self, http_status: int, code: str, message: str, /, **extra: Any) -> None:
        super().__init__(message)
        self.http_status, self.code, self.message, self.extra = http_status, code, message, extra


def _telemetry() -> TelemetryConfig:
    """FastAPI's OpenTelemetry spans when a tracer provider is set up (``opentelemetry-instrument``
    or the embedding application's own); its metrics and logs never (Conveyor has /metrics and
    its own logs). Left on, FastAPI asks on every request whether a provider exists by now, which
    reads os.environ: ~3 % of the gateway's CPU."""
    tracing = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return {"tracing": tracing, "metrics": False, "logs": False}


def create_app(
    log: EventLog,
    store: StateStore,
    *,
    limits: GatewayLimits = GatewayLimits(),
    models: Sequence[str] = ("simulated",),
    aliases: Mapping[str, Sequence[tuple[str, float]]] | None = None,
    keys: Keys | None = None,
    access_log: bool = False,
    alias_routing: str = "weight",
) -> FastAPI:
    """The gateway: the job API, the OpenAI- and Anthropic-compatible APIs for ``models``, health
    and metrics. With ``access_log``, a line per HTTP call (``gateway/access.py``).

    With ``keys``, every API request needs one of them and belongs to its tenant; ``limits``
    may set a per-tenant rate and a backlog above which submits are refused.
    """
    # With keys, a rate limiter either way: a rate given in the keys file later applies at once (a
    # tenant without a rate costs it nothing). Token and parallel limits watch the store for every
    # request: only if some tenant or a flag has one at start.
    limiter = None
    if limits.rate or keys is not None:
        limiter = RateLimiter(store, default=limits.rate, tenants=keys.rates if keys else {})
    # Admission control and routing an alias by backlog read the same backlogs.
    by_backlog = alias_routing == "backlog" and bool(aliases)
    backlogs = Backlogs(log) if limits.max_backlog is not None or by_backlog else None
    admission = None
    if backlogs is not None and limits.max_backlog is not None:
        admission = Admission(backlogs, max_backlog=limits.max_backlog)
    token_limits = keys.token_limits if keys else {}
    quota = None
    if limits.tokens_per_minute or token_limits:
        quota = TokenQuota(store, default=limits.tokens_per_minute, tenants=token_limits)
    parallel_limits = keys.parallel_limits if keys else {}
    parallel = None
    if limits.max_parallel or parallel_limits:
        parallel = ParallelLimit(store, default=limits.max_parallel, tenants=parallel_limits)
    budgets = None
    if limits.budget or (keys is not None and keys.budgets):
        budgets = spend.Budgets(store, default=limits.budget, tenants=keys.budgets if keys else {})
    core = GatewayCore(
        log,
        store,
        keys=keys,
        limiter=limiter,
        admission=admission,
        quota=quota,
        parallel=parallel,
        budgets=budgets,
        models=models,
        aliases=aliases,
        backlogs=backlogs if by_backlog else None,
    )
    models = [*models, *(aliases or {})]  # what a client may name

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(core.watch.run())]
        if quota is not None:
            tasks.append(asyncio.create_task(quota.run()))
        if parallel is not None:
            tasks.append(asyncio.create_task(parallel.run()))
        if admission is not None:
            await admission.refresh()  # the first submit already meets a known backlog
            tasks.append(asyncio.create_task(admission.run()))
        elif backlogs is not None:
            await backlogs.refresh()
            tasks.append(asyncio.create_task(backlogs.run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(
        title="Conveyor",
        version="0.1.0",
        summary="Event-driven orchestration for real-time generative AI.",
        lifespan=lifespan,
        telemetry=_telemetry(),
    )

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

    @app.exception_handler(Refused)
    async def on_refused(_: Request, exc: Refused) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(UnavailableError)
    async def on_unavailable(_: Request, exc: UnavailableError) -> JSONResponse:
        return JSONResponse(
            error_body("unavailable", str(exc)), status_code=503, headers={"Retry-After": "1"}
        )

    def urls(rid: str) -> dict[str, str]:
        return {"status_url": f"/v1/requests/{rid}", "stream_url": f"/v1/requests/{rid}/events"}

    # A default value, not an Annotated alias: annotations are strings here, and FastAPI
    # resolves them in the module, where a name local to this function does not exist.
    tenant_of_key = Depends(core.tenant_dependency(lambda refused: refused))

    async def view_or_404(rid: str, tenant: str) -> RequestView:
        view = await core.view(rid, tenant=tenant)
        if view is None:
            raise ApiError(404, "not_found", f"no request with id {rid!r}")
        return view

    def event_stream(rid: str, last_id: int, tenant: str) -> EventStreamResponse:
        """The events of a request known to its tenant: ``GET /v1/requests/{id}/events`` (routed, and
        on the fast path), and a submit with ``stream``."""
        return EventStreamResponse(stream_request(core, rid, last_id, tenant=tenant))

    async def accept_submit(
        raw: bytes, tenant: str, idempotency_key: str | None = None, *, wait: float = 0.0
    ) -> Response:
        """``POST /v1/requests`` after authentication: routed, and on the fast path."""
        # Parsed here rather than by the framework: pydantic's JSON parser is several times
        # faster on the hottest endpoint, and a missing Content-Type is no reason to refuse.
        try:
            body = SubmitRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from exc
        if len(body.prompt) + sum(len(t.content) for t in body.history) > limits.max_prompt_chars:
            raise ApiError(422, "prompt_too_long", f"prompt exceeds {limits.max_prompt_chars} characters")
        max_tokens = body.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise ApiError(422, "max_tokens_too_large", f"max_tokens exceeds {limits.max_tokens}")
        if body.stream and wait:
            raise ApiError(422, "invalid_request", "stream and wait exclude each other: use one")
        if body.callback_url is not None and (why := refusal(body.callback_url, limits.callback_hosts)):
            raise ApiError(422, "callback_not_allowed", why)
        turns = [ChatMessage(role=t.role, content=t.content) for t in body.history]
        payload = RequestAccepted(
            prompt=body.prompt,
            max_tokens=max_tokens,
            metadata=body.metadata,
            messages=[*turns, ChatMessage(role="user", content=body.prompt)] if turns else [],
            # The submit's sampling fields are the payload's, by name.
            sampling=Sampling.model_validate(body.model_dump(include=set(Sampling.model_fields))),
        )
        try:
            accepted = await core.accept(
                payload,
                tenant=tenant,
                key=body.key,
                timeout=body.timeout,
                priority=body.priority,
                callback=body.callback_url or "",
                model=body.model or "",
                idempotency_key=idempotency_key,
                # How the answer is delivered is no part of the request.
                fingerprint=body.model_dump(mode="json", exclude={"stream"}) if idempotency_key else None,
                # One call for a short job: the view once it has ended, or as it is by then.
                wait=min(wait, limits.max_wait_seconds),
            )
        except IdempotencyConflict:
            raise ApiError(
                422, "idempotency_key_reused", "this Idempotency-Key was used with a different body"
            ) from None
        if body.stream:
            return event_stream(accepted.id, 0, tenant)
        if (view := accepted.view) is not None:
            waited = orjson.dumps({**view.public(), **urls(accepted.id)})
            return Response(waited, 200 if view.terminal else 202, media_type="application/json")
        content = {"id": accepted.id, "status": accepted.status, **urls(accepted.id)}
        return JSONResponse(content, status_code=200 if accepted.replayed else 202)

    complete = add_openai_routes(app, core, models=models, limits=limits)
    add_anthropic_routes(app, core, models=models, limits=limits)
    add_responses_routes(app, core, models=models, limits=limits)
    add_batch_routes(app, core, models=models, limits=limits)
    add_embeddings_routes(app, core, models=models, limits=limits)
    app.add_middleware(
        FastPath,
        core=core,
        max_wait=limits.max_wait_seconds,
        submit=accept_submit,
        stream=event_stream,
        complete=complete,
        handlers=app.exception_handlers,
    )
    app.add_middleware(
        BodySizeLimit, max_bytes=limits.max_body_bytes, paths={FILES_PATH: limits.max_file_bytes}
    )  # before anything reads
    app.add_middleware(TraceHeader)  # the client's trace is current for all the rest
    app.add_middleware(Access, log=access_log)  # outermost: it times the whole call
    if access_log:  # whatever the process's own level
        logging.getLogger(access.logger.name).setLevel(logging.INFO)

    @app.post(
        "/v1/requests",
        status_code=202,
        response_model=Submitted,
        responses={
            200: {
                "model": Waited | Submitted,
                "description": "With `wait`: the request ended in time (its view). A retry with an "
                "`Idempotency-Key` (without `wait`): the request accepted the first time.",
            }
        },
        tags=["requests"],
        openapi_extra={"requestBody": _SUBMIT_BODY},
    )
    async def submit(
        request: Request,
        tenant: str = tenant_of_key,
        idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
        wait: Annotated[
            float,
            Query(
                ge=0,
                description="Seconds to wait for the request to end: then 200 with its final view "
                "(and the URLs), else 202 with its view as it is by then.",
            ),
        ] = 0,
    ) -> Response:
        """Accept a request: it is durably on the log when this returns 202."""
        return await accept_submit(await request.body(), tenant, idempotency_key, wait=wait)

    @app.get("/v1/requests/{rid}", tags=["requests"], responses={200: {"model": RequestView}})
    async def status(
        rid: str,
        tenant: str = tenant_of_key,
        wait: Annotated[float, Query(ge=0, description="Seconds to wait for a final status.")] = 0,
    ) -> Response:
        """The request's status view. With ``wait``, returns as soon as the request ends."""
        view = await core.wait(rid, min(wait, limits.max_wait_seconds), tenant=tenant)
        if view is None:
            raise ApiError(404, "not_found", f"no request with id {rid!r}")
        return Response(view.public_json(), media_type="application/json")

    @app.get(
        "/v1/requests/{rid}/events", tags=["requests"], response_class=EventStreamResponse, status_code=200
    )
    async def events(
        rid: str,
        tenant: str = tenant_of_key,
        last_event_id: Annotated[str | None, Header()] = None,
        last_id: Annotated[str | None, Query(alias="last_event_id")] = None,
    ) -> EventStreamResponse:
        """Server-Sent Events: progress, ``token`` chunks, then the final status. Resumable."""
        await view_or_404(rid, tenant)
        raw = last_event_id or last_id or "0"
        if not raw.isdigit():
            raise ApiError(400, "invalid_last_event_id", "Last-Event-ID must be an event id from this stream")
        return event_stream(rid, int(raw), tenant)

    @app.websocket("/v1/requests/{rid}/ws")
    async def events_ws(websocket: WebSocket, rid: str, last_event_id: int = 0) -> None:
        """The SSE stream as WebSocket JSON messages ``{"id", "event", "data"}``; send
        ``{"action": "cancel"}`` to cancel the request."""
        try:
            tenant = core.authenticate(websocket.headers)
        except Refused as exc:
            await _deny(websocket, exc)
            return
        await websocket.accept()
        view = await core.view(rid, tenant=tenant)
        if view is None:
            await websocket.close(code=4404, reason=f"no request with id {rid!r}")
            return

        async def listen() -> None:
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    message = await websocket.receive_json()
                    current = await core.view(rid, tenant=tenant)
                    if message.get("action") == "cancel" and current is not None and not current.terminal:
                        await core.cancel(current)

        listener = asyncio.create_task(listen())
        try:
            async with contextlib.aclosing(
                request_events(core, rid, last_event_id, tenant=tenant)
            ) as updates:
                async for events in updates:
                    for event_id, name, data in events or []:
                        await websocket.send_json({"id": event_id, "event": name, "data": data})
            await websocket.close()
        except WebSocketDisconnect:
            pass
        finally:
            listener.cancel()

    @app.delete("/v1/requests/{rid}", tags=["requests"])
    async def cancel(rid: str, tenant: str = tenant_of_key) -> JSONResponse:
        """Cancel: generation stops at its next token. A finished request stays as it is (409)."""
        view = await view_or_404(rid, tenant)
        if view.terminal:
            if view.status == "cancelled":
                return JSONResponse(view.public(), status_code=200)
            raise ApiError(
                409, "already_finished", f"request {rid} is already {view.status}", status=view.status
            )
        await core.cancel(view)
        return JSONResponse({"id": rid, "status": "cancelling"}, status_code=202)

    @app.get("/v1/me", tags=["requests"], response_model=Account)
    async def me(tenant: str = tenant_of_key) -> Account:
        """Who the API key belongs to: its tenant's limits, and what it used of them."""
        now = datetime.datetime.now(datetime.UTC)
        rate = limiter.rate(tenant) if limiter else None
        return Account(
            tenant=tenant,
            month=spend.month(now),
            spent_usd=await spend.spent(store, tenant, now),
            budget_usd=budgets.budget(tenant) if budgets else None,
            rate_per_second=rate.per_second if rate else None,
            rate_burst=rate.burst if rate else None,
            tokens_per_minute=quota.limit(tenant) if quota else None,
            tokens_last_minute=quota.used(tenant) if quota else None,
            max_parallel=parallel.limit(tenant) if parallel else None,
            under_way=parallel.under_way(tenant) if parallel else None,
            models=sorted(allowed) if (allowed := core.may_use(tenant)) is not None else None,
        )

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
                    part = "" if lag.partition is None else f',partition="{lag.partition}"'
                    labels = f'{{topic="{lag.topic}",group="{lag.group}"{part}}}'
                    lines.append(f"conveyor_consumer_pending{labels} {lag.pending}")
                    lines.append(f"conveyor_consumer_in_flight{labels} {lag.in_flight}")
        body = REGISTRY.render() + "\n".join(lines) + "\n"
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    return app


async def _deny(websocket: WebSocket, refused: Refused) -> None:
    """Refuse a WebSocket handshake with the HTTP error where the server can send one."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        response = JSONResponse(
            error_body(refused.code, refused.message), status_code=refused.status, headers=refused.headers
        )
        await websocket.send_denial_response(response)
    else:  # a close before the handshake completes: the client sees a 403
        await websocket.close(code=1008, reason=refused.message)
