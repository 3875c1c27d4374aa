"""The OpenAI-compatible API: ``POST /v1/chat/completions``, the legacy ``POST /v1/completions``
(each streaming and not) and ``GET /v1/models``.

Every completion goes through the same durable pipeline as ``/v1/requests``: accepted onto
the log, prepared (safety, redaction), generated, finalized with usage recorded once. Errors
use OpenAI's shape, so the official SDKs raise their usual exceptions. How answers are written
is ``conveyor.gateway.wire``'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from conveyor.gateway.core import GatewayCore, GatewayLimits, Refused
from conveyor.gateway.model_request import ModelRequest, given, what_is_wrong
from conveyor.gateway.streaming import EventStreamResponse
from conveyor.gateway.wire import ChatWire, TextWire, Wire, stream
from conveyor.payloads import (
    ChatMessage,
    ContentPart,
    RequestAccepted,
    Sampling,
    Tool,
    ToolCall,
    checked_image_url,
)
from conveyor.view import RequestView

# The gateway's refusals as OpenAI answers them: (type, code); the rest keep their code.
_REFUSALS = {
    "invalid_api_key": ("invalid_request_error", "invalid_api_key"),
    "rate_limited": ("requests", "rate_limit_exceeded"),
    "token_limit": ("tokens", "rate_limit_exceeded"),
    "parallel_limit": ("requests", "rate_limit_exceeded"),
    "budget_exceeded": ("insufficient_quota", "insufficient_quota"),  # what OpenAI says of a spent plan
    "overloaded": ("server_error", "overloaded"),
    "model_not_allowed": ("invalid_request_error", "model_not_allowed"),
}
# The legacy API's default, which its clients rely on (vLLM keeps it too).
TEXT_COMPLETION_MAX_TOKENS = 16
MAX_CHOICES = 16


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: Annotated[str, AfterValidator(checked_image_url)]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


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
    content: str | list[Part] | None = None
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
            return "".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""

    def parts(self) -> list[ContentPart]:
        """The content's parts in order, if it has an image."""
        if not isinstance(self.content, list) or all(isinstance(p, TextPart) for p in self.content):
            return []
        return [
            ContentPart.of_text(p.text)
            if isinstance(p, TextPart)
            else ContentPart.image(p.image_url.url, p.image_url.detail)
            for p in self.content
        ]

    def payload(self) -> ChatMessage:
        calls = [
            ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
            for c in self.tool_calls or []
        ]
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(
            role=role,
            content=self.text(),
            tool_calls=calls,
            tool_call_id=self.tool_call_id,
            parts=self.parts(),
        )


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


M = TypeVar("M", bound=ModelRequest)


