"""OpenAI's Responses API, ``POST /v1/responses`` (streaming and not), stateless: what OpenAI's newer
clients (the Agents SDK among them) call.

The same durable pipeline as the other APIs. ``input`` (text, or messages, function calls and their
outputs), ``instructions``, ``tools`` and ``tool_choice``, ``text.format`` and the sampling fields
become the pipeline's request; the answer is a response whose ``output`` holds the message and any
function calls, streamed as Responses events (``response.created`` … ``response.output_text.delta``
… ``response.completed``). ``background`` answers at once with a queued response, which
``GET /v1/responses/{id}`` reads as it goes (from the request's status view) and
``POST /v1/responses/{id}/cancel`` cancels: the durable job the pipeline runs anyway. Nothing is
kept to continue from: ``previous_response_id`` is refused, and a conversation is sent whole, as
``input``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from conveyor.gateway.core import GatewayCore, GatewayLimits, Refused
from conveyor.gateway.model_request import ModelRequest, given
from conveyor.gateway.openai_api import OpenAIError, ended, validated
from conveyor.gateway.streaming import EventStreamResponse
from conveyor.gateway.wire import Wire, stream
from conveyor.payloads import ChatMessage, ContentPart, RequestAccepted, Sampling, Tool, ToolCall, Usage
from conveyor.view import RequestView


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    name: str = "answer"
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat | None = None


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class FunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class ResponsesRequest(ModelRequest):
    # Refused: what needs a state this server does not keep, or a feature it does not have.
    unsupported = {
        "previous_response_id": given,
        "reasoning": given,
        "conversation": given,
        "prompt": given,
    }

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    # Answered at once with a queued response; GET /v1/responses/{id} tells how it goes.
    background: bool = False


def _turns(body: ResponsesRequest) -> list[ChatMessage]:
    """The conversation of ``input`` (after ``instructions``) as the pipeline's turns; ValueError
    naming the item that is not one of the kinds taken here."""
    turns = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    if isinstance(body.input, str):
        return [*turns, ChatMessage(role="user", content=body.input)]
    for i, item in enumerate(body.input):
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") in ("user", "assistant", "system", "developer"):
            content, parts = item.get("content", ""), []
            if not isinstance(content, str):
                parts = [_part(part, f"input.{i}") for part in content]
                content = "".join(part.text for part in parts)
            role = "system" if item["role"] == "developer" else item["role"]
            images = parts if any(part.type == "image" for part in parts) else []
            turns.append(ChatMessage.model_validate({"role": role, "content": content, "parts": images}))
        elif kind == "function_call":
            call = ToolCall(id=item["call_id"], name=item["name"], arguments=item.get("arguments", "{}"))
            turns.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif kind == "function_call_output":
            output = item.get("output", "")
            turns.append(ChatMessage(role="tool", content=str(output), tool_call_id=item["call_id"]))
        else:
            raise ValueError(f"input.{i}: items of type {kind!r} are not taken here")
    return turns


def _part(part: dict[str, Any], where: str) -> ContentPart:
    """A content part of an input message: text, or an image by URL (ValueError otherwise)."""
    kind = part.get("type")
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return ContentPart.of_text(part["text"])
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        return ContentPart.image(part["image_url"], part.get("detail"))
    raise ValueError(f"{where}: only text and images by URL (input_image.image_url) are taken here")


def _payload(body: ResponsesRequest, max_tokens: int) -> RequestAccepted:
    try:
        turns = _turns(body)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"input: an item lacks {exc}") from exc
    if not any(t.role == "user" for t in turns):
        raise ValueError("input: needs a user message")
    choice, named = body.tool_choice or "auto", None
    if isinstance(choice, FunctionChoice):
        named, choice = choice.name, "required"
    fmt = body.text.format if body.text else None
    schema = None
    if fmt is not None and fmt.type == "json_object":
        schema = {"type": "object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise ValueError("text.format: json_schema needs its schema")
        schema = fmt.schema_
    tools = [
        Tool(
            name=t.name,
            description=t.description or "",
            **({"parameters": t.parameters} if t.parameters else {}),
        )
        for t in body.tools or []
    ]
    names = [t.name for t in tools]
    if choice != "none" and body.tool_choice is not None and not names:
        raise ValueError("tool_choice: only allowed when tools are given")
    if named is not None and named not in names:
        raise ValueError(f"tool_choice: names {named!r}, which is not one of the tools")
    return RequestAccepted(
        prompt=next(t.content for t in reversed(turns) if t.role == "user"),
        max_tokens=max_tokens,
        messages=turns,
        sampling=Sampling(
            temperature=body.temperature or 0.0,
            top_p=body.top_p or 1.0,
            json_schema=schema,
            tools=tools,
            tool_choice=choice,
            tool_name=named,
        ),
        metadata={"api": "openai.responses"},
    )


class ResponsesWire(Wire):
    """A response and its stream of events. One per response: a stream numbers its events and
    keeps the text it sent, which its last events repeat."""

    prefix, whole_object, chunk_object = "resp_", "response", "response"
    done = ""  # the stream ends with response.completed

    def __init__(self, rid: str, model: str, created: int, echo: dict[str, Any]) -> None:
        super().__init__(rid, model, created)
        self.echo, self.sequence, self.text = echo, 0, ""

    def _event(self, kind: str, **data: Any) -> str:
        self.sequence += 1
        body = {"type": kind, "sequence_number": self.sequence, **data}
        return f"event: {kind}\ndata: {orjson.dumps(body).decode()}\n\n"

    def _message(self, text: str | None) -> dict[str, Any]:
        done = text is not None
        content: list[dict[str, Any]] = []
        if done:
            content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        status = "completed" if done else "in_progress"
        return {
            "type": "message",
            "id": f"msg_{self.rid}",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _response(
        self, view: RequestView | None, text: str | None = None, status: str = "in_progress"
    ) -> dict[str, Any]:
        """The response as ``view`` has it (None: just begun, in ``status``); an ended one with its
        output (``text``, if given, as its message's)."""
        usage = view.usage if view is not None and view.usage is not None else Usage()
        incomplete, error = None, None
        output: list[dict[str, Any]] = []
        if view is not None:
            status = _status(view)
            if status == "incomplete":
                incomplete = {"reason": "max_output_tokens"}
            if status == "failed" and view.error is not None:
                error = {"code": view.error.code, "message": view.error.message}
        if view is not None and view.status in ("completed", "cancelled"):
            said = view.output if text is None else text
            output = [self._message(said)] if said or not view.tool_calls else []
            output += [_function_call(call) for call in view.tool_calls]
        return {
            "id": f"{self.prefix}{self.rid}",
            "object": "response",
            "created_at": self.created,
            "model": self.model,
            "status": status,
            "output": output,
            "incomplete_details": incomplete,
            "error": error,
            "usage": {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens,
            },
            **self.echo,
        }

    def whole(self, views: list[RequestView]) -> dict[str, Any]:
        (view,) = views
        return self._response(view)

    def queued(self) -> dict[str, Any]:
        """A background response, just accepted."""
        return self._response(None, status="queued")

    def answer(self, view: RequestView) -> dict[str, Any]:
        """The response as ``view`` has it: ended, or (a background one) as it goes."""
        return self._response(view)

    def usage(self, views: list[RequestView]) -> str:
        return ""  # in response.completed

    def head(self) -> str:
        part = {"type": "output_text", "text": "", "annotations": []}
        return "".join(
            [
                self._event("response.created", response=self._response(None)),
                self._event("response.in_progress", response=self._response(None)),
                self._event("response.output_item.added", output_index=0, item=self._message(None)),
                self._event(
                    "response.content_part.added",
                    item_id=f"msg_{self.rid}",
                    output_index=0,
                    content_index=0,
                    part=part,
                ),
            ]
        )

    def piece(self, data: dict[str, Any]) -> str:
        self.text += data["text"]
        return self._event(
            "response.output_text.delta",
            item_id=f"msg_{self.rid}",
            output_index=0,
            content_index=0,
            delta=data["text"],
            logprobs=[],
        )

    def ending(self, view: RequestView) -> str:
        item = self._message(self.text)
        where = {"item_id": item["id"], "output_index": 0}
        out = [
            self._event("response.output_text.done", **where, content_index=0, text=self.text, logprobs=[]),
            self._event("response.content_part.done", **where, content_index=0, part=item["content"][0]),
            self._event("response.output_item.done", output_index=0, item=item),
        ]
        for index, call in enumerate(view.tool_calls, start=1):  # whole, as the models here make them
            made = _function_call(call)
            out.append(
                self._event("response.output_item.added", output_index=index, item={**made, "arguments": ""})
            )
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=made["id"],
                    output_index=index,
                    arguments=call.arguments,
                )
            )
            out.append(self._event("response.output_item.done", output_index=index, item=made))
        out.append(self._event("response.completed", response=self._response(view, self.text)))
        return "".join(out)

    def failure(self, error: dict[str, Any]) -> str:
        return self._event("error", code=error["code"], message=error["message"], param=None)


