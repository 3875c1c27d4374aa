"""Tool calling for models that have none of their own: the tools in the prompt, a call as JSON.

The local and the simulated model know nothing of tools. ``PromptedTools`` describes them to the
model in the system turn and reads a call from its answer, ``{"name": ..., "arguments": {...}}``.
When a call is required (``tool_choice`` "required", or a function named) the answer is held to
that shape by ``json_schema`` (the local engine's grammar), so it always parses. With "auto" the
model chooses: an answer that starts with ``{`` is held back to its end and is a call if it reads
as one of the tools', text otherwise; any other answer streams as it comes. OpenAI-compatible
upstreams call tools themselves and are given them as they came.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import orjson

from conveyor.errors import RejectedError
from conveyor.models.base import Embedder, Embedding, GenerationRequest, ModelBackend, ModelInfo, Token
from conveyor.payloads import ChatMessage, TokenLogprob, Tool, ToolCall


class PromptedTools:
    """``model`` with tool calling (a ModelBackend); requests without tools go straight to it."""

    def __init__(self, model: ModelBackend) -> None:
        self.model = model

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    def count_tokens(self, text: str) -> int:
        return self.model.count_tokens(text)

    def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        if not any(_calls_allowed(r) for r in requests):
            return self.model.generate(requests)
        return self._generate([_Answer(r) for r in requests])

    async def _generate(self, answers: Sequence[_Answer]) -> AsyncGenerator[Token, None]:
        by_id = {answer.id: answer for answer in answers}
        async with contextlib.aclosing(self.model.generate([a.request for a in answers])) as tokens:
            async for token in tokens:
                for out in by_id[token.request_id].take(token):
                    yield out

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        """The model's own embeddings (tool calling has nothing to add to them)."""
        if not isinstance(self.model, Embedder):
            raise RejectedError("invalid_request", f"the model {self.model.info.name} makes no embeddings")
        return await self.model.embed(texts)

    async def close(self) -> None:
        await self.model.close()


def _calls_allowed(request: GenerationRequest) -> bool:
    return bool(request.tools) and request.tool_choice != "none"


class _Answer:
    """One request's answer: streamed as text, or held back while it may be a call."""

    def __init__(self, request: GenerationRequest) -> None:
        self.id = request.id
        self._tools = {t.name: t for t in request.tools if request.tool_name in (None, t.name)}
        self._streaming = not _calls_allowed(request)
        self._required = request.tool_choice == "required"
        self._held = ""
        self._weighed: list[TokenLogprob] = []  # the held tokens' logprobs, if asked for
        self.request = request
        if not self._streaming:
            schema = _call_schema(list(self._tools.values())) if self._required else request.json_schema
            self.request = dataclasses.replace(request, messages=_told(request), json_schema=schema)

    def take(self, token: Token) -> list[Token]:
        if self._streaming or token.error is not None:
            return [token]
        self._held += token.text
        self._weighed += token.logprobs
        if token.finish_reason is None:
            start = self._held.lstrip()
            if start and not start.startswith("{") and not self._required:  # it answers in text
                self._streaming = True
                return [self._released(token)]
            return []
        call = self._call() if token.finish_reason == "stop" else None
        if call is None:
            return [self._released(token)]
        return [Token(self.id, "", "tool_calls", usage=token.usage, tool_calls=(call,))]

    def _released(self, token: Token) -> Token:
        """``token`` carrying all the text held back, and its logprobs."""
        return dataclasses.replace(token, text=self._held, logprobs=tuple(self._weighed))

    def _call(self) -> ToolCall | None:
        """The call the held answer makes, if it is one of a tool this request offers."""
        try:
            answer = orjson.loads(self._held)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(answer, dict) or set(answer) != {"name", "arguments"}:
            return None
        name, arguments = answer["name"], answer["arguments"]
        if name not in self._tools or not isinstance(arguments, dict):
            return None
        digest = hashlib.blake2b(f"{self.id}:0".encode(), digest_size=12).hexdigest()
        return ToolCall(id=f"call_{digest}", name=name, arguments=orjson.dumps(arguments).decode())


def _call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """The JSON Schema of a call of one of ``tools``."""
    shapes = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return shapes[0] if len(shapes) == 1 else {"anyOf": shapes}


def _told(request: GenerationRequest) -> tuple[ChatMessage, ...]:
    """The conversation as a model without tools reads it: the tools described in the system
    turn, earlier calls written out as the JSON the model would have answered."""
    conversation = request.messages or (ChatMessage(role="user", content=request.prompt),)
    lines = ["You can call these functions (their arguments are JSON Schema):"]
    lines += [
        orjson.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}).decode()
        for t in request.tools
    ]
    lines.append(
        'To call one, answer with nothing but a JSON object: {"name": <the function>, "arguments": '
        "<its arguments>}."
    )
    if request.tool_name is not None:
        lines.append(f"Call {request.tool_name}.")
    elif request.tool_choice == "required":
        lines.append("Call one of them.")
    else:
        lines.append("Otherwise, answer in plain text.")
    told = "\n".join(lines)
    turns = []
    for message in conversation:
        content = message.content
        for call in message.tool_calls:
            written = f'{{"name": {orjson.dumps(call.name).decode()}, "arguments": {call.arguments}}}'
            content = f"{content}\n{written}" if content else written
        turns.append(ChatMessage(role=message.role, content=content))
    if turns[0].role == "system":
        turns[0] = ChatMessage(role="system", content=f"{turns[0].content}\n\n{told}")
    else:
        turns.insert(0, ChatMessage(role="system", content=told))
    return tuple(turns)