class Sampled(ModelRequest):
    """What both completions take."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices: one request each
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # Not OpenAI's: vLLM's extension, with its meaning (lower is served sooner); see SubmitRequest.
    priority: int = Field(0, ge=-9, le=9)

    def asked_max_tokens(self, default: int) -> int:
        return self.max_tokens or default

    def sampling(self, **more: Any) -> Sampling:
        return Sampling(
            temperature=self.temperature or 0.0,
            top_p=self.top_p or 1.0,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias or {},
            **more,
        )


class ChatCompletionRequest(Sampled):
    unsupported = {
        "functions": bool,  # the deprecated form of tools
        "function_call": lambda value: value not in (None, "none"),
        "audio": given,
        "modalities": lambda value: value not in (None, ["text"]),
    }

    messages: list[ChatCompletionMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # the models here make one call at a time either way
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def asked_max_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(Sampled):
    unsupported = {
        "echo": bool,
        "suffix": given,
        "best_of": lambda value: value not in (None, 1),
    }

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)  # how many alternatives, as the legacy API has it

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("give one prompt per request (a list of one is accepted)")
        if not self.text():
            raise ValueError("the prompt is empty")
        return self

    def text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


R = TypeVar("R", bound=Sampled)


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


def validated(kind: type[M], raw: bytes, models: Sequence[str]) -> M:
    """``raw`` as a ``kind`` for one of ``models``; OpenAIError (400, 404) saying what is wrong."""
    try:
        body = kind.model_validate_json(raw)
    except ValidationError as exc:
        where, why = what_is_wrong(exc)
        raise OpenAIError(
            400, f"{where or 'body'}: {why}", code="invalid_request", param=where or None
        ) from exc
    if body.model not in models:
        raise OpenAIError(
            404, f"the model {body.model!r} does not exist; try {list(models)}", code="model_not_found"
        )
    return body


def _request_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}


def add_openai_routes(
    app: FastAPI, core: GatewayCore, *, models: Sequence[str], limits: GatewayLimits
) -> Callable[[Request, str], Awaitable[Response]]:
    """Add the routes; returns the chat completion after authentication, for the fast path too."""

    @app.exception_handler(OpenAIError)
    async def on_openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    tenant_of_key = Depends(core.tenant_dependency(OpenAIError.refused))  # a default: see app.py

    def described(model: str, request: Request) -> dict[str, Any]:
        if request.headers.get("anthropic-version"):  # Anthropic's SDK, listing models its way
            return {"type": "model", "id": model, "display_name": model, "created_at": "1970-01-01T00:00:00Z"}
        return {"id": model, "object": "model", "created": 0, "owned_by": "conveyor"}

    def usable(tenant: str) -> list[str]:
        allowed = core.may_use(tenant)
        return [m for m in models if allowed is None or m in allowed]

    @app.get("/v1/models", tags=["openai", "anthropic"])
    async def list_models(request: Request, tenant: str = tenant_of_key) -> dict[str, Any]:
        """The models this deployment serves that the API key may use (in Anthropic's shape for
        its SDK)."""
        mine = usable(tenant)
        data = [described(m, request) for m in mine]
        if request.headers.get("anthropic-version"):
            first, last = (mine[0], mine[-1]) if mine else (None, None)
            return {"data": data, "has_more": False, "first_id": first, "last_id": last}
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}", tags=["openai", "anthropic"])
    async def retrieve_model(model: str, request: Request, tenant: str = tenant_of_key) -> dict[str, Any]:
        """One model this deployment serves that the API key may use."""
        if model not in usable(tenant):
            raise OpenAIError(
                404, f"the model {model!r} does not exist; try {usable(tenant)}", code="model_not_found"
            )
        return described(model, request)

    async def accept(body: Sampled, payload: RequestAccepted, tenant: str) -> list[str]:
        """The ids of the requests of the ``body.n`` choices, all accepted, or none: a choice
        refused cancels those accepted."""
        if body.n == 1:
            choices = [payload]
        else:  # one request per choice; a seed gives each its own draws, all reproducible
            seed = payload.sampling.seed
            choices = [
                payload.model_copy(
                    update={"sampling": payload.sampling.model_copy(update={"seed": seed + i})}
                )
                if seed is not None
                else payload
                for i in range(body.n)
            ]
        return await accept_all(core, choices, tenant=tenant, priority=body.priority, model=body.model)

    async def answer(body: Sampled, payload: RequestAccepted, wire: type[Wire], tenant: str) -> Response:
        rids = await accept(body, payload, tenant)
        created = int(time.time())
        wires = [wire(rids[0], body.model, created, index) for index in range(len(rids))]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStreamResponse(stream(core, rids, tenant, wires, include_usage=include_usage))
        views = await asyncio.gather(
            *(ended(core, rid, tenant, limits.max_completion_seconds) for rid in rids)
        )
        return JSONResponse(wires[0].whole(views))

    async def chat(request: Request, tenant: str) -> Response:
        body, payload = CHAT.parse(await request.body(), models, limits)
        return await answer(body, payload, CHAT.wire, tenant)

    @app.post(
        "/v1/chat/completions",
        tags=["openai"],
        openapi_extra={"requestBody": _request_body(ChatCompletionRequest)},
    )
    async def chat_completions(request: Request, tenant: str = tenant_of_key) -> Response:
        """OpenAI's chat completion, through the durable pipeline; ``stream`` for SSE chunks."""
        return await chat(request, tenant)

    @app.post(
        "/v1/completions", tags=["openai"], openapi_extra={"requestBody": _request_body(CompletionRequest)}
    )
    async def completions(request: Request, tenant: str = tenant_of_key) -> Response:
        """OpenAI's legacy text completion: the model continues the prompt as it is, without its
        chat template; through the durable pipeline; ``stream`` for SSE chunks."""
        body, payload = TEXT.parse(await request.body(), models, limits)
        return await answer(body, payload, TEXT.wire, tenant)

    return chat


