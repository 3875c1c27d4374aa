"""The OpenAI-compatible API: ``POST /v1/chat/completions`` (streaming and not) and ``GET /v1/models``.

Every completion goes through the same durable pipeline as ``/v1/requests``: accepted onto
the log, prepared (safety, redaction), generated, finalized with usage recorded once. Errors
use OpenAI's shape, so the official SDKs raise their usual exceptions. A client that drops a
streaming completion cancels it: generation stops within a step and only what was made is billed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Annotated, Any, Literal

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from conveyor.gateway.core import GatewayCore, GatewayLimits, Refused
from conveyor.gateway.sse import request_events
from conveyor.gateway.streaming import EventStreamResponse, Last
from conveyor.payloads import ChatMessage, RequestAccepted, Sampling, Tool, ToolCall, Usage
from conveyor.view import TERMINAL, RequestView

_FINISH = {
    "stop": "stop",
    "length": "length",
    "cancelled": "stop",
    "deadline": "length",
    "tool_calls": "tool_calls",
}
# The gateway's refusals as OpenAI answers them: (type, code); the rest keep their code.
_REFUSALS = {
    "invalid_api_key": ("invalid_request_error", "invalid_api_key"),
    "rate_limited": ("requests", "rate_limit_exceeded"),
    "overloaded": ("server_error", "overloaded"),
}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCallMade(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(BaseModel):
    # "developer" is what OpenAI's newer models call the system turn.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallMade] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> ChatCompletionMessage:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def payload(self) -> ChatMessage:
        calls = [
            ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
            for c in self.tool_calls or []
        ]
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=self.text(), tool_calls=calls, tool_call_id=self.tool_call_id)


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "answer"
    json_schema: dict[str, Any] = Field(alias="schema")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(BaseModel):
    # Unknown fields are kept aside and ignored, as OpenAI-compatible servers do, except the
    # features this gateway does not implement (_UNSUPPORTED), which are refused when asked for.
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatCompletionMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # the models here make one call at a time either way
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Not OpenAI's: vLLM's extension, with its meaning (lower is served sooner); see SubmitRequest.
    priority: int = Field(0, ge=-9, le=9)


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    @classmethod
    def refused(cls, refused: Refused) -> OpenAIError:
        kind, code = _REFUSALS.get(refused.code, (None, refused.code))
        return cls(refused.status, refused.message, code=code, kind=kind, headers=refused.headers)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _not_none(value: Any) -> bool:
    return value is not None


# OpenAI's features that no backend here implements, each with what asks for it. Their "off"
# values (an empty list of tools, logprobs false, ...) are accepted, since some
# clients send them always; asking for one is refused rather than answered as if it had not been.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "functions": bool,  # the deprecated form of tools
    "function_call": lambda value: value not in (None, "none"),
    "audio": _not_none,
    "modalities": lambda value: value not in (None, ["text"]),
}


_REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
}


def _usage(view: RequestView) -> dict[str, Any]:
    usage = view.usage or Usage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def add_openai_routes(
    app: FastAPI, core: GatewayCore, *, models: Sequence[str], limits: GatewayLimits
) -> Callable[[Request, str], Awaitable[Response]]:
    """Add the routes; returns the chat completion after authentication, for the fast path too."""

    @app.exception_handler(OpenAIError)
    async def on_openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    tenant_of_key = Depends(core.tenant_dependency(OpenAIError.refused))  # a default: see app.py

    @app.get("/v1/models", tags=["openai"])
    async def list_models(_: str = tenant_of_key) -> dict[str, Any]:
        """The models this deployment serves."""
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "conveyor"} for m in models],
        }

    async def parse(request: Request) -> ChatCompletionRequest:
        try:
            body = ChatCompletionRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise OpenAIError(
                400, f"{param or 'body'}: {first['msg']}", code="invalid_request", param=param
            ) from exc
        if body.model not in models:
            raise OpenAIError(
                404, f"the model {body.model!r} does not exist; try {list(models)}", code="model_not_found"
            )
        if body.n != 1:
            raise OpenAIError(400, "only n=1 is supported", code="invalid_request", param="n")
        for name, value in (body.model_extra or {}).items():
            if name in _UNSUPPORTED and _UNSUPPORTED[name](value):
                raise OpenAIError(
                    400, f"{name} is not supported by this server", code="unsupported_parameter", param=name
                )
        if not any(m.role == "user" for m in body.messages):
            raise OpenAIError(
                400, "messages need at least one user message", code="invalid_request", param="messages"
            )
        _check_tools(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIError(
                400, "top_logprobs needs logprobs: true", code="invalid_request", param="top_logprobs"
            )
        fmt = body.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise OpenAIError(
                400,
                "response_format of type json_schema needs json_schema.schema",
                code="invalid_request",
                param="response_format",
            )
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise OpenAIError(
                400, f"max_tokens exceeds {limits.max_tokens}", code="invalid_request", param="max_tokens"
            )
        return body

    def accepted_payload(body: ChatCompletionRequest) -> RequestAccepted:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        asked, named = body.tool_choice or "auto", None
        if isinstance(asked, NamedToolChoice):
            named = asked.function.name
            asked = "required"
        return RequestAccepted(
            prompt=next(m.text() for m in reversed(body.messages) if m.role == "user"),
            max_tokens=body.max_completion_tokens or body.max_tokens or limits.default_max_tokens,
            messages=[m.payload() for m in body.messages],
            sampling=Sampling(
                temperature=body.temperature or 0.0,
                top_p=body.top_p or 1.0,
                stop=stop,
                seed=body.seed,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                logit_bias=body.logit_bias or {},
                json_schema=_json_schema(body.response_format),
                tools=[Tool(**t.function.model_dump(exclude={"strict"})) for t in body.tools or []],
                tool_choice=asked,
                tool_name=named,
                logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            ),
            metadata={"api": "openai.chat.completions"},
        )

    async def complete(request: Request, tenant: str) -> Response:
        body = await parse(request)
        try:
            accepted = await core.accept(accepted_payload(body), tenant=tenant, priority=body.priority)
        except Refused as exc:
            raise OpenAIError.refused(exc) from None
        rid, created = accepted.id, int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStreamResponse(_stream(core, rid, tenant, body.model, created, include_usage))
        view = await core.wait(rid, limits.max_completion_seconds, tenant=tenant)
        if view is None or not view.terminal:
            raise OpenAIError(
                504, f"request {rid} did not finish in time; see /v1/requests/{rid}", code="timeout"
            )
        _raise_if_failed(view)
        completion = {
            "id": f"chatcmpl-{rid}",
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": _message(view),
                    "finish_reason": _FINISH.get(view.finish_reason or "stop", "stop"),
                    "logprobs": None
                    if view.logprobs is None
                    else _logprobs([e.model_dump() for e in view.logprobs]),
                }
            ],
            "usage": _usage(view),
        }
        return JSONResponse(completion)

    @app.post("/v1/chat/completions", tags=["openai"], openapi_extra={"requestBody": _REQUEST_BODY})
    async def chat_completions(request: Request, tenant: str = tenant_of_key) -> Response:
        """OpenAI's chat completion, through the durable pipeline; ``stream`` for SSE chunks."""
        return await complete(request, tenant)

    return complete


