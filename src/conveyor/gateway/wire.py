"""How the model APIs write an answer: whole, or as a stream of chunks.

The APIs differ only in shape: ``ChatWire`` and ``TextWire`` write OpenAI's chat and (legacy) text
completions, ``conveyor.gateway.anthropic_api.MessagesWire`` Anthropic's messages, and ``stream``
turns a request's events into any of them. A client that drops a stream cancels its request:
generation stops within a step and only what was made is billed.
"""

from __future__ import annotations

import abc
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


def _usage(views: list[RequestView]) -> dict[str, Any]:
    """What the choices' requests cost together (each read the prompt: each is billed for it)."""
    usages = [view.usage or Usage() for view in views]
    prompt, completion = sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in usages)},
    }


def _finish(view: RequestView) -> str:
    return _FINISH.get(view.finish_reason or "stop", "stop")


def _sse(data: dict[str, Any]) -> str:
    return f"data: {orjson.dumps(data).decode()}\n\n"


class Wire(abc.ABC):
    """The shapes of choice ``index`` of a completion named after request ``rid`` (its first
    choice's), made at ``created`` (Unix seconds)."""

    prefix: ClassVar[str]  # of the completion's id
    whole_object: ClassVar[str]
    chunk_object: ClassVar[str]
    done: ClassVar[str] = "data: [DONE]\n\n"  # what ends the stream

    def __init__(self, rid: str, model: str, created: int, index: int = 0) -> None:
        self.rid, self.model, self.created, self.index = rid, model, created, index

    def _envelope(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": f"{self.prefix}{self.rid}",
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def whole(self, views: list[RequestView]) -> dict[str, Any]:
        """The completion, for a client that did not ask for a stream: choice i as ``views[i]``
        ended, and what all cost."""
        answers = [{**self.answer(view), "index": i} for i, view in enumerate(views)]
        return self._envelope(self.whole_object, answers, usage=_usage(views))

    def chunk(self, choice: dict[str, Any]) -> str:
        return _sse(self._envelope(self.chunk_object, [choice]))

    def usage(self, views: list[RequestView]) -> str:
        """The chunk with the usage of all choices, after the last one, for a stream that asked for it."""
        return _sse(self._envelope(self.chunk_object, [], usage=_usage(views)))

    def head(self) -> str:
        """What the stream starts with (it leaves with the first tokens, in one write)."""
        return ""

    @abc.abstractmethod
    def answer(self, view: RequestView) -> dict[str, Any]:
        """This choice, finished, in the whole completion."""

    @abc.abstractmethod
    def piece(self, data: dict[str, Any]) -> str:
        """The chunk of a ``token`` event of the request's stream."""

    @abc.abstractmethod
    def ending(self, view: RequestView) -> str:
        """The stream's last chunks before the usage: how it finished."""

    def failure(self, error: dict[str, Any]) -> str:
        """The stream's last chunk when the request failed (``error``: the view's)."""
        return _sse({"error": {"message": error["message"], "type": "server_error", "code": error["code"]}})


class ChatWire(Wire):
    prefix, whole_object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def _choice(
        self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        return {"index": self.index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}

    def answer(self, view: RequestView) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": view.output or ""}
        if view.tool_calls:
            message = {"role": "assistant", "content": view.output or None, "tool_calls": _tool_calls(view)}
        logprobs = None if view.logprobs is None else _chat_logprobs([e.model_dump() for e in view.logprobs])
        return {"index": self.index, "message": message, "finish_reason": _finish(view), "logprobs": logprobs}

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

    def _choice(self, text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {"index": self.index, "text": text, "finish_reason": finish, "logprobs": logprobs}

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


class _Choice:
    """One request of a completion, as its choice ``wire.index``: its chunks as they come; at its
    end, the last of them in ``last`` (to leave with the end of the stream) and its ``view``."""

    def __init__(self, core: GatewayCore, rid: str, tenant: str, wire: Wire) -> None:
        self.core, self.rid, self.tenant, self.wire = core, rid, tenant, wire
        self.last: str | None = None
        self.view: RequestView | None = None  # None at the end: it failed (``last`` says how)

    async def chunks(self) -> AsyncGenerator[str, None]:
        head = self.wire.head()
        updates = request_events(self.core, self.rid, 0, tenant=self.tenant)
        async with contextlib.aclosing(updates):
            async for events in updates:
                if events is None:
                    yield f"{head}: keepalive\n\n"
                    head = ""
                    continue
                pieces = [head]  # the events that came together leave in one write
                for _, kind, data in events:
                    if kind == "token" and data["text"]:
                        pieces.append(self.wire.piece(data))
                    elif kind in TERMINAL:
                        self.last = "".join(pieces) + self._ending(kind, data)
                        return
                if len(pieces) > 1:
                    yield "".join(pieces)
                    head = ""
        self.last = head

    def _ending(self, kind: str, data: dict[str, Any]) -> str:
        if kind == "failed":
            return self.wire.failure(data["error"])
        self.view = RequestView.model_validate(data)
        return self.wire.ending(self.view)


async def stream(
    core: GatewayCore, rids: list[str], tenant: str, wires: list[Wire], *, include_usage: bool
) -> AsyncGenerator[str, None]:
    """The answer of a completion of ``len(rids)`` choices (one request each) as ``wires``' chunks,
    each choice's as they come, then the usage of all (if asked for) and the wire's end."""
    choices = [_Choice(core, rid, tenant, wire) for rid, wire in zip(rids, wires, strict=True)]
    try:
        if len(choices) == 1:
            async for chunk in choices[0].chunks():
                yield chunk
        else:
            async for chunk in _merged(choices):
                yield chunk
        ended = [c.view for c in choices]
        usage = ""
        if include_usage and all(view is not None for view in ended):
            usage = wires[0].usage([view for view in ended if view is not None])
        yield Last("".join(c.last or "" for c in choices) + usage + wires[0].done)
    finally:
        for choice in choices:
            if choice.last is None:  # the client went away mid-stream: stop paying for tokens nobody reads
                view = await _quietly(core.view(choice.rid, tenant=tenant))
                if view is not None and not view.terminal:
                    _background(core.cancel(view, reason="client disconnected"))


async def _merged(choices: list[_Choice]) -> AsyncGenerator[str, None]:
    """The chunks of all ``choices`` as they come; the choices that failed end all of them."""
    queue: asyncio.Queue[str | Exception | None] = asyncio.Queue()

    async def pump(choice: _Choice) -> None:
        try:
            async for chunk in choice.chunks():
                queue.put_nowait(chunk)
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is not None:
                yield item
                continue
            running -= 1
            if any(c.last is not None and c.view is None for c in choices):
                return  # one failed: its error is the stream's end, the others are cancelled
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_TASKS: set[asyncio.Task[Any]] = set()


def _background(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


async def _quietly(coro: Any) -> Any:
    with contextlib.suppress(Exception):
        return await coro
    return None