def _status(view: RequestView) -> str:
    """The Responses API's status of a request as ``view`` has it."""
    if view.status in ("accepted", "prepared"):
        return "queued"
    if view.status == "generating":
        return "in_progress"
    if view.status in ("failed", "cancelled"):
        return view.status
    return "incomplete" if view.finish_reason in ("length", "deadline") else "completed"


def _echoed(choice: str | FunctionChoice | None) -> Any:
    return choice.model_dump() if isinstance(choice, FunctionChoice) else choice or "auto"


def _function_call(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{call.id}",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": "completed",
    }


def add_responses_routes(
    app: FastAPI, core: GatewayCore, *, models: Sequence[str], limits: GatewayLimits
) -> None:
    """Add ``POST /v1/responses`` (errors in OpenAI's shape, by the OpenAI API's handler)."""
    tenant_of_key = Depends(core.tenant_dependency(OpenAIError.refused))
    schema = {"content": {"application/json": {"schema": ResponsesRequest.model_json_schema()}}}

    @app.post("/v1/responses", tags=["openai"], openapi_extra={"requestBody": {"required": True, **schema}})
    async def responses(request: Request, tenant: str = tenant_of_key) -> Response:
        """OpenAI's Responses API, stateless, through the durable pipeline; ``stream`` for its events."""
        body, payload = _parse(await request.body(), models, limits)
        try:
            accepted = await core.accept(payload, tenant=tenant, model=body.model)
        except Refused as exc:
            raise OpenAIError.refused(exc) from None
        echo = {
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "parallel_tool_calls": bool(body.parallel_tool_calls),
            "tool_choice": _echoed(body.tool_choice),
            "tools": [t.model_dump() for t in body.tools or []],
        }
        wire = ResponsesWire(accepted.id, body.model, int(time.time()), echo)
        if body.background:
            return JSONResponse(wire.queued())
        if body.stream:
            return EventStreamResponse(stream(core, [accepted.id], tenant, [wire], include_usage=False))
        view = await ended(core, accepted.id, tenant, limits.max_completion_seconds)
        return JSONResponse(wire.whole([view]))

    async def found(response_id: str, tenant: str) -> tuple[RequestView, ResponsesWire]:
        rid = response_id.removeprefix(ResponsesWire.prefix)
        view = await core.view(rid, tenant=tenant)
        if view is None:
            raise OpenAIError(404, f"no response {response_id!r}", code="not_found", param="response_id")
        accepted = view.stages.get("gateway", {}).get("accepted_at", "")
        created = int(datetime.fromisoformat(accepted).timestamp()) if accepted else 0
        echo = {"parallel_tool_calls": False, "tool_choice": "auto", "tools": []}  # not kept
        return view, ResponsesWire(rid, view.model or "", created, echo)

    @app.get("/v1/responses/{response_id}", tags=["openai"])
    async def retrieve(response_id: str, tenant: str = tenant_of_key) -> JSONResponse:
        """A response as it is now: a background one queued, in progress, or ended with its output."""
        view, wire = await found(response_id, tenant)
        return JSONResponse(wire.answer(view))

    @app.post("/v1/responses/{response_id}/cancel", tags=["openai"])
    async def cancel(response_id: str, tenant: str = tenant_of_key) -> JSONResponse:
        """Cancel a response: its generation stops at its next token; one ended stays as it was."""
        view, wire = await found(response_id, tenant)
        if not view.terminal:
            await core.cancel(view)
        return JSONResponse(wire.answer(view))


def _parse(
    raw: bytes, models: Sequence[str], limits: GatewayLimits
) -> tuple[ResponsesRequest, RequestAccepted]:
    body = validated(ResponsesRequest, raw, models)
    if (name := body.refused_field()) is not None:
        raise OpenAIError(
            400, f"{name} is not supported by this server", code="unsupported_parameter", param=name
        )
    if body.background and body.stream:
        raise OpenAIError(
            400,
            "background with stream is not supported: retrieve the response instead",
            code="invalid_request",
            param="stream",
        )
    max_tokens = body.max_output_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise OpenAIError(
            400,
            f"max_output_tokens exceeds {limits.max_tokens}",
            code="invalid_request",
            param="max_output_tokens",
        )
    try:
        return body, _payload(body, max_tokens)
    except ValueError as exc:
        raise OpenAIError(400, str(exc), code="invalid_request", param=str(exc).split(":")[0]) from exc