def _check_tools(body: ChatCompletionRequest) -> None:
    names = [tool.function.name for tool in body.tools or []]
    if len(set(names)) < len(names):
        raise OpenAIError(
            400, "tools: two functions have the same name", code="invalid_request", param="tools"
        )
    choice = body.tool_choice
    if choice not in (None, "none") and not names:
        raise OpenAIError(
            400,
            "tool_choice is only allowed when tools are given",
            code="invalid_request",
            param="tool_choice",
        )
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise OpenAIError(
            400,
            f"tool_choice names {choice.function.name!r}, which is not one of the tools",
            code="invalid_request",
            param="tool_choice",
        )


def _tool_calls(view: RequestView) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in view.tool_calls
    ]


def _message(view: RequestView) -> dict[str, Any]:
    if not view.tool_calls:
        return {"role": "assistant", "content": view.output or ""}
    return {"role": "assistant", "content": view.output or None, "tool_calls": _tool_calls(view)}


def _logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens' logprobs as OpenAI writes them, each with its UTF-8 bytes."""

    def weighed(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**weighed(e["token"], e["logprob"]), "top_logprobs": [weighed(**t) for t in e["top_logprobs"]]}
            for e in entries
        ],
        "refusal": None,
    }


def _json_schema(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """What the answer must match: nothing for text, any object for json_object."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    assert fmt.json_schema is not None  # checked by parse()
    return fmt.json_schema.json_schema


def _raise_if_failed(view: RequestView) -> None:
    if view.status != "failed":
        return
    error = view.error
    code = error.code if error else "failed"
    message = error.message if error else "the request failed"
    status = 400 if code == "safety_blocked" else 500
    raise OpenAIError(status, message, code="content_policy_violation" if status == 400 else code)


async def _stream(
    core: GatewayCore, rid: str, tenant: str, model: str, created: int, include_usage: bool
) -> AsyncGenerator[str, None]:
    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        data = {
            "id": f"chatcmpl-{rid}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
        }
        return f"data: {orjson.dumps(data).decode()}\n\n"

    def ending(kind: str, data: dict[str, Any]) -> str:
        """The stream's last chunks: the error, or the finish reason and (if asked for) the usage."""
        if kind == "failed":
            failure = data["error"]
            error = {"message": failure["message"], "type": "server_error", "code": failure["code"]}
            return f"data: {orjson.dumps({'error': error}).decode()}\n\n"
        view = RequestView.model_validate(data)
        last = chunk({}, _FINISH.get(view.finish_reason or "stop", "stop"))
        if view.tool_calls:  # whole, in one delta: the models here make a call at once
            calls = [{"index": i, **call} for i, call in enumerate(_tool_calls(view))]
            last = chunk({"tool_calls": calls}) + last
        if not include_usage:
            return last
        usage = {
            "id": f"chatcmpl-{rid}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": _usage(view),
        }
        return f"{last}data: {orjson.dumps(usage).decode()}\n\n"

    finished = False
    head = chunk({"role": "assistant", "content": ""})  # leaves with the first tokens, in one write
    try:
        updates = request_events(core, rid, 0, tenant=tenant)
        async with contextlib.aclosing(updates):
            async for events in updates:
                if events is None:
                    yield f"{head}: keepalive\n\n"
                    head = ""
                    continue
                pieces = [head]  # the events that came together leave in one write
                for _, kind, data in events:
                    if kind == "token" and data["text"]:
                        logprobs = _logprobs(data["logprobs"]) if "logprobs" in data else None
                        pieces.append(chunk({"content": data["text"]}, logprobs=logprobs))
                    elif kind in TERMINAL:
                        finished = True
                        pieces.append(ending(kind, data))
                        break
                if finished:
                    yield Last("".join(pieces) + "data: [DONE]\n\n")
                    return
                if len(pieces) > 1:
                    yield "".join(pieces)
                    head = ""
        yield Last(f"{head}data: [DONE]\n\n")
    finally:
        if not finished:  # the client went away mid-stream: stop paying for tokens nobody reads
            view = await _quietly(core.view(rid, tenant=tenant))
            if view is not None and not view.terminal:
                _background(core.cancel(view, reason="client disconnected"))


_TASKS: set[asyncio.Task[Any]] = set()


def _background(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


async def _quietly(coro: Any) -> Any:
    with contextlib.suppress(Exception):
        return await coro
    return None
