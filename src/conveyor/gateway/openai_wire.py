"""How the OpenAI-compatible API writes an answer: whole, or as a stream of chunks.

A chat completion and a (legacy) text completion differ only in shape: ``ChatWire`` and
``TextWire`` write them, and ``stream`` turns a request's events into either's chunks. A client that
drops a stream cancels its request: generation stops within a step and only what was made is billed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any, ClassVar

import orjson

from conveyor.gateway.core import GatewayCore
from conveyor.gateway.sse import request_events
from conveyor.gateway.streaming import Last
from conveyor.payloads import TokenLogprob, Usage
from conveyor.view import TERMINAL, RequestView

_FINISH = {
    "stop": "stop",
    "length": "length",
    "cancelled": "stop",
    "deadline": "length",
    "tool_calls": "tool_calls",
}


def _usage(view: RequestView) -> dict[str, Any]:
    usage = view.usage or Usage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _finish(view: RequestView) -> str:
    return _FINISH.get(view.finish_reason or "stop", "stop")


def _sse(data: dict[str, Any]) -> str:
    return f"data: {orjson.dumps(data).decode()}\n\n"


class Wire:
    """One completion's shapes; ``rid`` is the request's id, ``created`` its time (Unix seconds)."""

    prefix: ClassVar[str]  # of the completion's id
    whole_object: ClassVar[str]
    chunk_object: ClassVar[str]

    def __init__(self, rid: str, model: str, created: int) -> None:
        self.rid, self.model, self.created = rid, model, created

    def _envelope(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": f"{self.prefix}{self.rid}",
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def whole(self, view: RequestView) -> dict[str, Any]:
        """The answer to a request that did not ask for a stream."""
        return self._envelope(self.whole_object, [self.answer(view)], usage=_usage(view))

    def chunk(self, choice: dict[str, Any]) -> str:
        return _sse(self._envelope(self.chunk_object, [choice]))

    def usage(self, view: RequestView) -> str:
        """The chunk with the usage, after the last one, for a stream that asked for it."""
        return _sse(self._envelope(self.chunk_object, [], usage=_usage(view)))

    def head(self) -> str:
        """What the stream starts with (it leaves with the first tokens, in one write)."""
        return ""

    def answer(self, view: RequestView) -> dict[str, Any]:
        raise NotImplementedError

    def piece(self, data: dict[str, Any]) -> str:
        """The chunk of a ``token`` event of the request's stream."""
        raise NotImplementedError

    def ending(self, view: RequestView) -> str:
        """The stream's last chunks before the usage: how it finished."""
        raise NotImplementedError


class ChatWire(Wire):
    prefix, whole_object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    @staticmethod
    def _choice(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}

    def answer(self, view: RequestView) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": view.output or ""}
        if view.tool_calls:
            message = {"role": "assistant", "content": view.output or None, "tool_calls": _tool_calls(view)}
        logprobs = None if view.logprobs is None else _chat_logprobs([e.model_dump() for e in view.logprobs])
        return {"index": 0, "message": message, "finish_reason": _finish(view), "logprobs": logprobs}

    def head(self) -> str:
        return self.chunk(self._choice({"role": "assistant", "content": ""}))

    def piece(self, data: dict[str, Any]) -> str:
        logprobs = _chat_logprobs(data["logprobs"]) if "logprobs" in data else None
        return self.chunk(self._choice({"content": data["text"]}, logprobs=logprobs))

    def ending(self, view: RequestView) -> str:
        last = self.chunk(self._choice({}, _finish(view)))
        if not view.tool_calls:
            return last
        # Whole, in one delta: the models here make a call at once.
        calls = [{"index": i, **call} for i, call in enumerate(_tool_calls(view))]
        return self.chunk(self._choice({"tool_calls": calls})) + last


class TextWire(Wire):
    prefix, whole_object, chunk_object = "cmpl-", "text_completion", "text_completion"

    @staticmethod
    def _choice(text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}

    def answer(self, view: RequestView) -> dict[str, Any]:
        logprobs = None if view.logprobs is None else _text_logprobs(view.logprobs, 0)
        return self._choice(view.output or "", _finish(view), logprobs)

    def piece(self, data: dict[str, Any]) -> str:
        logprobs = None
        if "logprobs" in data:
            logprobs = _text_logprobs([TokenLogprob(**e) for e in data["logprobs"]], data["offset"])
        return self.chunk(self._choice(data["text"], logprobs=logprobs))

    def ending(self, view: RequestView) -> str:
        return self.chunk(self._choice("", _finish(view)))


def _tool_calls(view: RequestView) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in view.tool_calls
    ]


def _chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens' logprobs as chat completions write them, each with its UTF-8 bytes."""

    def weighed(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**weighed(e["token"], e["logprob"]), "top_logprobs": [weighed(**t) for t in e["top_logprobs"]]}
            for e in entries
        ],
        "refusal": None,
    }


def _text_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """Tokens' logprobs as text completions write them: parallel lists, the first token's text at
    character ``offset`` of the answer."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        "text_offset": offsets,
    }


async def stream(
    core: GatewayCore, rid: str, tenant: str, wire: Wire, *, include_usage: bool
) -> AsyncGenerator[str, None]:
    """The request's answer as ``wire``'s chunks, then ``[DONE]``."""
    finished = False
    head = wire.head()
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
                        pieces.append(wire.piece(data))
                    elif kind in TERMINAL:
                        finished = True
                        pieces.append(_ending(wire, kind, data, include_usage))
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


def _ending(wire: Wire, kind: str, data: dict[str, Any], include_usage: bool) -> str:
    """The stream's last chunks: the error, or how it finished and (if asked for) the usage."""
    if kind == "failed":
        failure = data["error"]
        return _sse(
            {"error": {"message": failure["message"], "type": "server_error", "code": failure["code"]}}
        )
    view = RequestView.model_validate(data)
    return wire.ending(view) + (wire.usage(view) if include_usage else "")


_TASKS: set[asyncio.Task[Any]] = set()


def _background(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


async def _quietly(coro: Any) -> Any:
    with contextlib.suppress(Exception):
        return await coro
    return None