async def accept_all(
    core: GatewayCore, payloads: Sequence[RequestAccepted], *, tenant: str, priority: int = 0, model: str = ""
) -> list[str]:
    """The ids of ``payloads``' requests, all accepted, or none: one refused (OpenAIError) cancels
    those accepted."""
    outcomes = await asyncio.gather(
        *(core.accept(p, tenant=tenant, priority=priority, model=model) for p in payloads),
        return_exceptions=True,
    )
    rids = [outcome.id for outcome in outcomes if not isinstance(outcome, BaseException)]
    failure = next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None)
    if failure is None:
        return rids
    for rid in rids:
        await core.cancel(RequestView(id=rid, tenant=tenant), reason="a request beside it was refused")
    if isinstance(failure, Refused):
        raise OpenAIError.refused(failure) from None
    raise failure


def _check_chat(body: ChatCompletionRequest) -> None:
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


def _json_schema(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """What the answer must match: nothing for text, any object for json_object."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    assert fmt.json_schema is not None  # checked by parse()
    return fmt.json_schema.json_schema


def _chat_payload(body: ChatCompletionRequest, max_tokens: int) -> RequestAccepted:
    _check_chat(body)
    asked, named = body.tool_choice or "auto", None
    if isinstance(asked, NamedToolChoice):
        named = asked.function.name
        asked = "required"
    return RequestAccepted(
        prompt=next(m.text() for m in reversed(body.messages) if m.role == "user"),
        max_tokens=max_tokens,
        messages=[m.payload() for m in body.messages],
        sampling=body.sampling(
            json_schema=_json_schema(body.response_format),
            tools=[Tool(**t.function.model_dump(exclude={"strict"})) for t in body.tools or []],
            tool_choice=asked,
            tool_name=named,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        ),
        metadata={"api": "openai.chat.completions"},
    )


def _text_payload(body: CompletionRequest, max_tokens: int) -> RequestAccepted:
    return RequestAccepted(
        prompt=body.text(),
        max_tokens=max_tokens,
        sampling=body.sampling(logprobs=body.logprobs),
        continuation=True,
        metadata={"api": "openai.completions"},
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint(Generic[R]):
    """One of OpenAI's completion APIs: what it takes, what the pipeline gets, how it answers."""

    path: str
    kind: type[R]
    default_max_tokens: int | None  # None: the gateway's
    payload: Callable[[R, int], RequestAccepted]
    wire: type[Wire]

    def parse(self, raw: bytes, models: Sequence[str], limits: GatewayLimits) -> tuple[R, RequestAccepted]:
        """The request ``raw`` and what goes on the log; OpenAIError (400, 404) if it is not one."""
        body = validated(self.kind, raw, models)
        if (name := body.refused_field()) is not None:
            raise OpenAIError(
                400, f"{name} is not supported by this server", code="unsupported_parameter", param=name
            )
        max_tokens = body.asked_max_tokens(self.default_max_tokens or limits.default_max_tokens)
        if max_tokens > limits.max_tokens:
            raise OpenAIError(
                400, f"max_tokens exceeds {limits.max_tokens}", code="invalid_request", param="max_tokens"
            )
        return body, self.payload(body, max_tokens)


CHAT: Endpoint[ChatCompletionRequest] = Endpoint(
    "/v1/chat/completions", ChatCompletionRequest, None, _chat_payload, ChatWire
)
TEXT: Endpoint[CompletionRequest] = Endpoint(
    "/v1/completions", CompletionRequest, TEXT_COMPLETION_MAX_TOKENS, _text_payload, TextWire
)


# Failures that were the request's own doing, answered 400 with OpenAI's code for them.
_REFUSED = {
    "safety_blocked": "content_policy_violation",
    "context_length_exceeded": "context_length_exceeded",
    "invalid_request": "invalid_request",
}


async def ended(core: GatewayCore, rid: str, tenant: str, seconds: float) -> RequestView:
    """The request's view once it has ended; OpenAIError if it failed or did not end in time."""
    view = await core.wait(rid, seconds, tenant=tenant)
    if view is None or not view.terminal:
        raise OpenAIError(
            504, f"request {rid} did not finish in time; see /v1/requests/{rid}", code="timeout"
        )
    if view.status != "failed":
        return view
    error = view.error
    code = error.code if error else "failed"
    message = error.message if error else "the request failed"
    if code in _REFUSED:
        raise OpenAIError(400, message, code=_REFUSED[code])
    raise OpenAIError(500, message, code=code)
