"""The Anthropic-compatible API: ``POST /v1/messages`` (streaming and not), for clients written
against Anthropic's SDK or its Messages API.

The same durable pipeline as the other APIs. A conversation's ``system`` becomes the system turn,
``tool_use`` and ``tool_result`` blocks the calls and results of the OpenAI API, ``tools`` and
``tool_choice`` their equivalents; a streamed answer is Anthropic's sequence of events
(``message_start``, a content block of text deltas, ``message_delta`` with the stop reason and usage,
``message_stop``). Errors come in Anthropic's shape, so its SDK raises its usual exceptions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError, model_validator

from conveyor.gateway.core import GatewayCore, GatewayLimits, Refused
from conveyor.gateway.model_request import ModelRequest, given, what_is_wrong
from conveyor.gateway.streaming import EventStreamResponse
from conveyor.gateway.wire import Wire, stream
from conveyor.payloads import ChatMessage, ContentPart, RequestAccepted, Sampling, Tool, ToolCall
from conveyor.view import RequestView

_CHOICES: dict[str, Literal["auto", "none", "required"]] = {
    "auto": "auto",
    "any": "required",
    "tool": "required",
    "none": "none",
}
_STOP = {"stop": "end_turn", "length": "max_tokens", "deadline": "max_tokens", "tool_calls": "tool_use"}
# Conveyor's codes as Anthropic's error types; the rest are api_error (500).
_ERRORS = {
    "invalid_api_key": "authentication_error",
    "rate_limited": "rate_limit_error",
    "token_limit": "rate_limit_error",
    "parallel_limit": "rate_limit_error",
    "budget_exceeded": "rate_limit_error",
    "overloaded": "overloaded_error",
    "safety_blocked": "invalid_request_error",
    "context_length_exceeded": "invalid_request_error",
    "invalid_request": "invalid_request_error",
    "not_found": "not_found_error",
    "model_not_allowed": "permission_error",
}


class AnthropicError(Exception):
    def __init__(
        self, status: int, kind: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers

    @classmethod
    def refused(cls, refused: Refused) -> AnthropicError:
        kind = _ERRORS.get(refused.code, "api_error")
        return cls(refused.status, kind, refused.message, headers=refused.headers)

    def response(self) -> JSONResponse:
        body = {"type": "error", "error": {"type": self.kind, "message": self.message}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class ImageSource(BaseModel):
    type: Literal["base64", "url"]
    media_type: str = ""
    data: str = ""
    url: str = ""


class ImageBlock(BaseModel):
    type: Literal["image"]
    source: ImageSource

    @model_validator(mode="after")
    def _usable(self) -> ImageBlock:
        self.part()  # a bad source is the client's error now, not the model's later
        return self

    def part(self) -> ContentPart:
        source = self.source
        if source.type == "url":
            return ContentPart.image(source.url)
        return ContentPart.image(f"data:{source.media_type};base64,{source.data}")


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ImageBlock, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    def turns(self) -> list[ChatMessage]:
        """This message as the pipeline's turns: its tool results become tool turns of their own."""
        if isinstance(self.content, str):
            return [ChatMessage(role=self.role, content=self.content)]
        blocks = self.content
        results = [
            ChatMessage(role="tool", content=b.text(), tool_call_id=b.tool_use_id)
            for b in blocks
            if isinstance(b, ToolResultBlock)
        ]
        text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
        calls = [
            ToolCall(id=b.id, name=b.name, arguments=orjson.dumps(b.input).decode())
            for b in blocks
            if isinstance(b, ToolUseBlock)
        ]
        parts = [
            ContentPart.of_text(b.text) if isinstance(b, TextBlock) else b.part()
            for b in blocks
            if isinstance(b, TextBlock | ImageBlock)
        ]
        if not any(isinstance(b, ImageBlock) for b in blocks):
            parts = []
        said = [ChatMessage(role=self.role, content=text, tool_calls=calls, parts=parts)]
        said = said if text or calls or parts else []
        return results + said


class ToolDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    input_schema: dict[str, Any]


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class MessagesRequest(ModelRequest):
    unsupported = {
        "top_k": given,
        "thinking": lambda value: value not in (None, {"type": "disabled"}),
    }

    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None

    def payload(self) -> RequestAccepted:
        system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system or [])
        turns = [ChatMessage(role="system", content=system)] if system else []
        for message in self.messages:
            turns += message.turns()
        choice = self.tool_choice or ToolChoice(type="auto")
        return RequestAccepted(
            prompt=next((t.content for t in reversed(turns) if t.role == "user"), ""),
            max_tokens=self.max_tokens,
            messages=turns,
            sampling=Sampling(
                temperature=self.temperature or 0.0,
                top_p=self.top_p or 1.0,
                stop=self.stop_sequences or [],
                tools=[
                    Tool(name=t.name, description=t.description, parameters=t.input_schema)
                    for t in self.tools or []
                ],
                tool_choice=_CHOICES[choice.type],
                tool_name=choice.name if choice.type == "tool" else None,
            ),
            metadata={"api": "anthropic.messages"},
        )


class MessagesWire(Wire):
    """A message and its stream of events, as Anthropic writes them."""

    prefix, whole_object, chunk_object = "msg_", "message", "message"
    done = ""  # the stream ends with message_stop

    def _message(self, view: RequestView | None) -> dict[str, Any]:
        usage = view.usage if view is not None else None
        return {
            "id": f"{self.prefix}{self.rid}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None if view is None else _STOP.get(view.finish_reason or "stop", "end_turn"),
            "stop_sequence": None,
            "usage": {
                "input_tokens": usage.prompt_tokens if usage else 0,
                "output_tokens": usage.completion_tokens if usage else 0,
                "cache_read_input_tokens": usage.cached_tokens if usage else 0,
            },
        }

    def whole(self, views: list[RequestView]) -> dict[str, Any]:
        (view,) = views
        return {**self._message(view), **self.answer(view)}

    def answer(self, view: RequestView) -> dict[str, Any]:
        text = [{"type": "text", "text": view.output}] if view.output or not view.tool_calls else []
        return {"content": text + [_tool_use(call) for call in view.tool_calls]}

    def usage(self, views: list[RequestView]) -> str:
        return ""  # in message_delta

    def head(self) -> str:
        start = _event("message_start", {"type": "message_start", "message": self._message(None)})
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        return start + _event("content_block_start", block)

    def piece(self, data: dict[str, Any]) -> str:
        delta = {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": data["text"]},
        }
        return _event("content_block_delta", delta)

    def ending(self, view: RequestView) -> str:
        out = [_event("content_block_stop", {"type": "content_block_stop", "index": 0})]
        for index, call in enumerate(view.tool_calls, start=1):  # whole, as the models here make them
            use = {**_tool_use(call), "input": {}}
            out.append(
                _event(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": use},
                )
            )
            arguments = {"type": "input_json_delta", "partial_json": call.arguments}
            out.append(
                _event(
                    "content_block_delta", {"type": "content_block_delta", "index": index, "delta": arguments}
                )
            )
            out.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        message = self._message(view)
        stopped = {"stop_reason": message["stop_reason"], "stop_sequence": None}
        out.append(
            _event("message_delta", {"type": "message_delta", "delta": stopped, "usage": message["usage"]})
        )
        out.append(_event("message_stop", {"type": "message_stop"}))
        return "".join(out)

    def failure(self, error: dict[str, Any]) -> str:
        kind = _ERRORS.get(error["code"], "api_error")
        return _event("error", {"type": "error", "error": {"type": kind, "message": error["message"]}})


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {orjson.dumps(data).decode()}\n\n"


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": orjson.loads(call.arguments)}


def add_anthropic_routes(
    app: FastAPI, core: GatewayCore, *, models: Sequence[str], limits: GatewayLimits
) -> None:
    @app.exception_handler(AnthropicError)
    async def on_anthropic_error(_: Request, exc: AnthropicError) -> JSONResponse:
        return exc.response()

    tenant_of_key = Depends(core.tenant_dependency(AnthropicError.refused))

    schema = {"content": {"application/json": {"schema": MessagesRequest.model_json_schema()}}}

    @app.post("/v1/messages", tags=["anthropic"], openapi_extra={"requestBody": {"required": True, **schema}})
    async def messages(request: Request, tenant: str = tenant_of_key) -> Response:
        """Anthropic's Messages API, through the durable pipeline; ``stream`` for its events."""
        body = _parse(await request.body(), models, limits)
        try:
            accepted = await core.accept(body.payload(), tenant=tenant, model=body.model)
        except Refused as exc:
            raise AnthropicError.refused(exc) from None
        wire = MessagesWire(accepted.id, body.model, int(time.time()))
        if body.stream:
            return EventStreamResponse(stream(core, [accepted.id], tenant, [wire], include_usage=False))
        view = await core.wait(accepted.id, limits.max_completion_seconds, tenant=tenant)
        if view is None or not view.terminal:
            raise AnthropicError(504, "api_error", f"request {accepted.id} did not finish in time")
        if view.status == "failed":
            code = view.error.code if view.error else "failed"
            message = view.error.message if view.error else "the request failed"
            kind = _ERRORS.get(code, "api_error")
            raise AnthropicError(400 if kind == "invalid_request_error" else 500, kind, message)
        return JSONResponse(wire.whole([view]))


def _parse(raw: bytes, models: Sequence[str], limits: GatewayLimits) -> MessagesRequest:
    try:
        body = MessagesRequest.model_validate_json(raw)
    except ValidationError as exc:
        where, why = what_is_wrong(exc)
        raise AnthropicError(400, "invalid_request_error", f"{where or 'body'}: {why}") from exc
    if body.model not in models:
        raise AnthropicError(
            404, "not_found_error", f"model: {body.model!r} does not exist; try {list(models)}"
        )
    if (name := body.refused_field()) is not None:
        raise AnthropicError(400, "invalid_request_error", f"{name}: not supported by this server")
    if body.max_tokens > limits.max_tokens:
        raise AnthropicError(400, "invalid_request_error", f"max_tokens: exceeds {limits.max_tokens}")
    if not any(m.role == "user" for m in body.messages):
        raise AnthropicError(400, "invalid_request_error", "messages: need at least one user message")
    tool_names = {t.name for t in body.tools or []}
    choice = body.tool_choice
    if choice is not None and choice.type == "tool" and choice.name not in tool_names:
        raise AnthropicError(400, "invalid_request_error", "tool_choice: names no tool of tools")
    if choice is not None and choice.type in ("any", "tool") and not tool_names:
        raise AnthropicError(400, "invalid_request_error", "tool_choice: needs tools")
    return body
